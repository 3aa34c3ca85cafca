"""`imgvae prepare`: every image preprocessed once into a uint8 array on disk.

The folder's format and its reader (CacheSource) are in sources.py. It is built in
CACHE.partial/ chunk by chunk (resumable: finished chunks are recorded in done.npy
after their rows are flushed) and renamed to CACHE only when complete, so a
half-written cache is never read.
"""

from __future__ import annotations

import errno
import json
import multiprocessing
import os
import shutil
import time
import warnings
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch
from numpy.lib.format import open_memmap
from tqdm import tqdm

from imgvae.config import ConfigError, DataConfig
from imgvae.data.datasets import SkippedFile
from imgvae.data.decode import device_decodable, device_views, load_view, skip_reason
from imgvae.data.labels import LABELS_FILE, read_labels
from imgvae.data.sources import (
    CACHE_FORMAT,
    CACHE_VERSION,
    IMAGES,
    MANIFEST,
    PARTIAL_SUFFIX,
    VALID,
    SourceError,
    is_cache,
    max_file_bytes,
    open_sources,
    preprocessing_signature,
    resolve_auto,
    write_keys,
)
from imgvae.rundir import append_jsonl, read_jsonl

PLAN, DONE, SKIPPED = "plan.json", "done.npy", "skipped.jsonl"  # bookkeeping of a partial cache


# Worker state for prepare: set once per process by the pool initializer.
_WORK: dict = {}


def _init_worker(source, cfg: DataConfig, chunk: int, device: torch.device | None = None) -> None:
    _WORK.update(source=source, cfg=cfg, chunk=chunk, device=device)


def _prepare_chunk(c: int):
    source, cfg, chunk = _WORK["source"], _WORK["cfg"], _WORK["chunk"]
    return c, *chunk_views(source, cfg, range(c * chunk, min((c + 1) * chunk, len(source))), _WORK.get("device"))


def chunk_views(source, cfg: DataConfig, rows: range, device: torch.device | None = None):
    """The views of the source's `rows` -> (uint8 (len(rows), 3, S, S), [{"row", "key", "reason"}]
    of unreadable files). With a device, complete RGB / grey JPEGs are decoded there in one batch
    (decode.device_views); every other file, and any the device refuses, takes the CPU path,
    which also says why a file is unreadable."""
    out = np.zeros((len(rows), 3, cfg.image_size, cfg.image_size), np.uint8)
    bad, on_device = [], {}

    def view(k: int, data: bytes | None = None, try_device: bool = False) -> None:
        """Row k's view on the CPU, or its bytes set aside for the device batch."""
        try:
            data = source.read_bytes(rows[k], max_file_bytes(cfg)) if data is None else data
            if try_device and device_decodable(data, cfg):
                on_device[k] = data
            else:
                out[k] = load_view(data, cfg)
        except Exception as e:  # recorded in the manifest; prepare goes on
            bad.append({"row": rows[k], "key": source.key(rows[k]), "reason": skip_reason(e)})

    for k in range(len(rows)):
        view(k, try_device=device is not None)
    for k, decoded in zip(list(on_device), device_views(list(on_device.values()), cfg, device)):
        if decoded is None:  # refused by the device's decoder: the CPU path decides
            view(k, on_device[k])
        else:
            out[k] = decoded
    return out, sorted(bad, key=lambda b: b["row"])


