"""Image sources: indexable collections of ``(PIL RGB image, int label)`` whose labels are known up front.

Every source exposes ``labels`` (int64 numpy array), ``classes`` (names, index = label), ``len()``,
``source[i] -> (PIL.Image.Image in RGB, int)``, ``path(i)`` (a file path or a description used in error
messages) and ``image_size()`` (a typical ``(height, width)`` for the BiT-HyperRule). Labels never require
decoding an image, so few-shot sampling and splitting are cheap.

File-backed sources raise :class:`BadImageError` (naming the file) for images that cannot be read.
"""

from __future__ import annotations

import csv
import hashlib
import io
import json
import os
from collections.abc import Sequence
from pathlib import Path

import numpy as np
from PIL import Image

from ..config import LIMITS
from ..errors import BadImageError
from ..files import read_bytes
from ..images import decode_image, load_image
from .sampling import stratified_split

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".gif", ".webp", ".tif", ".tiff")

# Header names recognised in the first row of a CSV file (first column).
# "val" is an alias of "test"; "all" is a whole folder or file, unsplit (what a separate evaluation set means).
SPLITS = ("train", "test", "val", "all")
_CSV_HEADER_NAMES = {"path", "file", "filename", "file_name", "image", "image_path", "filepath"}


class ImageSource:
    """Base class: subclasses set ``labels`` and ``classes`` and implement ``__getitem__`` and ``path``."""

    labels: np.ndarray
    classes: list[str]

    def __len__(self) -> int:
        return len(self.labels)

    @property
    def num_classes(self) -> int:
        return len(self.classes)

    def __getitem__(self, index: int) -> tuple[Image.Image, int]:
        raise NotImplementedError

    def load(self, index: int, min_size: int | tuple[int, int] | None = None) -> tuple[Image.Image, int]:
        """``source[index]``, decoded no smaller than ``min_size`` needs (see `bigtransfer.images.decode_image`):
        file sources decode JPEGs at reduced size, in-memory sources ignore it."""
        return self[index]

    def load_many(self, indices: Sequence[int], min_size: int | tuple[int, int] | None = None,
                  ) -> list[tuple[Image.Image, int] | BadImageError]:
        """`load` of several indices, with a BadImageError in place of each unreadable image; sources in object
        storage fetch them together."""
        loaded: list[tuple[Image.Image, int] | BadImageError] = []
        for index in indices:
            try:
                loaded.append(self.load(int(index), min_size))
            except BadImageError as error:
                loaded.append(error)
        return loaded

    def damage(self) -> list[tuple[str, str]]:
        """(path, reason) of damage found when the source was opened that lost images it cannot list one by one
        (a truncated shard); empty for most sources."""
        return []

    def path(self, index: int) -> str:
        raise NotImplementedError

    def image_size(self) -> tuple[int, int]:
        """A typical ``(height, width)`` of the images (the median over a few, read from headers only)."""
        raise NotImplementedError

    def fingerprint(self) -> str:
        """What this source holds, in one line: example and class counts and a SHA-256 of the class names, the
        labels and `_identity()` (file paths, or pixel bytes). A resumed run refuses data whose fingerprint
        changed (classes renamed, images added, removed or relabelled)."""
        digest = hashlib.sha256()
        digest.update(json.dumps(list(self.classes)).encode("utf-8"))
        digest.update(np.ascontiguousarray(self.labels, dtype=np.int64).tobytes())
        for part in self._identity():
            digest.update(part)
        return f"{len(self)} examples, {self.num_classes} classes, sha256 {digest.hexdigest()[:16]}"

    def _identity(self):
        """Bytes that tell these examples apart from others with the same labels (subclasses say more)."""
        return ()

    def __repr__(self) -> str:
        return f"{type(self).__name__}({len(self)} images, {self.num_classes} classes)"


