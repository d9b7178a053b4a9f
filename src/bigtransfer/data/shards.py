"""Sharded data sets with random access, so that they train exactly like folders: WebDataset tar shards
(`wds:PATTERN`) and Hugging Face datasets / Parquet files (`hf:PATH`).

Both are indexed when opened (tar headers, Arrow columns; no image bytes are read), after which every rank and
worker of a run takes its share of one seeded order by index, every rank runs the same number of steps whatever
the shard count, and `--resume` continues bit-exactly, as for folders and CSV files.

- `wds:PATTERN`: local, uncompressed tar shards named by a brace pattern (`/data/in22k/shard-{000000..004094}.tar`),
  as webdataset and timm write them: members `KEY.jpg` / `.jpeg` / `.png` / `.webp` with `KEY.cls` (the class index
  as text) or `KEY.json` (`{"label": index}`). An `_info.json` beside the shards (written by `bigtransfer shard`)
  gives the class names. Remote shards (http, s3, `pipe:`) are refused: random access needs a file system.
- `hf:PATH`: a folder saved with `datasets.save_to_disk` (a DatasetDict's "train" and "test" splits are used as
  published splits), or a Parquet file or folder of them; the image column holds encoded bytes (datasets'
  `Image` feature), the label column ints (a `ClassLabel` gives the names). `hf:PATH#image=COL,label=COL` names
  other columns.
"""

from __future__ import annotations

import glob
import io
import json
import os
import tarfile
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from ..files import read_bytes, read_json
from ..images import MemoryImage, decode_image
from .sources import BadImageError, ImageSource

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".webp")
LABEL_SUFFIXES = (".cls", ".json")
MAX_LABEL_BYTES = 64 << 10  # a .cls or .json label member
MAX_IMAGE_BYTES = 256 << 20  # an encoded image member
MAX_SHARD_MEMBERS = 10_000_000
INFO_NAME = "_info.json"


def expand_pattern(pattern: str) -> list[str]:
    """The shard paths of a brace pattern (webdataset's expansion), or of a glob."""
    if "://" in pattern or pattern.startswith("pipe:"):
        raise ValueError(f"wds:{pattern}: only local shard files are read (random access, exact resume); copy or "
                         "mount remote shards first")
    if "{" in pattern:
        try:
            from webdataset.shardlists import expand_urls
        except ImportError as error:
            raise ImportError("wds: brace patterns need webdataset: pip install 'bigtransfer[wds]'") from error
        return list(expand_urls(pattern))
    return sorted(glob.glob(pattern)) or [pattern]


class StoredImageSource(ImageSource):
    """A source whose images are encoded bytes it reads by index (`stored_bytes`), decoded as image files are."""

    def stored_bytes(self, index: int) -> bytes:
        raise NotImplementedError

    def __getitem__(self, index: int) -> tuple[Image.Image, int]:
        return self.load(index)

    def load(self, index: int, min_size: int | tuple[int, int] | None = None) -> tuple[Image.Image, int]:
        return decode_image(MemoryImage(self.stored_bytes(index), self.path(index)), min_size), int(self.labels[index])

    def image_size(self, samples: int = 16) -> tuple[int, int]:
        """The median (height, width) over a few images, read from their headers."""
        picks = np.unique(np.linspace(0, len(self) - 1, min(samples, len(self))).astype(int))
        sizes = []
        for index in picks:
            try:
                with Image.open(io.BytesIO(self.stored_bytes(int(index)))) as image:  # the header only
                    sizes.append((image.height, image.width))
            except (OSError, ValueError, SyntaxError) as error:
                raise BadImageError(self.path(int(index)), f"{type(error).__name__}: {error}") from error
        heights, widths = zip(*sizes, strict=True)
        return int(np.median(heights)), int(np.median(widths))


class TarShardSource(StoredImageSource):
    """Samples of local WebDataset tar shards, indexed by their tar headers (see the module doc)."""

    def __init__(self, pattern: str):
        self.pattern = pattern
        self.shards = expand_pattern(pattern)
        missing = [path for path in self.shards if not os.path.isfile(path)]
        if missing:
            raise FileNotFoundError(f"wds:{pattern}: {len(missing)} of {len(self.shards)} shard file(s) not found, "
                                    f"e.g. {missing[0]}")
        known = _recorded_sizes(Path(self.shards[0]).parent / INFO_NAME)
        shard_of, offsets, sizes, keys, labels = [], [], [], [], []
        for number, shard in enumerate(self.shards):
            index = read_index(shard, known.get(os.path.basename(shard)))
            shard_of.append(np.full(len(index), number, np.int64))
            offsets.append(index["offset"])
            sizes.append(index["size"])
            labels.append(index["label"])
            keys.extend(key.decode("utf-8", "surrogateescape") for key in index["key"])
        if not keys:
            raise ValueError(f"wds:{pattern}: no samples (an image member with a .cls or .json label) in "
                             f"{len(self.shards)} shard(s)")
        self._shard, self._offset, self._size = (np.concatenate(values).astype(np.int64)
                                                 for values in (shard_of, offsets, sizes))
        self._keys = keys
        self.labels = np.concatenate(labels).astype(np.int64)
        self.classes = _class_names(Path(self.shards[0]).parent / INFO_NAME, int(self.labels.max()) + 1, pattern)
        if self.labels.min() < 0 or self.labels.max() >= len(self.classes):
            raise ValueError(f"wds:{pattern}: labels must lie in [0, {len(self.classes)}), found "
                             f"{int(self.labels.min())}..{int(self.labels.max())}")

    def stored_bytes(self, index: int) -> bytes:
        with open(self.shards[self._shard[index]], "rb") as handle:
            handle.seek(int(self._offset[index]))
            return handle.read(int(self._size[index]))

    def path(self, index: int) -> str:
        return f"{self.shards[self._shard[index]]}#{self._keys[index]}"

    def _identity(self):
        for shard in self.shards:
            yield f"{shard} {os.path.getsize(shard)}".encode("utf-8", "surrogateescape")

    def __repr__(self) -> str:
        return f"TarShardSource({self.pattern!r}, {len(self)} images, {self.num_classes} classes)"