def prepare(specs: list[str], cfg: DataConfig, out: str | Path, workers: int | None = None,
            chunk: int = 256, progress: bool = True, device: str | torch.device | None = None,
            on_chunk: Callable[[int], None] | None = None) -> dict:
    """Preprocess every image of the sources into the cache folder `out`, in `workers`
    processes, or with `device` (e.g. "cuda"): JPEGs decoded, cropped and resized there in
    batches of `chunk` (nvJPEG on CUDA), other files on the CPU.

    Resumes an interrupted run of the same command; returns the manifest. on_chunk(c) is called
    before chunk c is written (a test interrupts there).
    """
    out, device = Path(out), None if device is None else torch.device(device)
    if is_cache(out):
        raise SourceError(f"{out} already holds a prepared cache; remove it or choose another -o")
    if device is not None and cfg.exact_decode:
        raise ConfigError("data.exact_decode=true asks for the seed's PIL decode bit for bit, which decoding on a "
                          "device is not: prepare with data.exact_decode=false (and train with it), or on the CPU")
    source = open_sources(specs)
    cfg = resolve_auto(cfg, source)
    if cfg.crop != "center":
        raise SourceError("prepare stores fixed views: use data.crop=center (random crops must change every epoch)")
    plan = {"sources": [s.name for s in source.sources], "rows": len(source), "chunk": chunk,
            "preprocessing": preprocessing_signature(cfg)}
    size = cfg.image_size
    output = ChunkedOutput(out, plan, {IMAGES.removesuffix(".npy"): ((len(source), 3, size, size), np.uint8)})
    started, workers = time.time(), 1 if device is not None else workers or os.cpu_count() or 1
    bar = output.progress_bar(progress, f"prepare {out.name}")
    pool = multiprocessing.Pool(workers, _init_worker, (source, cfg, chunk)) if workers > 1 else None
    if pool is None:
        _init_worker(source, cfg, chunk, device)
    try:
        pending = output.pending()
        for c, arr, bad in pool.imap_unordered(_prepare_chunk, pending) if pool else map(_prepare_chunk, pending):
            if on_chunk is not None:
                on_chunk(c)
            output.write(c, {"images": arr}, bad)
            bar.update(len(arr))
    finally:
        bar.close()
        if pool:
            pool.terminate()
    valid, skipped = output.index(source, specs)
    for key, reason in skipped.items():  # one line each, as training says them; the manifest keeps them
        warnings.warn(f"skipping unreadable image {key} ({reason})", SkippedFile)
    labels = read_labels(cfg.labels, source)
    if labels is not None:  # a row per file, as images.npy
        np.save(output.partial / LABELS_FILE, labels.multi_hot(range(len(source))))
        labels.warn()
    return output.complete({
        "format": CACHE_FORMAT, "version": CACHE_VERSION, "preprocessing": plan["preprocessing"],
        "sources": plan["sources"], "rows": plan["rows"], "count": int(len(valid)), "skipped": skipped,
        "seconds_last_run": round(time.time() - started, 2), "workers": workers,
        "decoder": f"torchvision decode_jpeg on {device}" if device is not None else "PIL",
        **({"labels": labels.record()} if labels is not None else {}),
    })


def reserve(path: Path) -> None:
    """Give a memory-mapped file all its blocks now: writing into the map of a file its disk cannot
    hold kills the process (SIGBUS), where a reservation fails in one line (no space left)."""
    fd = os.open(path, os.O_RDWR)
    try:
        os.posix_fallocate(fd, 0, os.fstat(fd).st_size)
    except OSError as e:
        if e.errno in (errno.EOPNOTSUPP, errno.EINVAL):  # a file system without it: nothing to do
            return
        raise OSError(e.errno, f"{e.strerror} ({os.fstat(fd).st_size / 2**20:,.1f} MB needed): make room and "
                               "run the same command again, it resumes", str(path)) from None
    finally:
        os.close(fd)


