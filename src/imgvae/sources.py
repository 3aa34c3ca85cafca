"""Where images come from: folders, COCO zip files read in place, embedded photos.

A source is an indexed list of encoded image files; decoding and preprocessing
live in data.py. Sources are picklable and safe to use from DataLoader workers.
"""

from __future__ import annotations

import bisect
import os
import zipfile
from pathlib import Path

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".webp", ".bmp")


class SourceError(ValueError):
    """A source that cannot be used (missing path, no images, unreadable)."""


def _is_image_name(name: str) -> bool:
    return name.lower().endswith(IMAGE_EXTENSIONS) and not Path(name).name.startswith(".")


class FileListSource:
    """A fixed list of image files on disk."""

    def __init__(self, paths: list[Path], name: str):
        self.paths = [Path(p) for p in paths]
        self.name = name

    def __len__(self) -> int:
        return len(self.paths)

    def key(self, i: int) -> str:
        return str(self.paths[i])

    def read_bytes(self, i: int) -> bytes:
        return self.paths[i].read_bytes()


class FolderSource(FileListSource):
    """Every image below a folder, recursively, in sorted order."""

    def __init__(self, root: Path):
        root = Path(root)
        paths = sorted(p for p in root.rglob("*") if p.is_file() and _is_image_name(p.name))
        super().__init__(paths, name=str(root))


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
            raise SourceError(f"{self.path}: not a readable zip file ({e})") from None
        self.members = sorted(i.filename for i in infos if not i.filename.startswith("__MACOSX/"))
        self._zip: zipfile.ZipFile | None = None
        self._pid: int | None = None

    def __len__(self) -> int:
        return len(self.members)

    def key(self, i: int) -> str:
        return f"{self.path}:{self.members[i]}"

    def read_bytes(self, i: int) -> bytes:
        if self._zip is None or self._pid != os.getpid():
            self._zip = zipfile.ZipFile(self.path)
            self._pid = os.getpid()
        return self._zip.read(self.members[i])

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


def open_source(spec: str):
    """A source from its config string: prepared cache, folder, .zip file or embedded:SPLIT."""
    if spec.startswith("embedded:"):
        split = spec.split(":", 1)[1]
        return FileListSource(embedded_photo_paths(split), name=spec)
    from .cache import PARTIAL_SUFFIX, CacheSource, is_cache  # cache builds on this module

    path = Path(spec).expanduser()
    if not path.exists():
        raise SourceError(f"data source {spec!r} does not exist")
    if path.name.endswith(PARTIAL_SUFFIX):
        raise SourceError(f"{spec} is an unfinished cache: run the same imgvae prepare again to complete it")
    if is_cache(path):
        source = CacheSource(path)
    elif path.is_dir():
        source = FolderSource(path)
    elif zipfile.is_zipfile(path):
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

    def read_bytes(self, i: int) -> bytes:
        source, j = self.locate(i)
        return source.read_bytes(j)


def open_sources(specs: list[str]) -> ConcatSource:
    if not specs:
        raise SourceError("no data source given")
    return ConcatSource([open_source(s) for s in specs])
