"""Where images come from before they become shards: folders, tar archives, HF and torchvision datasets.

Every source is a finite, indexable list of records (key, image, label) that can be read in any
order the shard writer asks for, so shuffling happens on indices, never on decoded images.
A label is the position of its class in the source's `classes` list: for folders and tars the
sorted class folder names; for HF and torchvision datasets the dataset's own label ids and order.
"""

from __future__ import annotations

import bz2
import gzip
import inspect
import logging
import lzma
import os
import shutil
import tarfile
import tempfile
from abc import ABC, abstractmethod
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import IO, Any

from PIL import Image

from vitcore.data.classes import label_relpaths, unique_class_names
from vitcore.data.download import fetch, is_url

log = logging.getLogger(__name__)

IMAGE_SUFFIXES = frozenset({".jpg", ".jpeg", ".png", ".bmp", ".gif", ".webp", ".tif", ".tiff", ".ppm", ".pgm"})
TAR_SUFFIXES = (".tar", ".tar.gz", ".tgz", ".tar.bz2", ".tbz2", ".tar.xz", ".txz")
HF_FILE_SUFFIXES = {".parquet": "parquet", ".arrow": "arrow", ".csv": "csv", ".json": "json", ".jsonl": "json"}
HF_SAVED_MARKERS = ("dataset_info.json", "dataset_dict.json", "state.json")
_DECOMPRESSORS = {b"\x1f\x8b": gzip.open, b"BZh": bz2.open, b"\xfd7zXZ\x00": lzma.open}


@dataclass(frozen=True)
class Record:
    """One source image: a unique key (no dots), encoded bytes or a PIL image, and its label."""

    key: str
    image: bytes | Image.Image
    label: int | None


class Source(ABC):
    """A finite list of images readable in any order; use it as a context manager to release files."""

    description: str
    classes: list[str] | None
    sequential = False  # True: reads fast only in its stored order (a stream), so it is not shuffled

    @abstractmethod
    def __len__(self) -> int: ...

    @abstractmethod
    def read(self, order: Iterable[int]) -> Iterator[Record]:
        """Yield the records at the given positions, in that order."""

    @abstractmethod
    def labels(self) -> list[int | None]:
        """Every position's label (None: unlabeled), without reading the images."""

    def __iter__(self) -> Iterator[Record]:
        return self.read(range(len(self)))

    def close(self) -> None:
        """Release open files; a no-op for sources that hold none."""

    def __enter__(self) -> Source:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def is_image_name(name: str) -> bool:
    """Whether a file name has an image extension (and is not a hidden file such as ._x.jpg)."""
    base = PurePosixPath(name).name
    return not base.startswith(".") and PurePosixPath(base).suffix.lower() in IMAGE_SUFFIXES


def path_key(relpath: str) -> str:
    """A WebDataset key for a relative path: webdataset splits keys at the first dot of the basename."""
    return relpath.replace(".", "_")


class _PathListSource(Source):
    """Shared logic of folders and tars: images named by relative paths, labeled by parent folder."""

    def __init__(self, description: str, relpaths: list[str], labeled: bool | None) -> None:
        if not relpaths:
            raise ValueError(f"no images found in {description}")
        self.description = description
        self.relpaths = relpaths
        self.classes, self._labels = label_relpaths(relpaths, labeled)

    def __len__(self) -> int:
        return len(self.relpaths)

    def labels(self) -> list[int | None]:
        return list(self._labels)

    def read(self, order: Iterable[int]) -> Iterator[Record]:
        for i in order:
            yield Record(path_key(self.relpaths[i]), self._bytes(i), self._labels[i])

    @abstractmethod
    def _bytes(self, i: int) -> bytes: ...


class FolderSource(_PathListSource):
    """An image folder: `root/<class>/<image>` (labeled) or any nesting of images (unlabeled)."""

    def __init__(self, root: str | Path, labeled: bool | None = None) -> None:
        self.root = Path(root)
        if not self.root.is_dir():
            raise FileNotFoundError(f"image folder not found: {self.root}")
        super().__init__(str(self.root), sorted(_visible_images(self.root)), labeled)

    def _bytes(self, i: int) -> bytes:
        return (self.root / self.relpaths[i]).read_bytes()


def _visible_images(root: Path) -> Iterator[str]:
    """Relative paths of the image files under `root`, passing over hidden files and folders
    (.ipynb_checkpoints, .DS_Store, ...), which are never classes or samples."""
    for folder, dirs, files in os.walk(root):
        dirs[:] = [d for d in dirs if not d.startswith(".")]  # os.walk descends into what is left
        for f in files:
            if is_image_name(f) and not f.startswith("."):
                yield (Path(folder) / f).relative_to(root).as_posix()


