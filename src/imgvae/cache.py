"""`imgvae prepare`: every image preprocessed once into a uint8 array on disk.

The folder's format and its reader (CacheSource) are in sources.py. It is built in
CACHE.partial/ chunk by chunk (resumable: finished chunks are recorded in done.npy
after their rows are flushed) and renamed to CACHE only when complete, so a
half-written cache is never read.
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
from .decode import load_view, skip_reason
from .rundir import append_jsonl, read_jsonl
from .sources import (
    CACHE_FORMAT,
    CACHE_VERSION,
    IMAGES,
    KEYS,
    MANIFEST,
    PARTIAL_SUFFIX,
    VALID,
    SourceError,
    is_cache,
    max_file_bytes,
    open_sources,
    preprocessing_signature,
    resolve_auto,
)

PLAN, DONE, SKIPPED = "plan.json", "done.npy", "skipped.jsonl"  # bookkeeping of a partial cache


# Worker state for prepare: set once per process by the pool initializer.
_WORK: dict = {}


def _init_worker(source, cfg: DataConfig, chunk: int) -> None:
    _WORK.update(source=source, cfg=cfg, chunk=chunk)


def _prepare_chunk(c: int):
    source, cfg, chunk = _WORK["source"], _WORK["cfg"], _WORK["chunk"]
    rows = range(c * chunk, min((c + 1) * chunk, len(source)))
    out = np.zeros((len(rows), 3, cfg.image_size, cfg.image_size), np.uint8)
    bad = []
    for k, r in enumerate(rows):
        try:
            out[k] = load_view(source.read_bytes(r, max_file_bytes(cfg)), cfg)
        except Exception as e:  # recorded in the manifest; prepare goes on
            bad.append({"row": r, "key": source.key(r), "reason": skip_reason(e)})
    return c, out, bad


def prepare(specs: list[str], cfg: DataConfig, out: str | Path, workers: int | None = None,
            chunk: int = 256, progress: bool = True) -> dict:
    """Preprocess every image of the sources into the cache folder `out`.

    Resumes an interrupted run of the same command; returns the manifest.
    """
    out = Path(out)
    if is_cache(out):
        raise SourceError(f"{out} already holds a prepared cache; remove it or choose another -o")
    if out.exists() and any(out.iterdir()):
        raise SourceError(f"{out} exists and is not empty")
    source = open_sources(specs)
    cfg = resolve_auto(cfg, source)
    if cfg.crop != "center":
        raise SourceError("prepare stores fixed views: use data.crop=center (random crops must change every epoch)")
    partial = out.with_name(out.name + PARTIAL_SUFFIX)
    plan = {"sources": [s.name for s in source.sources], "rows": len(source), "chunk": chunk,
            "preprocessing": preprocessing_signature(cfg)}
    _start_or_resume(partial, plan, cfg.image_size)
    started, workers = time.time(), workers or os.cpu_count() or 1
    _fill(partial, source, cfg, chunk, workers, progress, f"prepare {out.name}")
    manifest = _finish(partial, source, plan, specs)
    manifest |= {"seconds_last_run": round(time.time() - started, 2), "workers": workers}
    (partial / MANIFEST).write_text(json.dumps(manifest, indent=1))
    for name in (PLAN, DONE, SKIPPED):
        (partial / name).unlink(missing_ok=True)
    if out.exists():
        out.rmdir()
    os.rename(partial, out)
    return manifest


def _start_or_resume(partial: Path, plan: dict, size: int) -> None:
    """Keep a partial cache of the same plan; otherwise start one afresh."""
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
        open_memmap(partial / IMAGES, "w+", np.uint8, (plan["rows"], 3, size, size)).flush()
        open_memmap(partial / DONE, "w+", np.bool_, (-(-plan["rows"] // plan["chunk"]),)).flush()
        (partial / PLAN).write_text(json.dumps(plan))


def _fill(partial: Path, source, cfg: DataConfig, chunk: int, workers: int, progress: bool, desc: str) -> None:
    """Decode the chunks not done yet, in `workers` processes, into the memory-mapped rows."""
    images = np.load(partial / IMAGES, mmap_mode="r+")
    done = np.load(partial / DONE, mmap_mode="r+")
    pending = [c for c in range(len(done)) if not done[c]]
    if len(pending) < len(done):
        print(f"imgvae: resuming {partial}: {len(done) - len(pending)} of {len(done)} chunks already done")
    bar = tqdm(total=len(images), initial=(len(done) - len(pending)) * chunk if pending else len(images), unit="img",
               desc=desc, disable=not progress, dynamic_ncols=True)
    pool = multiprocessing.Pool(workers, _init_worker, (source, cfg, chunk)) if workers > 1 else None
    if pool is None:
        _init_worker(source, cfg, chunk)
    try:
        results = pool.imap_unordered(_prepare_chunk, pending) if pool else map(_prepare_chunk, pending)
        for c, arr, bad in results:
            images[c * chunk : c * chunk + len(arr)] = arr
            images.flush()  # rows on disk before the chunk counts as done
            for record in bad:
                append_jsonl(partial / SKIPPED, record)
            done[c] = True
            done.flush()
            bar.update(len(arr))
    finally:
        bar.close()
        if pool:
            pool.terminate()


def _finish(partial: Path, source, plan: dict, specs: list[str]) -> dict:
    """Write the index of readable rows and the keys -> the manifest."""
    rows = plan["rows"]
    skipped = {b["row"]: b for b in read_jsonl(partial / SKIPPED)}  # a chunk redone after a crash repeats its lines
    valid = np.array([r for r in range(rows) if r not in skipped], dtype=np.int64)
    if len(valid) == 0:
        raise SourceError(f"none of the {rows} files in {', '.join(specs)} is a readable image")
    np.save(partial / VALID, valid)
    (partial / KEYS).write_text("".join(source.key(r) + "\n" for r in range(rows)))
    return {
        "format": CACHE_FORMAT, "version": CACHE_VERSION, "preprocessing": plan["preprocessing"],
        "sources": plan["sources"], "rows": rows, "count": int(len(valid)),
        "skipped": {b["key"]: b["reason"] for b in sorted(skipped.values(), key=lambda b: b["row"])},
    }
