"""Labels of images, read in place (data.labels): a photo folder's subfolders (torchvision's
ImageFolder convention), MS COCO's instances annotations (a zip or its json, multi-hot: the
categories present), a CSV or JSON Lines file naming files and labels, or the embedded photos'
own names. Images without a label, annotations of unknown categories and entries naming no
image are counted and said, never dropped in silence: an unlabelled image is kept, with the
empty label set (a conditional prior learns its unconditional branch from it)."""

from __future__ import annotations

import csv
import io
import json
import warnings
import zipfile
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath

import numpy as np

from imgvae.config.sections import check_labels_spec
from imgvae.data.sources import CacheSource, ConcatSource, FileListSource, FolderSource, SourceError, ZipSource
from imgvae.errors import ImgvaeWarning

LABELS_FILE = "labels.npy"  # (rows, vocabulary) uint8 multi-hot, beside a cache's images or a latents folder
SHOWN = 5  # names listed in a message about misses


class LabelWarning(ImgvaeWarning):
    """Images without a label, or label entries that name no image: said in one line."""


@dataclass
class Labels:
    """The label set of each file of a source (rows: indices into vocabulary), and what was missed."""

    spec: str
    vocabulary: list[str]
    rows: list[list[int]]
    unlabelled: int = 0
    missing: list[str] = field(default_factory=list)  # label entries (files) that name no image
    unknown: list[str] = field(default_factory=list)  # label names a source used that its list does not define

    def multi_hot(self, files: np.ndarray | list[int]) -> np.ndarray:
        """(len(files), vocabulary) uint8: 1 where file has the label."""
        out = np.zeros((len(files), len(self.vocabulary)), np.uint8)
        for row, f in enumerate(files):
            out[row, self.rows[f]] = 1
        return out

    def record(self) -> dict:
        """What a manifest keeps of the labels (the rows go in labels.npy)."""
        counts = np.bincount([i for r in self.rows for i in r], minlength=len(self.vocabulary))
        return {"spec": self.spec, "vocabulary": self.vocabulary, "counts": counts.tolist(),
                "unlabelled": self.unlabelled, "missing": self.missing, "unknown": self.unknown}

    def warn(self) -> None:
        """One line each for the images without a label and the entries that name no image."""
        if self.unlabelled:
            warnings.warn(f"{self.unlabelled} of {len(self.rows)} images have no label in {self.spec}: kept, with "
                          "no label (they train a conditional prior's unconditional branch)", LabelWarning)
        for what, names in (("name no image of the sources", self.missing),
                            ("are categories the annotations do not define", self.unknown)):
            if names:
                more = f", ... ({len(names)} in all)" if len(names) > SHOWN else ""
                warnings.warn(f"{len(names)} entries of {self.spec} {what}: {', '.join(names[:SHOWN])}{more}",
                              LabelWarning)


def read_labels(spec: str, source: ConcatSource) -> Labels | None:
    """The labels data.labels gives each file of the source (None for "none"). Prepared caches that
    recorded labels of the same spec give theirs (the label file need not be there any more)."""
    check_labels_spec(spec)
    if spec == "none":
        return None
    if all(isinstance(p, CacheSource) and (p.labels or {}).get("spec") == spec for p in source.sources):
        return _recorded(spec, source)
    keys = [source.key(i) for i in range(len(source))]
    if spec == "folders":
        names, missing, unknown = [folder_label(source, i) for i in range(len(source))], [], []
        names = [[n] if n else [] for n in names]
    elif spec.startswith("coco:"):
        names, missing, unknown = coco_labels(Path(spec.removeprefix("coco:")).expanduser(), keys)
    else:
        names, missing, unknown = file_labels(Path(spec).expanduser(), keys)
    vocabulary = sorted({n for row in names for n in row})
    if not vocabulary:
        where = "a folder below the sources" if spec == "folders" else spec
        raise SourceError(f"data.labels={spec}: no image of {source.name} has a label (from {where})")
    index = {name: i for i, name in enumerate(vocabulary)}
    rows = [sorted(index[n] for n in set(row)) for row in names]
    return Labels(spec, vocabulary, rows, sum(not r for r in rows), missing, unknown)


def _recorded(spec: str, source: ConcatSource) -> Labels:
    """The labels prepared caches recorded (labels.npy rows of their readable images)."""
    names = []
    for part in source.sources:
        hot = np.load(part.root / LABELS_FILE)[part.valid]
        names += [[part.labels["vocabulary"][k] for k in np.flatnonzero(row)] for row in hot]
    vocabulary = sorted({n for row in names for n in row})
    index = {name: i for i, name in enumerate(vocabulary)}
    rows = [sorted(index[n] for n in row) for row in names]
    missing = [m for p in source.sources for m in p.labels.get("missing", [])]
    return Labels(spec, vocabulary, rows, sum(not r for r in rows), missing)