class ArraySource(ImageSource):
    """Images held in a uint8 array of shape (N, H, W) (gray) or (N, H, W, 3)."""

    def __init__(self, images: np.ndarray, labels: np.ndarray, classes: Sequence[str], name: str):
        images = np.asarray(images)
        if (
            images.dtype != np.uint8
            or images.ndim not in (3, 4)
            or (images.ndim == 4 and images.shape[3] != 3)
        ):
            raise ValueError(
                f"{name}: images must be uint8 (N, H, W) or (N, H, W, 3), got {images.dtype} {images.shape}"
            )
        if len(images) != len(labels):
            raise ValueError(f"{name}: {len(images)} images but {len(labels)} labels")
        self.images = images
        self.labels = np.asarray(labels, dtype=np.int64)
        self.classes = list(classes)
        self.name = name
        _check_label_range(self.labels, len(self.classes), name)

    def __getitem__(self, index: int) -> tuple[Image.Image, int]:
        image = Image.fromarray(self.images[index])
        return image.convert("RGB"), int(self.labels[index])

    def path(self, index: int) -> str:
        return f"{self.name}[{index}]"

    def _identity(self):
        yield str(self.images.shape).encode()
        yield np.ascontiguousarray(self.images).data

    def image_size(self) -> tuple[int, int]:
        return int(self.images.shape[1]), int(self.images.shape[2])


class FileSource(ImageSource):
    """Images stored as files: a list of paths and their labels."""

    def __init__(self, paths: Sequence[str], labels: np.ndarray, classes: Sequence[str], description: str):
        self.paths = [str(p) for p in paths]
        self.labels = np.asarray(labels, dtype=np.int64)
        self.classes = list(classes)
        self.description = description
        if len(self.paths) != len(self.labels):
            raise ValueError(f"{description}: {len(self.paths)} paths but {len(self.labels)} labels")
        _check_label_range(self.labels, len(self.classes), description)

    def __getitem__(self, index: int) -> tuple[Image.Image, int]:
        return load_image(self.paths[index]), int(self.labels[index])

    def load(self, index: int, min_size: int | tuple[int, int] | None = None) -> tuple[Image.Image, int]:
        return decode_image(self.paths[index], min_size), int(self.labels[index])

    def path(self, index: int) -> str:
        return self.paths[index]

    def _identity(self):
        yield "\n".join(self.paths).encode("utf-8", "surrogateescape")

    def image_size(self, samples: int = 16) -> tuple[int, int]:
        if not self.paths:
            raise ValueError(f"{self.description}: no images")
        picks = np.unique(np.linspace(0, len(self.paths) - 1, min(samples, len(self.paths))).astype(int))
        sizes = []
        for index in picks:
            try:
                with Image.open(self.paths[index]) as image:  # reads the header only
                    sizes.append((image.height, image.width))
            except (OSError, ValueError, SyntaxError) as error:
                raise BadImageError(self.paths[index], f"{type(error).__name__}: {error}") from error
        heights, widths = zip(*sizes, strict=True)
        return int(np.median(heights)), int(np.median(widths))

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.description!r}, {len(self)} images, {self.num_classes} classes)"


def _check_label_range(labels: np.ndarray, num_classes: int, name: str) -> None:
    if len(labels) and (labels.min() < 0 or labels.max() >= num_classes):
        raise ValueError(
            f"{name}: labels must lie in [0, {num_classes}), got [{labels.min()}, {labels.max()}]"
        )


def split_indices(labels: np.ndarray, split: str, val_fraction: float, seed: int, name: str) -> np.ndarray:
    """Indices of ``split`` ("train" or "test"/"val") in a seeded stratified split of one labelled set; "all" is
    every index."""
    if split == "all" or (split == "train" and val_fraction == 0):
        return np.arange(len(labels))
    if val_fraction <= 0 or val_fraction >= 1:
        raise ValueError(f"{name}: split {split!r} needs 0 < val_fraction < 1 or a separate validation set")
    train, held_out = stratified_split(labels, val_fraction, seed)
    return train if split == "train" else held_out


def _check_split(split: str) -> str:
    if split not in SPLITS:
        raise ValueError(f"split must be 'train', 'test', 'val' or 'all', got {split!r}")
    return split


# ------------------------------------------------------------------ image folder