INDEX_DTYPE = np.dtype([("offset", "<i8"), ("size", "<i8"), ("label", "<i8"), ("key", "S128")])


def index_path(shard: str | os.PathLike) -> Path:
    """The index `bigtransfer shard` writes beside each shard: shard-000000.tar -> shard-000000.idx.npy."""
    shard = Path(shard)
    return shard.with_name(shard.name[: -len(".tar")] + ".idx.npy" if shard.name.endswith(".tar") else shard.name + ".idx.npy")


def read_index(shard: str, recorded_bytes: int | None) -> np.ndarray:
    """The samples of one shard (INDEX_DTYPE): from its .idx.npy when _info.json records this shard's size and the
    file still has it, else by reading every tar header."""
    sidecar = index_path(shard)
    if recorded_bytes is not None and sidecar.is_file() and os.path.getsize(shard) == recorded_bytes:
        data = read_bytes(sidecar, MAX_SHARD_MEMBERS * INDEX_DTYPE.itemsize + 4096, "shard index")
        index = np.load(io.BytesIO(data), allow_pickle=False)
        if index.dtype == INDEX_DTYPE and index.ndim == 1:
            return index
    return np.array([(offset, size, label, key.encode("utf-8", "surrogateescape")[:128])
                     for key, (offset, size), label in _index_shard(shard)], dtype=INDEX_DTYPE)


def _recorded_sizes(info_path: Path) -> dict[str, int]:
    """shard file name -> its byte size, as `bigtransfer shard` recorded them in _info.json (empty without)."""
    if not info_path.is_file():
        return {}
    split = read_json(info_path).get("splits", {}).get("train", {})
    names, sizes = split.get("filenames", []), split.get("shard_bytes", [])
    return {name: int(size) for name, size in zip(names, sizes, strict=False) if isinstance(size, int)}


def _index_shard(shard: str):
    """(key, (offset, size) of the image, label) of every sample of one shard; errors name the shard and member."""
    images: dict[str, tuple[int, int]] = {}
    labels: dict[str, int] = {}
    try:
        with open(shard, "rb") as handle, tarfile.open(fileobj=handle, mode="r:") as tar:
            for count, member in enumerate(tar):
                if count >= MAX_SHARD_MEMBERS:
                    raise ValueError(f"{shard}: more than {MAX_SHARD_MEMBERS:,} members")
                if not member.isfile():
                    continue
                key, suffix = _split_name(member.name)
                if suffix in IMAGE_SUFFIXES:
                    if member.size > MAX_IMAGE_BYTES:
                        raise ValueError(f"{shard}: member {member.name} is {member.size:,} bytes, more than the "
                                         f"{MAX_IMAGE_BYTES:,} an encoded image may have")
                    images[key] = (member.offset_data, member.size)
                elif suffix in LABEL_SUFFIXES:
                    labels[key] = _read_label(tar, member, shard)
    except tarfile.TarError as error:
        raise ValueError(f"{shard}: not a readable uncompressed tar shard ({error})") from error
    for key, place in images.items():
        if key in labels:
            yield key, place, labels[key]


def _split_name(name: str) -> tuple[str, str]:
    """`dir/n01440764_10026.jpg` -> (`dir/n01440764_10026`, `.jpg`): the key runs to the first dot of the base
    name, as webdataset groups members."""
    folder, _, base = name.rpartition("/")
    stem, dot, rest = base.partition(".")
    return (f"{folder}/{stem}" if folder else stem), (f".{rest.rsplit('.', 1)[-1].lower()}" if dot else "")


def _read_label(tar: tarfile.TarFile, member: tarfile.TarInfo, shard: str) -> int:
    if member.size > MAX_LABEL_BYTES:
        raise ValueError(f"{shard}: label member {member.name} is {member.size:,} bytes (at most {MAX_LABEL_BYTES:,})")
    text = tar.extractfile(member).read().decode("utf-8", "replace").strip()
    try:
        value = json.loads(text)["label"] if member.name.endswith(".json") else int(text)
        return int(value)
    except (ValueError, KeyError, TypeError) as error:
        what = 'a JSON object with an integer "label"' if member.name.endswith(".json") else "an integer"
        raise ValueError(f"{shard}: label member {member.name} holds {text[:40]!r}, expected {what}") from error


