"""Readers for the standard array datasets: Fashion-MNIST (idx files), scikit-learn digits, CIFAR-10/100.

Each returns an :class:`~bigtransfer.data.sources.ArraySource` holding uint8 images in memory.
"""

from __future__ import annotations

import gzip
import math
import os
from pathlib import Path

import numpy as np

from ..files import open_regular
from .safe_pickle import safe_load
from .sampling import stratified_split
from .sources import ArraySource

FASHION_MNIST_DIR = (
    "/usr/share/datasets/fashion-mnist"  # where `apt-get install dataset-fashion-mnist` puts it
)
FASHION_MNIST_CLASSES = [
    "T-shirt/top",
    "Trouser",
    "Pullover",
    "Dress",
    "Coat",
    "Sandal",
    "Shirt",
    "Sneaker",
    "Bag",
    "Ankle boot",
]
FASHION_MNIST_FILES = {
    "train": ("train-images-idx3-ubyte", "train-labels-idx1-ubyte"),
    "test": ("t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte"),
}
IDX_IMAGES_MAGIC = 0x00000803  # unsigned bytes, 3 dimensions (count, rows, columns)
IDX_LABELS_MAGIC = 0x00000801  # unsigned bytes, 1 dimension (count)

# idx type codes (third magic byte) -> big-endian numpy dtypes.
_IDX_DTYPES = {0x08: ">u1", 0x09: ">i1", 0x0B: ">i2", 0x0C: ">i4", 0x0D: ">f4", 0x0E: ">f8"}


MAX_IDX_BYTES = 4 << 30  # the largest idx data this reads (Fashion-MNIST's training images are 47 MB)


def read_idx(path: str | os.PathLike, expected_magic: int | None = None) -> np.ndarray:
    """Read an idx file (gzip-compressed or not): magic, big-endian uint32 sizes, then the data.

    The header's sizes are checked (against `MAX_IDX_BYTES` and the data present) before the data is read, so a
    small compressed file cannot expand into gigabytes. Raises ValueError naming the file when the magic number is
    malformed or not ``expected_magic``, or when the data length does not match the header.
    """
    with open_regular(path) as raw_file:
        compressed = raw_file.read(2) == b"\x1f\x8b"
        raw_file.seek(0)
        stream = gzip.GzipFile(fileobj=raw_file) if compressed else raw_file
        try:
            return _read_idx_stream(stream, path, expected_magic)
        except (OSError, EOFError, gzip.BadGzipFile) as error:
            raise ValueError(f"{path}: not a readable idx file ({type(error).__name__}: {error})") from None


def _read_idx_stream(stream, path, expected_magic: int | None) -> np.ndarray:
    head = stream.read(4)
    if len(head) < 4:
        raise ValueError(f"{path}: too short for an idx header")
    magic = int.from_bytes(head, "big")
    type_code, ndim = head[2], head[3]
    if head[:2] != b"\x00\x00" or type_code not in _IDX_DTYPES or ndim == 0:
        raise ValueError(f"{path}: not an idx file (magic 0x{magic:08x})")
    if expected_magic is not None and magic != expected_magic:
        raise ValueError(f"{path}: idx magic 0x{magic:08x}, expected 0x{expected_magic:08x}")
    sizes = stream.read(4 * ndim)
    if len(sizes) < 4 * ndim:
        raise ValueError(f"{path}: truncated idx header")
    shape = tuple(int(n) for n in np.frombuffer(sizes, dtype=">u4"))
    dtype = np.dtype(_IDX_DTYPES[type_code])
    expected_bytes = math.prod(shape) * dtype.itemsize
    if expected_bytes > MAX_IDX_BYTES:
        raise ValueError(f"{path}: header says {shape} ({expected_bytes:,} bytes of data), more than {MAX_IDX_BYTES:,}")
    data = stream.read(expected_bytes + 1)
    if len(data) != expected_bytes:
        raise ValueError(
            f"{path}: header says {shape} ({expected_bytes} bytes of data) but the file holds "
            f"{len(data) if len(data) <= expected_bytes else 'more'}"
        )
    return np.frombuffer(data, dtype=dtype).reshape(shape).astype(dtype.newbyteorder("="))


def _find_file(root: Path, stem: str) -> Path:
    for name in (stem + ".gz", stem):
        if (root / name).is_file():
            return root / name
    raise FileNotFoundError(
        f"{root / stem}(.gz) not found; on Debian `apt-get install dataset-fashion-mnist` provides {FASHION_MNIST_DIR}"
    )


def load_fashion_mnist(root: str | os.PathLike = FASHION_MNIST_DIR, split: str = "train") -> ArraySource:
    """Fashion-MNIST from its four idx files in ``root`` (``.gz`` or not); split "train" (60k) or "test" (10k).

    Images are 28x28 gray (returned as RGB PIL images); classes are :data:`FASHION_MNIST_CLASSES`.
    """
    if split not in FASHION_MNIST_FILES:
        raise ValueError(f"Fashion-MNIST split must be 'train' or 'test', got {split!r}")
    root = Path(root)
    image_stem, label_stem = FASHION_MNIST_FILES[split]
    image_path, label_path = _find_file(root, image_stem), _find_file(root, label_stem)
    images = read_idx(image_path, IDX_IMAGES_MAGIC)
    labels = read_idx(label_path, IDX_LABELS_MAGIC)
    if len(images) != len(labels):
        raise ValueError(
            f"{image_path} holds {len(images)} images but {label_path} holds {len(labels)} labels"
        )
    return ArraySource(
        images, labels.astype(np.int64), FASHION_MNIST_CLASSES, f"fashion-mnist:{root}:{split}"
    )