def view_files(dataset) -> np.ndarray:
    """The file (source index) of each view of a dataset: an ImageDataset's view i is file
    i // views; an EpochViews item is a view of one of its dataset's files."""
    inner = getattr(dataset, "dataset", None)
    if inner is not None:  # EpochViews
        return np.array([dataset.locate(i)[1] // inner.views for i in range(len(dataset))], dtype=np.int64)
    return np.arange(len(dataset), dtype=np.int64) // dataset.views


def folder_label(source: ConcatSource, i: int) -> str | None:
    """The first path component of file i under its folder or zip; an embedded photo's own name;
    for a prepared cache, the same of the file it was made from (its recorded sources)."""
    part, j = source.locate(i)
    key = part.key(j)
    if isinstance(part, FolderSource):
        return _first_component(Path(key).relative_to(part.name).parts)
    if isinstance(part, ZipSource):
        return _first_component(PurePosixPath(part.members[j]).parts)
    if isinstance(part, FileListSource) and part.name.startswith("embedded:"):
        return Path(key).stem
    if isinstance(part, CacheSource):
        return _cached_folder_label(part, key)
    return None


def _first_component(parts: tuple[str, ...]) -> str | None:
    return parts[0] if len(parts) > 1 else None  # a file at the top has no folder, so no label


def _cached_folder_label(cache: CacheSource, key: str) -> str | None:
    for root in cache.origins:
        if root.startswith("embedded:"):
            continue
        if key.startswith(f"{root}:"):  # a zip member
            return _first_component(PurePosixPath(key[len(root) + 1:]).parts)
        if Path(key).is_relative_to(root):
            return _first_component(Path(key).relative_to(root).parts)
    return Path(key).stem if all(r.startswith("embedded:") for r in cache.origins) else None


def _suffix_index(keys: list[str]) -> dict[str, list[int]]:
    """Each key's file name -> the files with that name (a label entry matches a key it ends with)."""
    index: dict[str, list[int]] = {}
    for i, key in enumerate(keys):
        index.setdefault(PurePosixPath(key.replace(":", "/")).name, []).append(i)
    return index


def _matches(entry: str, keys: list[str], index: dict[str, list[int]]) -> list[int]:
    parts = PurePosixPath(entry.replace("\\", "/")).parts
    return [i for i in index.get(parts[-1], []) if PurePosixPath(keys[i].replace(":", "/")).parts[-len(parts):]
            == parts] if parts else []


def _apply(entries: list[tuple[str, list[str]]], keys: list[str]) -> tuple[list[list[str]], list[str], list[str]]:
    names: list[list[str]] = [[] for _ in keys]
    index, missing = _suffix_index(keys), []
    for entry, labels in entries:
        found = _matches(entry, keys, index)
        if not found:
            missing.append(entry)
        for i in found:
            names[i] += labels
    return names, missing, []


def file_labels(path: Path, keys: list[str]) -> tuple[list[list[str]], list[str], list[str]]:
    """A CSV (columns file, label: labels separated by ';', a file on several rows gets them all) or a
    JSON Lines file ({"file": ..., "labels": [...]} or "label": ...) -> names per key, misses."""
    if not path.is_file():
        raise SourceError(f"data.labels: no such file {str(path)!r}")
    entries = []
    try:
        if path.suffix.lower() == ".csv":
            rows = list(csv.reader(io.StringIO(path.read_text())))
            header = [c.strip().lower() for c in rows[0]] if rows else []
            start = 1 if header[:1] == ["file"] else 0
            entries = [(r[0].strip(), [x.strip() for x in ";".join(r[1:]).split(";") if x.strip()])
                       for r in rows[start:] if r and r[0].strip()]
        else:
            for n, line in enumerate(path.read_text().splitlines(), 1):
                if line.strip():
                    item = json.loads(line)
                    labels = item.get("labels", item.get("label", []))
                    entries.append((str(item["file"]), [labels] if isinstance(labels, str) else list(labels)))
    except (ValueError, KeyError, TypeError, IndexError, UnicodeDecodeError) as e:
        raise SourceError(f"data.labels: {path} is not a label file imgvae reads ({type(e).__name__}: {e}); "
                          "expected CSV rows file,label or JSON lines {\"file\": ..., \"labels\": [...]}") from None
    return _apply([(f, [str(x) for x in labels]) for f, labels in entries], keys)


def _coco_documents(path: Path) -> list[dict]:
    """The instances_*.json documents of a COCO annotations zip (read in place), or the json itself."""
    if not path.exists():
        raise SourceError(f"data.labels: no such file {str(path)!r}")
    try:
        if zipfile.is_zipfile(path):
            with zipfile.ZipFile(path) as zf:
                names = [n for n in zf.namelist() if PurePosixPath(n).name.startswith("instances_")
                         and n.endswith(".json")]
                if not names:
                    raise SourceError(f"data.labels: {path} holds no instances_*.json (COCO's object annotations)")
                return [json.load(zf.open(n)) for n in names]
        return [json.loads(path.read_text())]
    except (ValueError, zipfile.BadZipFile, UnicodeDecodeError) as e:
        raise SourceError(f"data.labels: {path} is not COCO annotations ({type(e).__name__}: {e})") from None


def coco_labels(path: Path, keys: list[str]) -> tuple[list[list[str]], list[str], list[str]]:
    """Each image's label set: the categories of its objects (COCO's instances annotations)."""
    entries: dict[str, set[str]] = {}
    unknown: set[str] = set()
    for doc in _coco_documents(path):
        try:
            categories = {c["id"]: c["name"] for c in doc["categories"]}
            files = {im["id"]: im["file_name"] for im in doc["images"]}
            for im in doc["images"]:
                entries.setdefault(im["file_name"], set())
            for a in doc["annotations"]:
                if a["category_id"] in categories:
                    entries[files[a["image_id"]]].add(categories[a["category_id"]])
                else:
                    unknown.add(str(a["category_id"]))
        except (KeyError, TypeError) as e:
            raise SourceError(f"data.labels: {path} is not COCO instances annotations (no {e})") from None
    names, _, _ = _apply([(f, sorted(n)) for f, n in entries.items()], keys)
    # Annotations list every image of their split: those not among the sources are no miss.
    return names, [], sorted(unknown)
