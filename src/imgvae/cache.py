"""Prepared datasets: every image preprocessed once into a uint8 array on disk.

A cache folder holds
  images.npy     (rows, 3, S, S) uint8, memory-mapped when read
  keys.txt       the source file of each row
  valid.npy      rows that decoded (unreadable files leave a zero row, not listed)
  manifest.json  format, preprocessing, sources, counts, skipped files
It is built in CACHE.partial/ chunk by chunk (resumable: finished chunks are
recorded in done.npy after their rows are flushed) and renamed to CACHE only
when complete, so a half-written cache is never read.
"""

from __future__ import annotations

import json
import multiprocessing
import os
import shutil
import time
from pathlib import Path

import numpy as np
from numpy.lib.format import open_memmap
from tqdm import tqdm

from .config import DataConfig
from .sources import SourceError, open_sources

CACHE_FORMAT, CACHE_VERSION = "imgvae-cache", 1
MANIFEST, IMAGES, KEYS, VALID = "manifest.json", "images.npy", "keys.txt", "valid.npy"
PLAN, DONE, SKIPPED = "plan.json", "done.npy", "skipped.jsonl"
PARTIAL_SUFFIX = ".partial"


def preprocessing_signature(cfg: DataConfig) -> dict:
    """What determines a cached view; a cache is only used with the same values."""
    return {"image_size": cfg.image_size, "crop": cfg.crop, "crop_size": cfg.crop_size, "exact_decode": cfg.exact_decode}


def is_cache(path: Path) -> bool:
    return (Path(path) / MANIFEST).is_file()


class CacheSource:
    """A prepared cache as a source of ready uint8 (3, S, S) views.

    The memory map is opened lazily in each process; DistributedSampler ranks
    read their own rows of the one shared file (no copy per rank).
    """

    def __init__(self, root: Path):
        self.root, self.name = Path(root), str(root)
        try:
            manifest = json.loads((self.root / MANIFEST).read_text())
        except (OSError, ValueError) as e:
            raise SourceError(f"{root}: unreadable cache manifest ({e})") from None
        if manifest.get("format") != CACHE_FORMAT or manifest.get("version") != CACHE_VERSION:
            raise SourceError(f"{root}: not an imgvae cache of version {CACHE_VERSION}")
        self.preprocessing = manifest["preprocessing"]
        self.valid = np.load(self.root / VALID)
        self.keys = (self.root / KEYS).read_text().splitlines()
        self._images, self._pid = None, None

    def __len__(self) -> int:
        return len(self.valid)

    def key(self, i: int) -> str:
        return self.keys[self.valid[i]]

    def image(self, i: int) -> np.ndarray:
        if self._images is None or self._pid != os.getpid():
            self._images, self._pid = np.load(self.root / IMAGES, mmap_mode="r"), os.getpid()
        return np.array(self._images[self.valid[i]])

    def check(self, cfg: DataConfig) -> None:
        wanted = preprocessing_signature(cfg)
        if self.preprocessing != wanted:
            diff = {k: (self.preprocessing.get(k), v) for k, v in wanted.items() if self.preprocessing.get(k) != v}
            details = ", ".join(f"data.{k}: cache {a!r}, run {b!r}" for k, (a, b) in diff.items())
            raise SourceError(f"cache {self.root} was prepared with other preprocessing ({details}); "
                              f"run imgvae prepare again or set the run's data keys to match")

    def __getstate__(self):
        return {**self.__dict__, "_images": None}


# Worker state for prepare: set once per process by the pool initializer.
_WORK: dict = {}


def _init_worker(source, cfg: DataConfig, chunk: int) -> None:
    _WORK.update(source=source, cfg=cfg, chunk=chunk)


def _prepare_chunk(c: int):
    from .data import load_view  # data imports this module

    source, cfg, chunk = _WORK["source"], _WORK["cfg"], _WORK["chunk"]
    rows = range(c * chunk, min((c + 1) * chunk, len(source)))
    out = np.zeros((len(rows), 3, cfg.image_size, cfg.image_size), np.uint8)
    bad = []
    for k, r in enumerate(rows):
        try:
            out[k] = load_view(source.read_bytes(r), cfg)
        except Exception as e:  # recorded in the manifest; prepare goes on
            bad.append({"row": r, "key": source.key(r), "reason": f"{type(e).__name__}: {e}"})
    return c, out, bad