def image_files(folder: Path) -> list[str]:
    """The image files under `folder`, sorted, recursively; symbolic links are followed, except to a folder that
    contains the one being listed (a loop, or a link out to the whole data set) or to one listed already, and
    FIFOs, devices and sockets are never listed."""
    files: list[str] = []
    seen: set[tuple[int, int]] = set()
    root = os.stat(folder.parent)

    def visit(directory: str, ancestors: frozenset) -> None:
        identity = os.stat(directory)
        key = (identity.st_dev, identity.st_ino)
        if key in seen or key in ancestors:
            return
        seen.add(key)
        with os.scandir(directory) as scan:
            entries = sorted((entry for entry in scan if not entry.name.startswith(".")), key=lambda entry: entry.name)
        files.extend(entry.path for entry in entries if entry.is_file() and entry.name.lower().endswith(IMAGE_EXTENSIONS))
        for entry in entries:  # files first, then sub-folders (os.walk's order)
            if entry.is_dir():
                visit(entry.path, ancestors | {key})

    visit(str(folder), frozenset({(root.st_dev, root.st_ino)}))
    return files


def _scan_image_folder(root: Path) -> dict[str, list[str]]:
    """``{class name: [file paths]}`` for a folder with one sub-folder per class."""
    if not root.is_dir():
        raise FileNotFoundError(f"image folder not found: {root}")
    class_folders = sorted(p for p in root.iterdir() if p.is_dir() and not p.name.startswith("."))
    if not class_folders:
        raise ValueError(f"image folder {root} has no class sub-folders (expected {root}/<class>/<image>)")
    found = {}
    for folder in class_folders:
        files = image_files(folder)
        if not files:
            raise ValueError(
                f"class folder {folder} contains no images (extensions {', '.join(IMAGE_EXTENSIONS)})"
            )
        found[folder.name] = files
    return found


class ImageFolderSource(FileSource):
    """A folder with one sub-folder per class (sorted names give the labels), searched recursively.

    Args:
        root: the folder.
        split: "train" or "test" ("val" is an alias of "test"), or "all": every image of ``root``.
        val_root: an optional separate folder of the same layout for the "test" split; class names are the
            union of both folders so labels agree between splits.
        val_fraction: without ``val_root``, the fraction of each class held out for "test" by a seeded
            stratified split; 0 puts every image in "train".
        seed: seed of that split.

    Example: ``ImageFolderSource("pets/", "train", val_fraction=0.2, seed=0)``.
    """

    def __init__(
        self,
        root: str | os.PathLike,
        split: str = "train",
        *,
        val_root: str | os.PathLike | None = None,
        val_fraction: float = 0.2,
        seed: int = 0,
    ):
        split = _check_split(split)
        root = Path(root)
        train_files = _scan_image_folder(root)
        val_files = _scan_image_folder(Path(val_root)) if val_root is not None else {}
        classes = sorted(set(train_files) | set(val_files))
        index_of = {name: i for i, name in enumerate(classes)}
        chosen = train_files if (val_root is None or split in ("train", "all")) else val_files
        paths = [p for name in sorted(chosen) for p in chosen[name]]
        labels = np.array([index_of[name] for name in sorted(chosen) for _ in chosen[name]], dtype=np.int64)
        description = str(root if chosen is train_files else val_root)
        if val_root is None:
            keep = split_indices(labels, split, val_fraction, seed, description)
            paths, labels = [paths[i] for i in keep], labels[keep]
        super().__init__(paths, labels, classes, description)
        self.root = root


# ------------------------------------------------------------------ CSV


MAX_CSV_BYTES = 1 << 30  # 1 GiB: ten million rows of paths