class ChunkedOutput:
    """Arrays of plan["rows"] rows written chunk by chunk into OUT.partial/NAME.npy, memory-
    mapped: resumable (a chunk counts as done once its rows are on disk; a partial output
    made for another plan starts over) and renamed to OUT only when complete, so a half-written
    output is never read. Used by `imgvae prepare` and `imgvae encode`."""

    def __init__(self, out: Path, plan: dict, arrays: dict[str, tuple[tuple[int, ...], type]]):
        self.out, self.plan, self.chunk = Path(out), plan, plan["chunk"]
        if self.out.exists() and any(self.out.iterdir()):
            raise SourceError(f"{self.out} exists and is not empty")
        self.partial = self.out.with_name(self.out.name + PARTIAL_SUFFIX)
        if self.partial.exists():
            try:
                same = json.loads((self.partial / PLAN).read_text()) == plan
            except (OSError, ValueError):
                same = False
            if not same:
                print(f"imgvae: {self.partial} was started with other sources or settings; starting over")
                shutil.rmtree(self.partial)
        if not self.partial.exists():
            self.partial.mkdir(parents=True)
            for name, (shape, dtype) in arrays.items():
                open_memmap(self.partial / f"{name}.npy", "w+", dtype, shape).flush()
            open_memmap(self.partial / DONE, "w+", np.bool_, (-(-plan["rows"] // self.chunk),)).flush()
            (self.partial / PLAN).write_text(json.dumps(plan))
        for name in [*arrays, DONE.removesuffix(".npy")]:
            reserve(self.partial / f"{name}.npy")
        self.arrays = {name: np.load(self.partial / f"{name}.npy", mmap_mode="r+") for name in arrays}
        self.done = np.load(self.partial / DONE, mmap_mode="r+")

    def pending(self) -> list[int]:
        """The chunks not written yet."""
        return [c for c in range(len(self.done)) if not self.done[c]]

    def rows_of(self, c: int) -> range:
        return range(c * self.chunk, min((c + 1) * self.chunk, self.plan["rows"]))

    def progress_bar(self, progress: bool, desc: str) -> tqdm:
        done = len(self.done) - len(self.pending())
        if done:
            print(f"imgvae: resuming {self.partial}: {done} of {len(self.done)} chunks already done")
        initial = sum(len(self.rows_of(c)) for c in range(len(self.done)) if self.done[c])
        return tqdm(total=self.plan["rows"], initial=initial, unit="img", desc=desc, disable=not progress,
                    dynamic_ncols=True)

    def write(self, c: int, values: dict[str, np.ndarray], skipped: list[dict]) -> None:
        """Chunk c's rows of each array, and its unreadable rows ({"row", "key", "reason"})."""
        start = c * self.chunk
        for name, rows in values.items():
            self.arrays[name][start : start + len(rows)] = rows
            self.arrays[name].flush()  # rows on disk before the chunk counts as done
        for record in skipped:
            append_jsonl(self.partial / SKIPPED, record)
        self.done[c] = True
        self.done.flush()

    def index(self, source, specs: list[str]) -> tuple[np.ndarray, dict[str, str]]:
        """Write keys.json (every row's file: source.key(row), of a source or a dataset) and valid.npy
        (the rows that were read) -> (valid rows, {key: reason} of the skipped ones)."""
        rows = self.plan["rows"]
        skipped = {b["row"]: b for b in read_jsonl(self.partial / SKIPPED)}  # a chunk redone repeats its lines
        valid = np.array([r for r in range(rows) if r not in skipped], dtype=np.int64)
        if len(valid) == 0:
            raise SourceError(f"none of the {rows} files in {', '.join(specs)} is a readable image")
        np.save(self.partial / VALID, valid)
        write_keys(self.partial, (source.key(r) for r in range(rows)))
        return valid, {b["key"]: b["reason"] for b in sorted(skipped.values(), key=lambda b: b["row"])}

    def complete(self, manifest: dict) -> dict:
        """Write manifest.json and rename OUT.partial to OUT -> the manifest."""
        (self.partial / MANIFEST).write_text(json.dumps(manifest, indent=1))
        self.arrays, self.done = {}, None  # the memory maps are closed before the rename
        for name in (PLAN, DONE, SKIPPED):
            (self.partial / name).unlink(missing_ok=True)
        if self.out.exists():
            self.out.rmdir()
        os.rename(self.partial, self.out)
        return manifest