def _seekable_tar(path: Path) -> tuple[tarfile.TarFile, IO[bytes] | None]:
    """Open a tar for random access; a compressed one is first decompressed into a temporary file.

    Seeking backwards in a gzip/bz2/xz stream restarts decompression from the start, which would
    make shuffled reads quadratic; one sequential decompression is far cheaper. Nothing is extracted.
    """
    with open(path, "rb") as f:
        magic = f.read(6)
    opener = next((fn for sig, fn in _DECOMPRESSORS.items() if magic.startswith(sig)), None)
    if opener is None:
        return tarfile.open(path, mode="r:"), None
    log.info("decompressing %s to a temporary file for random access", path)
    plain = tempfile.TemporaryFile()
    with opener(path, "rb") as compressed:
        shutil.copyfileobj(compressed, plain, length=1 << 20)
    plain.seek(0)
    return tarfile.open(fileobj=plain, mode="r:"), plain


def _select_split(names: list[str], split: str | None) -> dict[str, str]:
    """Map archive member names to paths relative to the selected folder.

    With `split` ("train", or a deeper "imagenette2-224/train"), the folder is the first run of
    path components equal to it; without, it is the folder shared by all members (archives
    usually wrap everything in one top-level folder).
    """
    if split is None:
        common = os.path.commonpath([os.path.dirname(n) for n in names]) if names else ""
        return {n: n[len(common):].lstrip("/") for n in names}
    wanted = PurePosixPath(split.strip("/")).parts
    selected = {}
    for name in names:
        parts = PurePosixPath(name).parts
        for start in range(len(parts) - len(wanted)):
            if parts[start:start + len(wanted)] == wanted:
                selected[name] = PurePosixPath(*parts[start + len(wanted):]).as_posix()
                break
    return selected


class TarSource(_PathListSource):
    """Images inside a tar archive (optionally compressed), read in place; class = parent folder."""

    def __init__(self, path: str | Path, split: str | None = None, labeled: bool | None = None) -> None:
        self.path = Path(path)
        if not self.path.is_file():
            raise FileNotFoundError(f"tar archive not found: {self.path}")
        self._tar, self._plain = _seekable_tar(self.path)
        try:
            members = {m.name.removeprefix("./"): m for m in self._tar.getmembers()
                       if m.isfile() and is_image_name(m.name)}
            relative = _select_split(sorted(members), split)
            self._members = [members[name] for name in relative]
            where = f"{self.path}" + (f" (folder {split!r} inside the archive)" if split else "")
            super().__init__(where, list(relative.values()), labeled)
        except BaseException:  # no images, no such split, a corrupt archive: release the (temporary) files
            self.close()
            raise

    def _bytes(self, i: int) -> bytes:
        with self._tar.extractfile(self._members[i]) as f:
            return f.read()

    def close(self) -> None:
        self._tar.close()
        if self._plain is not None:
            self._plain.close()


def hf_columns(features: Any, description: str) -> tuple[str, str | None, list[str] | None]:
    """A `datasets` feature set's first Image column, its first ClassLabel column (None: unlabeled)
    and that label's class names in id order."""
    import datasets

    image_col = next((c for c, f in features.items() if isinstance(f, datasets.Image)), None)
    if image_col is None:
        raise ValueError(f"{description} has no Image column (columns: {list(features)})")
    label_col = next((c for c, f in features.items() if isinstance(f, datasets.ClassLabel)), None)
    return image_col, label_col, None if label_col is None else unique_class_names(features[label_col].names)


def hf_record(i: int, row: dict[str, Any], image_col: str, label_col: str | None) -> Record:
    """Row `i` of a `datasets` table whose image column is not decoded, as a record keyed by `i`."""
    image = row[image_col]
    data = image["bytes"] if image.get("bytes") is not None else Path(image["path"]).read_bytes()
    target = None if label_col is None else row[label_col]
    # HF marks an unlabeled row with -1: written without a label (MPP can use it; a labeled
    # stream skips and counts it), never as the last class by negative indexing.
    return Record(f"{i:08d}", data, None if target is None or target < 0 else int(target))


class HFSource(Source):
    """A Hugging Face `datasets` split: the first Image column, and the first ClassLabel as label.

    Labels are the ClassLabel ids and `classes` its names in id order (see `unique_class_names`).
    """

    def __init__(self, dataset: Any, description: str) -> None:
        import datasets

        image_col, label_col, self.classes = hf_columns(dataset.features, description)
        if len(dataset) == 0:
            raise ValueError(f"no images found in {description}")
        self.description = description
        # Encoded bytes (or a file path) instead of decoded images: the writer re-encodes anyway.
        self._data = dataset.cast_column(image_col, datasets.Image(decode=False))
        self._image_col, self._label_col = image_col, label_col

    def __len__(self) -> int:
        return len(self._data)

    def labels(self) -> list[int | None]:
        if self._label_col is None:
            return [None] * len(self._data)
        return [None if t is None or t < 0 else int(t) for t in self._data[self._label_col]]

    def read(self, order: Iterable[int]) -> Iterator[Record]:
        for i in order:
            yield hf_record(int(i), self._data[int(i)], self._image_col, self._label_col)


