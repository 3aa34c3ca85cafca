"""Loaders over datasets: the training order (resumable, sharded over processes), batches
taken on the device from a resident set, batches prefetched to a GPU, held-out loaders.

Every random choice is a function of (seed, epoch, index), so runs repeat exactly, whatever
the number of workers, and resume mid-way.
"""

from __future__ import annotations

import itertools
import os

import numpy as np
import torch
from torch.utils.data import DataLoader, DistributedSampler, Sampler, Subset

from imgvae.data.datasets import ImageDataset, collate


def loader_workers(dataset: ImageDataset, num_workers: int | str, device: torch.device) -> int:
    """data.num_workers for this dataset and device. A prepared cache alone is read
    in-process (a memory copy: workers would only take CPU from the model).
    "auto": 0 when the model runs on the CPU, where a worker preempts one of torch's
    compute threads and the others wait for it, so decoding in the training process
    costs less (bench/RESULTS.md); min(8, CPU cores) on a GPU, which the loader must
    keep fed."""
    if dataset.from_prepared_cache:
        return 0
    if num_workers == "auto":
        return 0 if device.type == "cpu" else min(8, os.cpu_count() or 1)
    return num_workers


class ResumableSampler(Sampler):
    """A DistributedSampler's order for an epoch, from sample `start` on (resuming
    mid-epoch without replaying the batches already trained on)."""

    def __init__(self, base: DistributedSampler):
        self.base, self.start = base, 0

    def set_epoch(self, epoch: int, start: int = 0) -> None:
        self.base.set_epoch(epoch)
        self.start = start

    def __iter__(self):
        return itertools.islice(iter(self.base), self.start, None)

    def __len__(self) -> int:
        return len(self.base) - self.start


def make_loader(
    dataset: ImageDataset,
    batch_size: int,
    train: bool,
    seed: int,
    num_workers: int,
    pin_memory: bool = False,
    rank: int = 0,
    world_size: int = 1,
) -> tuple[DataLoader, ResumableSampler]:
    """Loader plus its sampler; call sampler.set_epoch(e) and dataset.set_epoch(e)
    before each epoch. The sampler shards across ranks when world_size > 1: rank r
    gets positions r, r + W, ... of the epoch's order."""
    sampler = ResumableSampler(DistributedSampler(
        dataset, num_replicas=world_size, rank=rank, shuffle=train, seed=seed, drop_last=train
    ))
    loader = DataLoader(
        dataset,
        batch_size=batch_size,
        sampler=sampler,
        num_workers=num_workers,
        collate_fn=collate,
        pin_memory=pin_memory,
        drop_last=train,  # BatchNorm cannot train on a final batch of one
        persistent_workers=False,  # workers must see set_epoch
        generator=torch.Generator().manual_seed(seed),  # leaves the global RNG alone
    )
    return loader, sampler


def resident_images(dataset: ImageDataset, device: torch.device, max_bytes: float,
                    chunk: int = 8192) -> torch.Tensor | None:
    """Every image of the dataset's prepared caches as one uint8 (N, 3, S, S) tensor on
    `device`, copied there in chunks; None when a view is not from a cache or they do not
    fit in max_bytes."""
    if not dataset.from_prepared_cache:
        return None
    size = dataset.cfg.image_size
    if len(dataset.source) * 3 * size * size > max_bytes:
        return None
    images = torch.empty(len(dataset.source), 3, size, size, dtype=torch.uint8, device=device)
    start = 0
    for source in dataset.source.sources:
        rows = source.rows()
        for i in range(0, len(rows), chunk):
            part = torch.from_numpy(np.array(rows[i:i + chunk]))  # a writable copy of the mapped rows
            images[start:start + len(part)].copy_(part)
            start += len(part)
    return images


class DeviceBatches:
    """The training loader's batches without a DataLoader: images taken by index from the whole
    set resident on the device, in the sampler's order, each process its slice. `images` holds a
    row per file (resident_images: view i is row i // views) or per view (the RAM view cache:
    views=1, `readable` marks the views the loader would not skip). Yields what the loader
    yields: (images, dataset indices, no skipped files; those were reported when first read)."""

    def __init__(self, images: torch.Tensor, sampler: ResumableSampler, batch_size: int, views: int = 1,
                 readable: torch.Tensor | None = None):
        self.images, self.sampler, self.batch_size = images, sampler, batch_size
        self.views, self.readable = views, readable

    def __len__(self) -> int:
        return len(self.sampler) // self.batch_size  # drop_last, as the training loader

    def __iter__(self):
        order = torch.tensor(list(self.sampler), dtype=torch.long)
        batches = list(order[:len(self) * self.batch_size].split(self.batch_size))
        if self.readable is not None:  # the loader leaves unreadable files out of their batch
            batches = [b[self.readable[b]] for b in batches]
        if not batches:
            return
        rows = (torch.cat(batches) // self.views).to(self.images.device)  # one copy per epoch
        start = 0
        for batch in batches:
            yield self.images[rows[start:start + len(batch)]], batch, []
            start += len(batch)


class Prefetched:
    """A loader one batch ahead on CUDA: while a step runs, the next batch's images are copied
    from pinned memory to the device on a side stream. Elsewhere, the loader's own batches."""

    def __init__(self, loader: DataLoader, device: torch.device):
        self.loader, self.device = loader, device

    def __len__(self) -> int:
        return len(self.loader)

    def __iter__(self):
        if self.device.type != "cuda":
            yield from self.loader
            return
        side, current = torch.cuda.Stream(self.device), torch.cuda.current_stream(self.device)

        def copied(batch):
            images, indices, bad = batch
            with torch.cuda.stream(side):
                return images.to(self.device, non_blocking=True), indices, bad

        copies = (copied(batch) for batch in self.loader)  # each copy starts when it is asked for
        following = next(copies, None)
        while following is not None:
            current.wait_stream(side)  # this batch's copy is done before the step reads it
            images, indices, bad = following
            images.record_stream(current)  # its memory, allocated on the side stream, is used here
            following = next(copies, None)
            yield images, indices, bad


def eval_loader(dataset, batch_size: int, device: torch.device, num_workers: int = 0,
                indices: list[int] | None = None) -> DataLoader:
    """The dataset's items (or those at `indices`) in order, in batches: evaluation,
    per-epoch eval loss, prior fitting. Pinned for CUDA."""
    items = dataset if indices is None else Subset(dataset, indices)
    return DataLoader(items, batch_size=batch_size, num_workers=num_workers, collate_fn=collate,
                      pin_memory=device.type == "cuda")