def _class_names(info_path: Path, count: int, where: str) -> list[str]:
    """`class_names` of an _info.json beside the shards (or the folder), else "0".."count-1"."""
    if not info_path.is_file():
        return [str(index) for index in range(count)]
    names = read_json(info_path).get("class_names")
    if not (isinstance(names, list) and all(isinstance(name, str) for name in names)):
        raise ValueError(f"{info_path}: class_names must be a list of strings (for {where})")
    return names


# ---------------------------------------------------------------------------------------------------------------
# Hugging Face datasets and Parquet.


def parse_hf_spec(spec: str) -> tuple[str, str | None, str | None]:
    """`PATH#image=COL,label=COL` -> (PATH, image column or None, label column or None)."""
    path, _, options = spec.partition("#")
    columns: dict[str, str] = {}
    for item in filter(None, (part.strip() for part in options.split(","))):
        name, equals, value = item.partition("=")
        if not equals or name not in ("image", "label") or not value:
            raise ValueError(f"hf:{spec}: options are image=COLUMN and label=COLUMN, got {item!r}")
        columns[name] = value
    return path, columns.get("image"), columns.get("label")


def open_hf(spec: str, split: str) -> tuple[Any, str]:
    """(datasets.Dataset, what it is in words) for `hf:` `spec` and a "train" / "test" split (of a DatasetDict)."""
    datasets = _import_datasets()
    path = Path(parse_hf_spec(spec)[0])
    if not path.exists():
        raise FileNotFoundError(f"hf:{spec}: {path} does not exist")
    if path.is_dir() and ((path / "dataset_dict.json").is_file() or (path / "state.json").is_file()):
        loaded = datasets.load_from_disk(str(path))
        if isinstance(loaded, datasets.DatasetDict):
            if split not in loaded:
                raise ValueError(f"hf:{spec}: no {split!r} split (it has {', '.join(loaded)})")
            return loaded[split], f"{path} [{split}]"
        return loaded, str(path)
    files = sorted(str(file) for file in path.glob("*.parquet")) if path.is_dir() else [str(path)]
    if not files or not all(file.endswith(".parquet") for file in files):
        raise ValueError(f"hf:{spec}: expected a save_to_disk folder, a .parquet file or a folder of them")
    return datasets.Dataset.from_parquet(files), f"{len(files)} Parquet file(s) in {path}"


def _import_datasets():
    try:
        import datasets
    except ImportError as error:
        raise ImportError("hf: data needs the datasets package: pip install 'bigtransfer[hf]'") from error
    return datasets


def has_hf_splits(spec: str) -> bool:
    path = Path(parse_hf_spec(spec)[0])
    return (path / "dataset_dict.json").is_file()


class ArrowSource(StoredImageSource):
    """The rows of a Hugging Face dataset (memory-mapped Arrow): labels read as a column, images decoded from
    their stored bytes when a row is loaded."""

    def __init__(self, spec: str, split: str = "train"):
        datasets = _import_datasets()
        self.spec = spec
        dataset, self.description = open_hf(spec, split)
        _, image_column, label_column = parse_hf_spec(spec)
        features = dataset.features
        image_column = image_column or next((name for name, feature in features.items()
                                             if isinstance(feature, datasets.Image)), "image")
        label_column = label_column or "label"
        for column in (image_column, label_column):
            if column not in features:
                raise ValueError(f"hf:{spec}: no column {column!r} (columns: {', '.join(features)}); name them as "
                                 "hf:PATH#image=COL,label=COL")
        if isinstance(features[image_column], datasets.Image):
            dataset = dataset.cast_column(image_column, datasets.Image(decode=False))
        self.dataset, self.image_column = dataset, image_column
        self.labels = np.asarray(dataset[label_column], dtype=np.int64)
        label_feature = features[label_column]
        count = int(self.labels.max()) + 1 if len(self.labels) else 0
        self.classes = (list(label_feature.names) if isinstance(label_feature, datasets.ClassLabel)
                        else [str(index) for index in range(count)])
        if len(self.labels) and (self.labels.min() < 0 or self.labels.max() >= len(self.classes)):
            raise ValueError(f"hf:{spec}: column {label_column!r} must hold labels in [0, {len(self.classes)})")

    def stored_bytes(self, index: int) -> bytes:
        cell = self.dataset[int(index)][self.image_column]
        data = cell.get("bytes") if isinstance(cell, dict) else cell
        if data is None and isinstance(cell, dict) and cell.get("path"):
            data = read_bytes(cell["path"], MAX_IMAGE_BYTES, "image")
        if not isinstance(data, (bytes, bytearray)):
            raise BadImageError(self.path(index), f"column {self.image_column!r} holds no encoded image bytes")
        return bytes(data)

    def path(self, index: int) -> str:
        return f"{self.description}[{index}]"

    def _identity(self):
        yield f"{self.description} {self.dataset._fingerprint}".encode()