def open_hf(name_or_path: str, split: str | None) -> HFSource:
    """Open a saved (`save_to_disk`) dataset, a local data file or folder, or a hub dataset name."""
    import datasets

    path = Path(name_or_path)
    if path.is_dir() and any((path / m).exists() for m in HF_SAVED_MARKERS):
        loaded = datasets.load_from_disk(str(path))
    elif path.is_file() and path.suffix.lower() in HF_FILE_SUFFIXES:
        loaded = datasets.load_dataset(HF_FILE_SUFFIXES[path.suffix.lower()], data_files=str(path))
    else:
        loaded = datasets.load_dataset(name_or_path)
    if isinstance(loaded, datasets.DatasetDict):
        split = split or "train"
        if split not in loaded:
            raise ValueError(f"{name_or_path} has no split {split!r} (splits: {sorted(loaded)})")
        loaded = loaded[split]
    return HFSource(loaded, f"{name_or_path}" + (f" [{split}]" if split else ""))


class TorchvisionSource(Source):
    """A `torchvision.datasets` class by name (CIFAR10, CIFAR100, ...), downloaded on first use.

    Labels are the dataset's targets and `classes` its `classes` list in target order, with
    repeated names made unique (see `unique_class_names`); without `classes`, images are unlabeled.
    """

    def __init__(self, name: str, split: str, root: str | Path) -> None:
        import torchvision

        cls = getattr(torchvision.datasets, name, None)
        if not inspect.isclass(cls):
            raise ValueError(f"unknown torchvision dataset {name!r}")
        params = inspect.signature(cls).parameters
        # Older datasets take train=bool, newer ones split=str.
        if "train" in params:
            if split not in ("train", "test"):
                raise ValueError(f"torchvision:{name} has the splits train and test, not {split!r}")
            which: dict[str, Any] = {"train": split == "train"}
        else:
            which = {"split": split}
        self._data = cls(root=str(root), download=True, **which)
        if len(self._data) == 0:
            raise ValueError(f"no images found in torchvision dataset {name} [{split}]")
        self.description = f"torchvision:{name} [{split}]"
        self._prefix = f"{name}_{split}"
        names = getattr(self._data, "classes", None)
        self.classes = unique_class_names(list(names)) if names else None

    def __len__(self) -> int:
        return len(self._data)

    def labels(self) -> list[int | None]:
        if not self.classes:
            return [None] * len(self._data)
        targets = getattr(self._data, "targets", None)  # CIFAR, MNIST, ImageFolder-like datasets
        if targets is None:
            raise ValueError(f"{self.description} does not list its labels; a per-class subset needs them")
        return [int(t) for t in targets]

    def read(self, order: Iterable[int]) -> Iterator[Record]:
        for i in order:
            image, target = self._data[int(i)]
            label = int(target) if self.classes else None
            yield Record(f"{self._prefix}_{i:08d}", image, label)


def open_source(
    spec: str,
    *,
    split: str | None = None,
    labeled: bool | None = None,
    download_dir: str | Path = "data",
    streaming: bool = False,
) -> Source:
    """Open a source from its spec; `streaming` reads parquet data (`hf:NAME`, a .parquet file or a
    folder of them) as it is stored, without materialising it (see `vitcore.data.parquet_stream`).

    - `hf:NAME_OR_PATH`: a Hugging Face dataset (hub name, local file/folder, or save_to_disk folder)
    - `torchvision:NAME`: a torchvision dataset class, downloaded into `download_dir`
    - an `http(s)://` URL of an archive (e.g. the official Imagenette .tgz): downloaded once into
      `download_dir`, then read as the archive
    - a `.tar[.gz|.bz2|.xz]` file: images inside the archive, `split` picks a folder in it
    - a folder: saved HF dataset if it has one's markers, otherwise an image folder (`split` = subfolder)
    - a `.parquet/.arrow/.csv/.json/.jsonl` file: loaded with `datasets`
    """
    if streaming:
        from vitcore.data.parquet_stream import open_stream  # it builds on this module's Source

        return open_stream(spec, split)
    if spec.startswith("hf:"):
        return open_hf(spec[3:], split)
    if spec.startswith("torchvision:"):
        return TorchvisionSource(spec.split(":", 1)[1], split or "train", download_dir)
    path = fetch(spec, download_dir) if is_url(spec) else Path(spec)
    if not path.exists():
        raise FileNotFoundError(f"source not found: {spec} (hub datasets: hf:NAME, torchvision: torchvision:NAME)")
    if path.is_file() and path.name.lower().endswith(TAR_SUFFIXES):
        return TarSource(path, split, labeled)
    if path.is_file() and path.suffix.lower() in HF_FILE_SUFFIXES:
        return open_hf(spec, split)
    if path.is_dir() and any((path / m).exists() for m in HF_SAVED_MARKERS):
        return open_hf(spec, split)
    if path.is_dir():
        root = path / split if split else path
        if not root.is_dir():
            raise FileNotFoundError(f"split folder not found: {root}")
        return FolderSource(root, labeled)
    raise ValueError(f"unsupported source: {spec} (expected a folder, a tar archive, or a data file)")