def _read_csv_rows(csv_path: Path) -> list[tuple[int, str, str]]:
    """``(line number, path, label)`` rows; a first row naming the columns is skipped."""
    text = read_bytes(csv_path, MAX_CSV_BYTES, "CSV list of images")
    rows = []
    line_number = 0
    try:
        decoded = text.decode("utf-8-sig")  # -sig: spreadsheets write a byte-order mark
        for line_number, row in enumerate(csv.reader(io.StringIO(decoded, newline="")), start=1):
            if not row or all(not cell.strip() for cell in row):
                continue
            if len(row) != 2:
                raise ValueError(f"{csv_path} row {line_number}: expected 'path,label', got {_shorter(row)}")
            path, label = row[0].strip(), row[1].strip()
            if not rows and line_number == 1 and path.lower() in _CSV_HEADER_NAMES:
                continue
            rows.append((line_number, path, label))
    except UnicodeDecodeError as error:
        raise ValueError(f"{csv_path} is not UTF-8 text (byte {error.start}: {error.reason}); save it as UTF-8") from None
    except csv.Error as error:  # e.g. a field past csv's size limit, a NUL byte
        raise ValueError(f"{csv_path} row {line_number + 1}: not a readable CSV row ({error})") from None
    if not rows:
        raise ValueError(f"{csv_path} lists no images")
    return rows


def _shorter(value) -> str:
    text = repr(value)
    return text if len(text) <= 120 else text[:117] + "..."


def _parse_int(text: str) -> int | None:
    """A non-negative integer label (one too long to be a class index reads as 10**18), else None (a name)."""
    if not (text.isascii() and text.isdigit()):
        return None
    return int(text) if len(text) <= 18 else 10**18


class CsvSource(FileSource):
    """A CSV file of ``path,label`` rows (a header row ``path,label`` is optional).

    Relative paths are relative to the CSV file. Labels are either all non-negative integers (used as is;
    classes are named "0".."max") or class names (sorted names give the labels). Rows pointing at missing
    files raise ValueError naming the row and the path.

    Args:
        csv_path: the file.
        split: "train" or "test" ("val" is an alias of "test"), or "all": every row of ``csv_path``.
        val_path: an optional CSV for the "test" split; classes are taken from both files.
        val_fraction, seed: without ``val_path``, a seeded stratified held-out split as for image folders.
    """

    def __init__(
        self,
        csv_path: str | os.PathLike,
        split: str = "train",
        *,
        val_path: str | os.PathLike | None = None,
        val_fraction: float = 0.2,
        seed: int = 0,
    ):
        split = _check_split(split)
        csv_path = Path(csv_path)
        tables = {"train": self._read(csv_path)}
        if val_path is not None:
            tables["test"] = self._read(Path(val_path))
        all_labels = [label for table in tables.values() for _, label in table]
        integer_labels = [_parse_int(label) for label in all_labels]
        if all(value is not None for value in integer_labels):
            largest = max(integer_labels)
            if largest >= LIMITS["num_labels"]:
                raise ValueError(f"{csv_path}: label {largest} would make {largest + 1:,} classes, more than "
                                 f"{LIMITS['num_labels']:,}; integer labels are class indices 0..N-1")
            classes = [str(i) for i in range(largest + 1)]
        else:
            classes = sorted(set(all_labels))
        index_of = {name: i for i, name in enumerate(classes)}
        table = tables["train" if (val_path is None or split in ("train", "all")) else "test"]
        paths = [path for path, _ in table]
        labels = np.array([index_of[label] for _, label in table], dtype=np.int64)
        description = str(csv_path if len(tables) == 1 or split in ("train", "all") else val_path)
        if val_path is None:
            keep = split_indices(labels, split, val_fraction, seed, description)
            paths, labels = [paths[i] for i in keep], labels[keep]
        super().__init__(paths, labels, classes, description)

    @staticmethod
    def _read(csv_path: Path) -> list[tuple[str, str]]:
        if not csv_path.is_file():
            raise FileNotFoundError(f"CSV file not found: {csv_path}")
        table = []
        for line_number, path, label in _read_csv_rows(csv_path):
            full = Path(path) if os.path.isabs(path) else csv_path.parent / path
            if not full.is_file():
                raise ValueError(f"{csv_path} row {line_number}: image file not found: {full}")
            if not label:
                raise ValueError(f"{csv_path} row {line_number}: empty label for {path}")
            table.append((str(full), label))
        return table
