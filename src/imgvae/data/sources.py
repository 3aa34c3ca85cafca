"""Where images come from: folders, COCO zip files read in place, embedded photos, and
caches that `imgvae prepare` (cache.py) wrote.

A file source is an indexed list of encoded image files, decoded in decode.py; a
cache holds ready views. Sources are picklable and safe to use from DataLoader workers.
"""

from __future__ import annotations

import bisect
import dataclasses
import json
import os
import zipfile
from pathlib import Path

import numpy as np

from imgvae.config import DataConfig, center_crop_size
from imgvae.data.decode import UnusableFile
from imgvae.errors import ImgvaeError

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".webp", ".bmp")

# A prepared cache folder (written by cache.prepare):
#   images.npy     (rows, 3, S, S) uint8, memory-mapped when read
#   keys.json      the source file of each row, a JSON list (any file name a file system allows);
#                  caches before it kept keys.txt, one key a line, which a name with a newline broke
#   valid.npy      rows that decoded (unreadable files leave a zero row, not listed)
#   manifest.json  format, preprocessing, sources, counts, skipped files
CACHE_FORMAT, CACHE_VERSION = "imgvae-cache", 1
MANIFEST, IMAGES, KEYS, VALID = "manifest.json", "images.npy", "keys.json", "valid.npy"
OLD_KEYS = "keys.txt"
PARTIAL_SUFFIX = ".partial"  # a cache being built; renamed when complete


class SourceError(ImgvaeError, ValueError):
    """A source that cannot be used (missing path, no images, unreadable)."""


def _is_image_name(name: str) -> bool:
    return name.lower().endswith(IMAGE_EXTENSIONS) and not Path(name).name.startswith(".")


def max_file_bytes(cfg: DataConfig) -> int:
    return int(cfg.max_file_mb * 2**20)


def _megabytes(size: int) -> str:
    return f"{size / 2**20:,.1f} MB" if size >= 2**20 else f"{size / 2**10:,.1f} KB"


def _too_large(size: int, limit: int) -> UnusableFile:
    return UnusableFile(f"too large: {_megabytes(size)} (data.max_file_mb is {limit / 2**20:.4g})")


def read_file(path: Path, limit: int) -> bytes:
    """A file's bytes, refused unread when it is larger than `limit` bytes."""
    size = os.stat(path).st_size
    if size > limit:
        raise _too_large(size, limit)
    with open(path, "rb") as f:
        return f.read(limit + 1)[:limit]  # a file that grew meanwhile is cut, and then fails to decode


class FileListSource:
    """A fixed list of image files on disk."""

    def __init__(self, paths: list[Path], name: str):
        self.paths = [Path(p) for p in paths]
        self.name = name

    def __len__(self) -> int:
        return len(self.paths)

    def key(self, i: int) -> str:
        return str(self.paths[i])

    def read_bytes(self, i: int, limit: int) -> bytes:
        return read_file(self.paths[i], limit)


def _image_files(root: Path) -> list[Path]:
    """Files with image names below root, recursively, in sorted order. Links to folders are
    followed, each folder once (a link loop ends there); names that are not readable files
    (dangling links, link loops) are listed too, so that reading them skips them with a reason."""
    found, seen = [], set()
    for folder, subfolders, files in os.walk(root, followlinks=True):
        identity = (os.stat(folder).st_dev, os.stat(folder).st_ino)
        if identity in seen:
            subfolders.clear()
            continue
        seen.add(identity)
        found += [Path(folder) / name for name in files if _is_image_name(name)]
    return sorted(found)


class FolderSource(FileListSource):
    """Every image below a folder, recursively, in sorted order."""

    def __init__(self, root: Path):
        super().__init__(_image_files(Path(root)), name=str(root))