def prepare(specs: list[str], cfg: DataConfig, out: str | Path, workers: int | None = None,
            chunk: int = 256, progress: bool = True) -> dict:
    """Preprocess every image of the sources into the cache folder `out`.

    Resumes an interrupted run of the same command; returns the manifest.
    """
    out = Path(out)
    if cfg.crop != "center":
        raise SourceError("prepare stores fixed views: use data.crop=center (random crops must change every epoch)")
    if is_cache(out):
        raise SourceError(f"{out} already holds a prepared cache; remove it or choose another -o")
    if out.exists() and any(out.iterdir()):
        raise SourceError(f"{out} exists and is not empty")
    source = open_sources(specs)
    partial = out.with_name(out.name + PARTIAL_SUFFIX)
    rows, size = len(source), cfg.image_size
    n_chunks = -(-rows // chunk)
    plan = {"sources": [s.name for s in source.sources], "rows": rows, "chunk": chunk,
            "preprocessing": preprocessing_signature(cfg)}
    if partial.exists():
        try:
            same = json.loads((partial / PLAN).read_text()) == plan
        except (OSError, ValueError):
            same = False
        if not same:
            print(f"imgvae: {partial} was started with other sources or settings; starting over")
            shutil.rmtree(partial)
    if not partial.exists():
        partial.mkdir(parents=True)
        open_memmap(partial / IMAGES, "w+", np.uint8, (rows, 3, size, size)).flush()
        open_memmap(partial / DONE, "w+", np.bool_, (n_chunks,)).flush()
        (partial / PLAN).write_text(json.dumps(plan))
    images = np.load(partial / IMAGES, mmap_mode="r+")
    done = np.load(partial / DONE, mmap_mode="r+")
    pending = [c for c in range(n_chunks) if not done[c]]
    if len(pending) < n_chunks:
        print(f"imgvae: resuming {partial}: {n_chunks - len(pending)} of {n_chunks} chunks already done")

    started = time.time()
    workers = workers or os.cpu_count() or 1
    bar = tqdm(total=rows, initial=(n_chunks - len(pending)) * chunk if pending else rows, unit="img",
               desc=f"prepare {out.name}", disable=not progress, dynamic_ncols=True)
    pool = multiprocessing.Pool(workers, _init_worker, (source, cfg, chunk)) if workers > 1 else None
    if pool is None:
        _init_worker(source, cfg, chunk)
    try:
        results = pool.imap_unordered(_prepare_chunk, pending) if pool else map(_prepare_chunk, pending)
        for c, arr, bad in results:
            images[c * chunk : c * chunk + len(arr)] = arr
            images.flush()  # rows on disk before the chunk counts as done
            if bad:
                with open(partial / SKIPPED, "a") as f:
                    f.writelines(json.dumps(b) + "\n" for b in bad)
            done[c] = True
            done.flush()
            bar.update(len(arr))
    finally:
        bar.close()
        if pool:
            pool.terminate()
    del images, done

    skipped = {}
    if (partial / SKIPPED).exists():  # a chunk redone after a crash may repeat its lines
        for line in (partial / SKIPPED).read_text().splitlines():
            b = json.loads(line)
            skipped[b["row"]] = b
    valid = np.array([r for r in range(rows) if r not in skipped], dtype=np.int64)
    if len(valid) == 0:
        raise SourceError(f"none of the {rows} files in {', '.join(specs)} is a readable image")
    np.save(partial / VALID, valid)
    (partial / KEYS).write_text("".join(source.key(r) + "\n" for r in range(rows)))
    manifest = {
        "format": CACHE_FORMAT, "version": CACHE_VERSION, "preprocessing": plan["preprocessing"],
        "sources": plan["sources"], "rows": rows, "count": int(len(valid)),
        "skipped": {b["key"]: b["reason"] for b in sorted(skipped.values(), key=lambda b: b["row"])},
        "seconds_last_run": round(time.time() - started, 2), "workers": workers,
    }
    (partial / MANIFEST).write_text(json.dumps(manifest, indent=1))
    for name in (PLAN, DONE, SKIPPED):
        (partial / name).unlink(missing_ok=True)
    if out.exists():
        out.rmdir()
    os.rename(partial, out)
    return manifest
