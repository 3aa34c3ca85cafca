"""Datasets and loaders over sources: the views of each epoch, unreadable files skipped.

Every random choice is a function of (seed, epoch, index), so runs repeat
exactly, whatever the number of workers, and resume mid-way.
"""

from __future__ import annotations

import itertools
import os
import random
import warnings
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset, DistributedSampler, Sampler, Subset

from .config import DataConfig
from .decode import DecodedImages, load_view, skip_reason
from .sources import CacheSource, ConcatSource, SourceError, max_file_bytes, open_sources, read_file, resolve_auto

# How a user's own images are seen by evaluate and fit-prior: each as it is, one centre view.
ONE_CENTRE_VIEW = {"crop": "center", "views_per_image": 1, "eval_views_per_image": 1}


def item_rng(seed: int, epoch: int, index: int) -> random.Random:
    return random.Random(f"{seed}/{epoch}/{index}")


class ImageDataset(Dataset):
    """(uint8 image, index) per view; (None, index, reason) for an unreadable file.

    With views_per_image = V, item i is view i % V of file i // V; random crops
    are drawn per (seed, epoch, item) in training and per (seed, item) for eval.
    """

    def __init__(self, source: ConcatSource, cfg: DataConfig, train: bool, seed: int):
        self.source, self.cfg, self.train, self.seed = source, cfg, train, seed
        self.views = cfg.views_per_image if train else cfg.eval_views_per_image
        self.epoch = 0
        self.memory = self.filled = self.failed = None  # see keep_in_memory
        self.decoded: DecodedImages | None = None  # see keep_decoded

    @property
    def from_prepared_cache(self) -> bool:
        """Every view is read from `imgvae prepare` caches: already a memory copy."""
        return all(isinstance(s, CacheSource) for s in self.source.sources)

    def keep_in_memory(self, max_bytes: float, shared: bool) -> bool:
        """Keep each view in RAM once decoded, so that later epochs skip decoding.

        Only where views do not change between epochs (all but random training crops),
        are not read from a prepared cache already, and all fit in max_bytes. shared: in
        shared memory, which loader workers fill for the training process; refused
        (False) when /dev/shm has no room for it."""
        size = self.cfg.image_size
        nbytes = len(self) * 3 * size * size
        if (self.train and self.cfg.crop == "random") or nbytes > max_bytes or self.from_prepared_cache:
            return False
        if shared and os.path.isdir("/dev/shm"):
            stat = os.statvfs("/dev/shm")
            if stat.f_bavail * stat.f_frsize < nbytes + 2**28:  # also leave room for the batches in transit
                return False
        memory = torch.empty(len(self), 3, size, size, dtype=torch.uint8)  # private pages: touched only when filled
        filled, failed = torch.zeros(len(self), dtype=torch.bool), torch.zeros(len(self), dtype=torch.bool)
        if shared:
            try:  # shared memory is committed in full here
                memory, filled, failed = memory.share_memory_(), filled.share_memory_(), failed.share_memory_()
            except (RuntimeError, OSError):
                return False
        self.memory, self.filled, self.failed = memory, filled, failed
        return True

    def views_in_memory(self, fill: int = 0) -> tuple[torch.Tensor, torch.Tensor] | None:
        """(every view (N, 3, S, S), which of them were readable) once keep_in_memory's cache
        has tried them all, else None. When at most `fill` views are left untried (those that an
        epoch's drop_last left out), they are read now."""
        if self.memory is None:
            return None
        untried = (~(self.filled | self.failed)).nonzero().flatten().tolist()
        if len(untried) > fill:
            return None
        for index in untried:
            self[index]  # fills the view, or marks it failed
        return self.memory, self.filled

    def keep_decoded(self, max_bytes: float, processes: int = 1) -> bool:
        """For random training crops: keep the decoded images in RAM (each process its own,
        max_bytes shared among them), so that a few large photos give every view from one
        decode (per JPEG reduction) instead of one decode per view. Views stay pixel for
        pixel the same; images over the budget are decoded per view as before."""
        if not (self.train and self.cfg.crop == "random") or self.from_prepared_cache:
            return False
        self.decoded = DecodedImages(max_bytes / max(1, processes))
        return True

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        return len(self.source) * self.views

    def key(self, index: int) -> str:
        return self.source.key(index // self.views)

    def view_name(self, index: int) -> str:
        """The view's file, and which of its views it is when there are several."""
        return self.key(index) + (f" (view {index % self.views + 1}/{self.views})" if self.views > 1 else "")

    def load(self, index: int) -> torch.Tensor:
        """The preprocessed view; raises on an unreadable file."""
        if self.memory is not None and self.filled[index]:
            return self.memory[index]
        source, i = self.source.locate(index // self.views)
        if isinstance(source, CacheSource):
            return torch.from_numpy(source.image(i))
        rng = None
        if self.cfg.crop == "random":
            rng = item_rng(self.seed, self.epoch if self.train else -1, index)
        if self.decoded is not None:
            read = lambda: source.read_bytes(i, max_file_bytes(self.cfg))  # noqa: E731
            view = torch.from_numpy(self.decoded.view(index // self.views, read, self.cfg, rng))
        else:
            view = torch.from_numpy(load_view(source.read_bytes(i, max_file_bytes(self.cfg)), self.cfg, rng))
        if self.memory is not None:
            self.memory[index] = view
            self.filled[index] = True
        return view

    def __getitem__(self, index: int):
        try:
            return self.load(index), index, None
        except Exception as e:  # any broken file must not stop a long run
            if self.failed is not None:
                self.failed[index] = True
            return None, index, skip_reason(e)


def collate(items):
    """-> (uint8 images (B, 3, S, S), indices, [(index, reason)] of skipped files)."""
    good = [(x, i) for x, i, _ in items if x is not None]
    bad = [(i, reason) for x, i, reason in items if x is None]
    if good:
        images = torch.stack([x for x, _ in good])
        indices = torch.tensor([i for _, i in good])
    else:
        images, indices = torch.empty(0, dtype=torch.uint8), torch.empty(0, dtype=torch.long)
    return images, indices, bad


class SkippedFile(UserWarning):
    """An unreadable file, skipped; shown as one line (see _one_line)."""


_format_warning = warnings.formatwarning


def _one_line(message, category, filename, lineno, line=None) -> str:
    if issubclass(category, SkippedFile):
        return f"imgvae: {message}\n"
    return _format_warning(message, category, filename, lineno, line)


warnings.formatwarning = _one_line


class BadFiles:
    """Warns once per unreadable file and counts them for the run summary."""

    def __init__(self):
        self.reasons: dict[str, str] = {}

    def add(self, dataset: ImageDataset, bad: list[tuple[int, str]]) -> None:
        for index, reason in bad:
            key = dataset.key(index)
            if key not in self.reasons:
                self.reasons[key] = reason
                warnings.warn(f"skipping unreadable image {key} ({reason})", SkippedFile)

    def __len__(self) -> int:
        return len(self.reasons)


def first_images(dataset: ImageDataset, n: int) -> torch.Tensor:
    """The first n readable images of the dataset, uint8 (n', 3, S, S)."""
    images = []
    for i in range(len(dataset)):
        x, _, _ = dataset[i]
        if x is not None:
            images.append(x)
        if len(images) == n:
            break
    return torch.stack(images)


def check_readable(dataset: ImageDataset) -> None:
    """Fail before training when not one file of the source decodes."""
    for index in range(0, len(dataset), dataset.views):
        try:
            dataset.load(index)
            return
        except Exception:
            continue
    raise SourceError(f"data source {dataset.source.name!r}: none of its {len(dataset.source)} files "
                      "is a readable image")


def build_dataset(specs: list[str], cfg: DataConfig, train: bool, seed: int) -> ImageDataset:
    """The views of the sources `specs` (`dataset.cfg`: cfg with its "auto" settings decided);
    fails when a source has no readable image, or a cache was made with other settings."""
    source = open_sources(specs)
    cfg = resolve_auto(cfg, source)
    dataset = ImageDataset(source, cfg, train=train, seed=seed)
    for source in dataset.source.sources:
        if isinstance(source, CacheSource):
            source.check(cfg)
        else:
            check_readable(ImageDataset(ConcatSource([source]), cfg, train, seed))
    return dataset


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


def load_image_file(path: str | Path, cfg: DataConfig) -> torch.Tensor:
    """One user image file -> uint8 (3, S, S), preprocessed as the eval split (centre crop)."""
    path = Path(path)
    try:
        data = read_file(path, max_file_bytes(cfg))
    except OSError as e:
        raise SourceError(f"{str(path)!r}: cannot be read ({e.strerror or e})") from None
    try:
        return torch.from_numpy(load_view(data, cfg))
    except Exception as e:
        raise SourceError(f"{str(path)!r}: not a readable image ({skip_reason(e)})") from None