class ZipSource:
    """Images inside a zip (e.g. COCO's train2017.zip), read without extracting.

    Each process opens its own handle: a ZipFile inherited through fork shares
    the file offset with its parent and would return corrupt bytes.
    """

    def __init__(self, path: Path):
        self.path = Path(path)
        self.name = str(self.path)
        try:
            with zipfile.ZipFile(self.path) as zf:
                infos = [i for i in zf.infolist() if not i.is_dir() and _is_image_name(i.filename)]
        except (zipfile.BadZipFile, OSError) as e:
            raise SourceError(f"{self.path}: a corrupt or truncated zip file ({e})") from None
        infos = sorted((i for i in infos if not i.filename.startswith("__MACOSX/")), key=lambda i: i.filename)
        self.members = [i.filename for i in infos]
        self.sizes = [i.file_size for i in infos]  # as declared: checked before a member is read
        self._zip: zipfile.ZipFile | None = None
        self._pid: int | None = None

    def __len__(self) -> int:
        return len(self.members)

    def key(self, i: int) -> str:
        return f"{self.path}:{self.members[i]}"

    def read_bytes(self, i: int, limit: int) -> bytes:
        if self.sizes[i] > limit:
            raise _too_large(self.sizes[i], limit)
        if self._zip is None or self._pid != os.getpid():
            self._zip = zipfile.ZipFile(self.path)
            self._pid = os.getpid()
        with self._zip.open(self.members[i]) as member:
            data = member.read(limit + 1)  # bounded even when the declared size lies
        if len(data) > limit:
            raise _too_large(len(data), limit)
        return data

    def __getstate__(self):
        state = self.__dict__.copy()
        state["_zip"] = None
        return state


def embedded_photo_paths(split: str) -> list[Path]:
    """Real photographs shipped inside the scikit-image and scikit-learn wheels.

    "train": astronaut, chelsea, rocket, motorcycle left/right, china;
    "eval" (held out): coffee, flower.
    """
    import skimage
    import sklearn.datasets

    skimage_data = Path(skimage.__file__).parent / "data"
    sklearn_images = Path(sklearn.datasets.__file__).parent / "images"
    splits = {
        "train": [
            skimage_data / "astronaut.png",
            skimage_data / "chelsea.png",
            skimage_data / "rocket.jpg",
            skimage_data / "motorcycle_left.png",
            skimage_data / "motorcycle_right.png",
            sklearn_images / "china.jpg",
        ],
        "eval": [skimage_data / "coffee.png", sklearn_images / "flower.jpg"],
    }
    if split not in splits:
        raise SourceError(f"embedded:{split} is unknown; use embedded:train or embedded:eval")
    missing = [str(p) for p in splits[split] if not p.is_file()]
    if missing:
        raise SourceError(f"embedded photos missing from the installed packages: {missing}")
    return splits[split]


# data.crop, views_per_image, eval_views_per_image "auto": the embedded photos are a few large
# photos, seen as many random crops (as `make demo` does); any other source as the seed's
# one centre crop per image.
AUTO_EMBEDDED = {"crop": "random", "views_per_image": 128, "eval_views_per_image": 13}
AUTO_OTHERS = {"crop": "center", "views_per_image": 1, "eval_views_per_image": 1}


def resolve_auto(cfg: DataConfig, source: ConcatSource) -> DataConfig:
    """cfg with its "auto" view settings decided for these sources."""
    embedded = all(s.name.startswith("embedded:") for s in source.sources)
    chosen = AUTO_EMBEDDED if embedded else AUTO_OTHERS
    return dataclasses.replace(cfg, **{k: v for k, v in chosen.items() if getattr(cfg, k) == "auto"})


