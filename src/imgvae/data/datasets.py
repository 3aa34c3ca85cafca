"""Datasets over sources: the views of each epoch, unreadable files skipped.

Every random choice is a function of (seed, epoch, index), so runs repeat
exactly, whatever the number of workers, and resume mid-way.
"""

from __future__ import annotations

import os
import random
import warnings
from pathlib import Path

import torch
from torch.utils.data import Dataset

from imgvae.config import DataConfig, center_crop_size
from imgvae.data.decode import DecodedImages, load_view, skip_reason
from imgvae.data.sources import (
    CacheSource,
    ConcatSource,
    SourceError,
    max_file_bytes,
    open_sources,
    read_file,
    resolve_auto,
)
from imgvae.errors import ImgvaeWarning

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
        # Why each view read in this process failed: a view tried outside the loader (the grids' first
        # images, the views read before batching on the device) is reported from here.
        self.failures: dict[int, str] = {}
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
        epoch's drop_last left out), they are read now. The unreadable ones' reasons are in
        self.failures when they were read in this process (else the loader reported them)."""
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
            self.failures[index] = skip_reason(e)
            return None, index, self.failures[index]


class EpochViews(Dataset):
    """The training views of `epochs` epochs of a dataset (random crops differ per epoch), each
    followed by its mirror image when `mirror`: what a second-stage model learns the latents of.
    Item ((e * N) + i) * M + f is view i of epoch e, mirrored when f = 1 (M = 2 with mirror)."""

    def __init__(self, dataset: ImageDataset, epochs: int, mirror: bool):
        self.dataset, self.epochs, self.copies = dataset, epochs, 2 if mirror else 1
        self.source, self.cfg = dataset.source, dataset.cfg

    @property
    def from_prepared_cache(self) -> bool:
        return self.dataset.from_prepared_cache

    def __len__(self) -> int:
        return len(self.dataset) * self.epochs * self.copies

    def locate(self, index: int) -> tuple[int, int, bool]:
        """-> (epoch, the dataset's index, mirrored)."""
        view, flip = divmod(index, self.copies)
        epoch, i = divmod(view, len(self.dataset))
        return epoch, i, bool(flip)

    def key(self, index: int) -> str:
        return self.dataset.key(self.locate(index)[1])

    def __getitem__(self, index: int):
        epoch, i, flip = self.locate(index)
        self.dataset.set_epoch(epoch)
        x, _, reason = self.dataset[i]
        return (x.flip(-1) if flip and x is not None else x), index, reason


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


class SkippedFile(ImgvaeWarning):
    """An unreadable file, skipped; the command line shows it as one line (runtime.one_line_warnings)."""


def left_out_before(dataset) -> dict[str, str]:
    """{key: reason} of the files the dataset's prepared caches left out when they were prepared."""
    return {key: f"{reason}; left out when {source.name} was prepared"
            for source in dataset.source.sources for key, reason in getattr(source, "skipped", {}).items()}


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

    def add_cached(self, dataset: ImageDataset) -> None:
        """The files the dataset's prepared caches left out, with the reasons they recorded."""
        for key, reason in left_out_before(dataset).items():
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


def preprocessing(cfg: DataConfig) -> dict:
    """How images were turned into views (a split's settings), for metrics.json and manifests."""
    keys = ("image_size", "crop", "crop_size", "crop_scale", "eval_views_per_image", "exact_decode", "exif_transpose")
    values = {k: list(v) if isinstance(v, tuple) else v for k, v in ((k, getattr(cfg, k)) for k in keys)}
    return values | {"crop_size": center_crop_size(cfg)}


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