def load_digits(split: str = "train", test_fraction: float = 0.2, seed: int = 0) -> ArraySource:
    """scikit-learn's 1,797 8x8 digits (values 0..16 scaled to 0..255), with a seeded stratified split.

    ``split`` is "train" or "test"; the test part is ``test_fraction`` of every class; "all" is all 1,797.
    """
    if split not in ("train", "test", "all"):
        raise ValueError(f"digits split must be 'train', 'test' or 'all', got {split!r}")
    try:
        from sklearn.datasets import load_digits as sklearn_load_digits
    except ImportError as error:  # scikit-learn is an optional dependency (the `train` extra)
        raise ImportError(
            "the digits dataset needs scikit-learn: pip install 'bigtransfer[train]'"
        ) from error
    bunch = sklearn_load_digits()
    images = np.round(bunch.images * (255.0 / 16.0)).clip(0, 255).astype(np.uint8)
    labels = bunch.target.astype(np.int64)
    train, test = stratified_split(labels, test_fraction, seed)
    keep = np.arange(len(labels)) if split == "all" else train if split == "train" else test
    classes = [str(name) for name in bunch.target_names]
    return ArraySource(images[keep], labels[keep], classes, f"digits:{split}")


def _get(record: dict, key: str, path: Path):
    """CIFAR pickles written by Python 2 have bytes keys; accept str keys too."""
    for candidate in (key.encode(), key):
        if candidate in record:
            return record[candidate]
    raise ValueError(f"{path}: missing key {key!r} (keys: {sorted(map(str, record))})")


def _integer_list(values, where: str) -> np.ndarray:
    """A flat list (or 1-D integer array) of integers as int64; anything else is refused before numpy walks it."""
    if isinstance(values, np.ndarray) and values.ndim == 1 and values.dtype.kind in "iu":
        return values.astype(np.int64)
    if not isinstance(values, list) or not all(type(value) is int for value in values):
        raise ValueError(f"{where} must be a list of integers")
    return np.asarray(values, dtype=np.int64)


def _names(values, where: str) -> list[str]:
    if not isinstance(values, list) or not all(isinstance(value, (bytes, str)) for value in values):
        raise ValueError(f"{where} must be a list of names")
    try:
        return [value.decode() if isinstance(value, bytes) else value for value in values]
    except UnicodeDecodeError as error:
        raise ValueError(f"{where}: a name is not UTF-8 ({error.reason})") from None


def _load_cifar_batch(path: Path, label_key: str, num_classes: int) -> tuple[np.ndarray, np.ndarray]:
    if not path.is_file():
        raise FileNotFoundError(f"CIFAR file not found: {path}")
    record = safe_load(path)
    if not isinstance(record, dict):
        raise ValueError(f"{path}: expected a dict, got {type(record).__name__}")
    data, labels = _get(record, "data", path), _get(record, label_key, path)
    if not isinstance(data, np.ndarray) or data.dtype != np.uint8 or data.ndim != 2 or data.shape[1] != 3 * 32 * 32:
        shown = f"{data.dtype} {data.shape}" if isinstance(data, np.ndarray) else type(data).__name__
        raise ValueError(f"{path}: data must be a uint8 array of shape (N, 3072), got {shown}")
    labels = _integer_list(labels, f"{path}: {label_key}")
    if len(labels) != len(data):
        raise ValueError(f"{path}: {len(data)} images but {len(labels)} labels")
    if len(labels) and (labels.min() < 0 or labels.max() >= num_classes):
        raise ValueError(f"{path}: labels outside [0, {num_classes})")
    return data.reshape(-1, 3, 32, 32).transpose(0, 2, 3, 1), labels  # rows are channel-major


def load_cifar(root: str | os.PathLike, split: str = "train", num_classes: int = 10) -> ArraySource:
    """CIFAR-10 or CIFAR-100 (fine labels) from the python pickles, loaded without running pickled code.

    ``root`` is ``cifar-10-batches-py`` / ``cifar-100-python`` or the folder containing it. CIFAR-10 reads
    ``data_batch_*`` (train) or ``test_batch`` and ``batches.meta``; CIFAR-100 reads ``train`` or ``test``
    and ``meta``.
    """
    if split not in ("train", "test"):
        raise ValueError(f"CIFAR split must be 'train' or 'test', got {split!r}")
    if num_classes not in (10, 100):
        raise ValueError(f"num_classes must be 10 or 100, got {num_classes}")
    root = Path(root)
    folder_name = "cifar-10-batches-py" if num_classes == 10 else "cifar-100-python"
    if (root / folder_name).is_dir():
        root = root / folder_name
    if num_classes == 10:
        files = sorted(root.glob("data_batch_*")) if split == "train" else [root / "test_batch"]
        if not files:
            raise FileNotFoundError(f"no data_batch_* files in {root}")
        meta_path, names_key, label_key = root / "batches.meta", "label_names", "labels"
    else:
        files = [root / split]
        meta_path, names_key, label_key = root / "meta", "fine_label_names", "fine_labels"
    if not meta_path.is_file():
        raise FileNotFoundError(f"CIFAR meta file not found: {meta_path}")
    meta = safe_load(meta_path)
    if not isinstance(meta, dict):
        raise ValueError(f"{meta_path}: expected a dict, got {type(meta).__name__}")
    classes = _names(_get(meta, names_key, meta_path), f"{meta_path}: {names_key}")
    if len(classes) != num_classes:
        raise ValueError(f"{meta_path}: {len(classes)} class names, expected {num_classes}")
    batches = [_load_cifar_batch(path, label_key, num_classes) for path in files]
    images = np.concatenate([images for images, _ in batches])
    labels = np.concatenate([labels for _, labels in batches])
    return ArraySource(images, labels, classes, f"cifar{num_classes}:{root}:{split}")