def preprocessing_signature(cfg: DataConfig) -> dict:
    """What determines a cached view; a cache is only used with the same values."""
    return {"image_size": cfg.image_size, "crop": cfg.crop, "crop_size": center_crop_size(cfg),
            "exact_decode": cfg.exact_decode}


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
        self.skipped: dict[str, str] = manifest.get("skipped", {})  # {key: reason} left out when it was prepared
        self.origins: list[str] = manifest.get("sources", [])  # the sources it was prepared from
        self.labels: dict | None = manifest.get("labels")  # data.labels when it was prepared (labels.npy)
        self.valid = np.load(self.root / VALID)
        self.keys = read_keys(self.root)
        self._images, self._pid = None, None

    def __len__(self) -> int:
        return len(self.valid)

    def key(self, i: int) -> str:
        return self.keys[self.valid[i]]

    def image(self, i: int) -> np.ndarray:
        return np.array(self._mapped()[self.valid[i]])

    def rows(self) -> np.ndarray:
        """Every valid image, (N, 3, S, S) uint8 (memory-mapped: slices are read on use)."""
        images = self._mapped()
        return images if len(self.valid) == len(images) else images[self.valid]

    def _mapped(self) -> np.ndarray:
        if self._images is None or self._pid != os.getpid():
            self._images, self._pid = np.load(self.root / IMAGES, mmap_mode="r"), os.getpid()
        return self._images

    def check(self, cfg: DataConfig) -> None:
        wanted = preprocessing_signature(cfg)
        if self.preprocessing != wanted:
            diff = {k: (self.preprocessing.get(k), v) for k, v in wanted.items() if self.preprocessing.get(k) != v}
            details = ", ".join(f"data.{k}: cache {a!r}, run {b!r}" for k, (a, b) in diff.items())
            raise SourceError(f"cache {self.root} was prepared with other preprocessing ({details}); "
                              f"run imgvae prepare again or set the run's data keys to match")

    def __getstate__(self):
        return {**self.__dict__, "_images": None}


def write_keys(folder: Path, keys) -> None:
    """Every row's key, as a JSON list: names with newlines, any unicode, undecodable bytes survive."""
    (Path(folder) / KEYS).write_text(json.dumps(list(keys)))


def read_keys(folder: Path) -> list[str]:
    """The keys write_keys wrote, or an older folder's keys.txt (one key a line)."""
    folder = Path(folder)
    if (folder / KEYS).is_file():
        return json.loads((folder / KEYS).read_text())
    return (folder / OLD_KEYS).read_text().splitlines()


def _starts_like_zip(path: Path) -> bool:
    try:
        with open(path, "rb") as f:
            return f.read(4) == b"PK\x03\x04"
    except OSError:
        return False


def open_source(spec: str):
    """A source from its config string: prepared cache, folder, .zip file or embedded:SPLIT."""
    if spec.startswith("embedded:"):
        split = spec.split(":", 1)[1]
        return FileListSource(embedded_photo_paths(split), name=spec)
    path = Path(spec).expanduser()
    if not path.exists():
        raise SourceError(f"data source {spec!r} does not exist")
    if path.name.endswith(PARTIAL_SUFFIX):
        raise SourceError(f"{spec} is an unfinished cache: run the same imgvae prepare again to complete it")
    if is_cache(path):
        source = CacheSource(path)
    elif path.is_dir():
        source = FolderSource(path)
    elif path.suffix.lower() == ".zip" or _starts_like_zip(path):
        source = ZipSource(path)
    else:
        raise SourceError(f"data source {spec!r} is neither a folder nor a zip file")
    if len(source) == 0:
        raise SourceError(f"data source {spec!r} holds no image files ({', '.join(IMAGE_EXTENSIONS)})")
    return source


class ConcatSource:
    """Several sources seen as one list (e.g. train2017 + test2017)."""

    def __init__(self, sources: list):
        self.sources = sources
        self.offsets = [0]
        for s in sources:
            self.offsets.append(self.offsets[-1] + len(s))
        self.name = " + ".join(s.name for s in sources)

    def __len__(self) -> int:
        return self.offsets[-1]

    def locate(self, i: int):
        """-> (the source holding item i, its index there)."""
        k = bisect.bisect_right(self.offsets, i) - 1
        return self.sources[k], i - self.offsets[k]

    def key(self, i: int) -> str:
        source, j = self.locate(i)
        return source.key(j)

    def read_bytes(self, i: int, limit: int) -> bytes:
        source, j = self.locate(i)
        return source.read_bytes(j, limit)


def open_sources(specs: list[str]) -> ConcatSource:
    if not specs:
        raise SourceError("no data source given")
    return ConcatSource([open_source(s) for s in specs])
