"""The VAE's training batches: image sources, RAM and device caches, the prefetching loader
and the epoch's order from a resume position. Yields the loader's uint8 batches; the files it
had to leave out are reported once each and counted for the summary."""

from __future__ import annotations

import os
import time

import torch

from imgvae.config import Config
from imgvae.data.datasets import BadFiles, build_dataset
from imgvae.data.loading import (
    DeviceBatches,
    Prefetched,
    eval_loader,
    loader_workers,
    make_loader,
    resident_images,
)
from imgvae.runtime import RunError
from imgvae.train.processes import Processes


class ImageBatches:
    """The training set (and, on rank 0, the held-out loader for the per-epoch eval loss)."""

    def __init__(self, cfg: Config, procs: Processes):
        tc, device = cfg.train, procs.device
        self.cfg, self.procs, self.device, self.batch_size = cfg, procs, device, tc.batch_size
        self.train_set = build_dataset(cfg.data.train, cfg.data, train=True, seed=tc.seed)
        self.eval_set = build_dataset(cfg.data.eval, cfg.data, train=False, seed=tc.seed) if cfg.data.eval else None
        if len(self.train_set) < tc.batch_size * procs.world_size:
            raise RunError(f"the training set has {len(self.train_set)} images, fewer than one global batch "
                           f"(train.batch_size={tc.batch_size} x {procs.world_size} processes)")
        workers = loader_workers(self.train_set, cfg.data.num_workers, device)
        # RAM for views and decoded images, per split. The budget is per machine: torchrun's
        # processes on it keep a copy each.
        self.memory_budget = cfg.data.memory_cache_gb * 2**30 / int(os.environ.get("LOCAL_WORLD_SIZE", "1"))
        self.in_memory = self.train_set.keep_in_memory(self.memory_budget, shared=workers > 0)
        self.train_set.keep_decoded(self.memory_budget, processes=workers)
        loader, self.sampler = make_loader(self.train_set, tc.batch_size, True, tc.seed, workers,
                                           device.type == "cuda", procs.rank, procs.world_size)
        self.resident = resident_images(self.train_set, device, self.device_budget())
        if self.resident is not None:
            self.loader = DeviceBatches(self.resident, self.sampler, tc.batch_size, self.train_set.views)
        else:  # on CUDA, the next batch is copied while this step runs
            self.loader = Prefetched(loader, device)
        self.per_epoch = len(self.sampler.base) // tc.batch_size
        self.bad_files, self.wait = BadFiles(), 0.0
        self.bad_files.add_cached(self.train_set)  # files a prepared cache left out, with its reasons
        self.eval_loader = None
        if self.eval_set is not None and procs.main:
            workers = loader_workers(self.eval_set, cfg.data.num_workers, device)
            self.eval_set.keep_in_memory(self.memory_budget, shared=workers > 0)
            count = min(cfg.data.eval_limit or len(self.eval_set), len(self.eval_set))
            self.eval_loader = eval_loader(self.eval_set, tc.batch_size, device, workers, list(range(count)))

    def device_budget(self) -> float:
        """Bytes of the training device this process may fill with the training set (data.device_cache_gb)."""
        budget = self.cfg.data.device_cache_gb
        if budget != "auto":
            return budget * 2**30
        if self.device.type == "cuda":
            return torch.cuda.mem_get_info(self.device)[0] / 2
        return self.memory_budget  # it stays in RAM

    def start_epoch(self, epoch: int, batches_done: int) -> str | None:
        """The epoch's order from batch `batches_done` on; the training views go to the device
        once the RAM view cache holds them all (after the first epoch)."""
        self.sampler.set_epoch(epoch, start=batches_done * self.batch_size)
        self.train_set.set_epoch(epoch)
        self.wait = 0.0
        return self._use_resident_views() if self.resident is None else None

    def _use_resident_views(self) -> str | None:
        """Batch on the device from the RAM view cache, as from a prepared cache, once it holds
        every training view (unreadable ones left out) and they fit data.device_cache_gb."""
        held = self.train_set.views_in_memory(fill=self.batch_size * self.procs.world_size)
        if held is None or held[0].numel() > self.device_budget():
            return None
        # Views read outside the loader (the grids' images, the ones just read) are reported here.
        failed = (~held[1]).nonzero().flatten().tolist()
        self.bad_files.add(self.train_set, [(i, self.train_set.failures[i]) for i in failed
                                            if i in self.train_set.failures])
        self.resident = held[0].to(self.device)  # on a CPU, the very same tensor
        self.loader = DeviceBatches(self.resident, self.sampler, self.batch_size, readable=held[1])
        return f"imgvae: every training view is in memory; batching them on {self.device} from now on"

    def __len__(self) -> int:
        return len(self.loader)

    def __iter__(self):
        """The rest of the epoch's uint8 batches; time spent waiting for them adds to self.wait."""
        asked = time.perf_counter()
        for images, _, bad_items in self.loader:
            self.wait += time.perf_counter() - asked
            self.bad_files.add(self.train_set, bad_items)
            yield images
            asked = time.perf_counter()
        if isinstance(self.loader, Prefetched):  # device batches' views were all read when cached
            self.read_left_over()

    def read_left_over(self) -> None:
        """Read the views the epoch left over (the last, partial batch, and on rank 0 the few the
        sampler drops to split the set evenly over processes), so that an unreadable file among
        them is reported too, in whatever epoch it falls."""
        base = self.sampler.base
        left = list(base)[self.per_epoch * self.batch_size:]
        if self.procs.main and base.total_size < len(self.train_set):  # DistributedSampler's drop_last
            order = torch.randperm(len(self.train_set), generator=torch.Generator().manual_seed(base.seed + base.epoch))
            left += order[base.total_size:].tolist()
        self.bad_files.add(self.train_set, [(i, reason) for i in left for x, _, reason in [self.train_set[i]]
                                            if x is None])

    def describe(self) -> str:
        n_eval = len(self.eval_loader.dataset) if self.eval_loader else 0
        return (f"train {len(self.train_set):,} images from {self.train_set.source.name}; eval {n_eval:,}"
                f"{'; training views kept in RAM once decoded' if self.in_memory else ''}"
                f"{'; training images kept decoded in RAM' if self.train_set.decoded is not None else ''}"
                f"{f'; training set resident on {self.device}' if self.resident is not None else ''}")

    def summary(self) -> dict:
        return {"skipped_files": len(self.bad_files), "skipped": dict(sorted(self.bad_files.reasons.items()))}
