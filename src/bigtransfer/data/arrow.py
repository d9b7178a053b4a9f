"""Hugging Face datasets and Parquet files (`hf:PATH`) with random access.

- A folder saved with `datasets.save_to_disk` is memory-mapped where it lies (a DatasetDict's "train" and "test"
  splits are used as published splits).
- A Parquet file or a folder of them, on this machine or in object storage (`hf:s3://bucket/data/`), is read with
  pyarrow directly: the label column alone when opened, an image by streaming its row group's image column in
  slices of SLICE_ROWS rows (never a whole row group, never a copy into a cache; what is held is the slice and the
  decompressed data page it lies in, whose size the file's writer chose).

Random access into Parquet decodes a row group's pages up to the row wanted; `hf:PATH#cache=DIR` converts the
files once into memory-mapped Arrow in DIR, a folder the user names (the datasets cache is never written).

The image column holds encoded bytes (datasets' `Image` feature: a struct of bytes and path, or plain binary), the
label column class indices (a `ClassLabel` in the file's datasets metadata gives the names). `hf:PATH#image=COL,
label=COL` names other columns. Labels must be integers in [0, 1,000,000): floats, booleans and text are refused
naming the column and row.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import numpy as np

from ..config import LIMITS
from ..errors import OutOfMemoryError
from ..files import read_bytes
from .shards import StoredImageSource
from .sources import BadImageError
from .storage import is_remote, storage_for
from .tar_index import MAX_IMAGE_BYTES

SLICE_ROWS = 16  # rows of an image column decoded at a time


def parse_hf_spec(spec: str) -> tuple[str, str | None, str | None]:
    """`PATH#image=COL,label=COL` -> (PATH, image column or None, label column or None)."""
    path, _, options = spec.partition("#")
    columns = _options(spec, options)
    return path, columns.get("image"), columns.get("label")


def hf_cache(spec: str) -> str | None:
    """The folder a `#cache=DIR` option names for Parquet files converted to Arrow, or None."""
    return _options(spec, spec.partition("#")[2]).get("cache")


def _options(spec: str, options: str) -> dict[str, str]:
    found: dict[str, str] = {}
    for item in filter(None, (part.strip() for part in options.split(","))):
        name, equals, value = item.partition("=")
        if not equals or name not in ("image", "label", "cache") or not value:
            raise ValueError(f"hf:{spec}: options are image=COLUMN, label=COLUMN and cache=DIR, got {item!r}")
        found[name] = value
    return found


def has_hf_splits(spec: str) -> bool:
    path = parse_hf_spec(spec)[0]
    return not is_remote(path) and (Path(path) / "dataset_dict.json").is_file()


def is_saved_dataset(spec: str) -> bool:
    path = Path(parse_hf_spec(spec)[0])
    return not is_remote(str(path)) and path.is_dir() and any(
        (path / name).is_file() for name in ("dataset_dict.json", "state.json"))


def labels_from_column(column, where: str) -> np.ndarray:
    """A pyarrow column of class indices as int64; anything else is refused naming the first bad row."""
    import pyarrow as pa
    import pyarrow.compute as pc

    kind = column.type
    if column.null_count:
        raise ValueError(f"{where}: row {_first(pc.is_null(column))} has no label")
    if pa.types.is_floating(kind):
        fractional = pc.not_equal(column, pc.floor(column))
        if pc.any(fractional).as_py():
            row = _first(fractional)
            raise ValueError(f"{where}: row {row} holds {column[row].as_py()!r}, expected an integer class index")
    elif not pa.types.is_integer(kind):
        raise ValueError(f"{where} holds {kind} values, expected integer class indices")
    limit = LIMITS["num_labels"]
    outside = pc.or_(pc.less(column, 0), pc.greater_equal(column, limit))
    if len(column) and pc.any(outside).as_py():
        row = _first(outside)
        raise ValueError(f"{where}: row {row} holds {column[row].as_py()!r}, expected a class index in "
                         f"[0, {limit:,})")
    return column.to_numpy().astype(np.int64) if len(column) else np.zeros(0, np.int64)


def _first(mask) -> int:
    import pyarrow.compute as pc

    return int(pc.index(mask, True).as_py())


def _class_names(names: Any, labels: np.ndarray, where: str) -> list[str]:
    if names is None:
        return [str(index) for index in range(int(labels.max()) + 1 if len(labels) else 0)]
    names = list(names)
    if len(labels) and labels.max() >= len(names):
        raise ValueError(f"{where} must hold labels in [0, {len(names)}) (its ClassLabel names), found "
                         f"{int(labels.max())}")
    return names


def _cell_bytes(cell: Any, where: str) -> bytes:
    data = cell.get("bytes") if isinstance(cell, dict) else cell
    if data is None and isinstance(cell, dict) and cell.get("path") and not is_remote(cell["path"]):
        data = read_bytes(cell["path"], MAX_IMAGE_BYTES, "image")
    if not isinstance(data, (bytes, bytearray)):
        raise BadImageError(where, "the image column holds no encoded image bytes")
    return bytes(data)


class ArrowSource(StoredImageSource):
    """The rows of a dataset saved with `datasets.save_to_disk` (memory-mapped Arrow, read where it lies)."""

    def __init__(self, spec: str, split: str = "train"):
        datasets = _import_datasets()
        self.spec = spec
        path, image_column, label_column = parse_hf_spec(spec)
        loaded, self.description = _load_arrow(datasets, spec, path)
        if isinstance(loaded, datasets.DatasetDict):
            if split not in loaded:
                raise ValueError(f"hf:{spec}: no {split!r} split (it has {', '.join(loaded)})")
            loaded, self.description = loaded[split], f"{path} [{split}]"
        features = loaded.features
        image_column = image_column or next((name for name, feature in features.items()
                                             if isinstance(feature, datasets.Image)), "image")
        label_column = label_column or "label"
        _check_columns(spec, list(features), image_column, label_column)
        if isinstance(features[image_column], datasets.Image):
            loaded = loaded.cast_column(image_column, datasets.Image(decode=False))
        self.dataset, self.image_column = loaded, image_column
        where = f"hf:{spec}: column {label_column!r}"
        self.labels = labels_from_column(loaded.data.column(label_column), where)
        feature = features[label_column]
        self.classes = _class_names(feature.names if isinstance(feature, datasets.ClassLabel) else None,
                                    self.labels, where)

    def stored_bytes(self, index: int) -> bytes:
        return _cell_bytes(self.dataset[int(index)][self.image_column], self.path(index))

    def path(self, index: int) -> str:
        return f"{self.description}[{index}]"

    def _identity(self):
        yield f"{self.description} {self.dataset._fingerprint}".encode()


def _load_arrow(datasets, spec: str, path: str):
    """(dataset or DatasetDict, description): a save_to_disk folder, or Parquet files converted into `#cache=DIR`."""
    cache = hf_cache(spec)
    try:
        if cache is None:
            return datasets.load_from_disk(path), path
        files = _parquet_files(storage_for(path), path, spec)
        storage = {"storage_options": {}} if is_remote(path) else {}
        loaded = datasets.Dataset.from_parquet(files, cache_dir=cache, **storage)
        return loaded, f"{len(files)} Parquet file(s) in {path} (as Arrow in {cache})"
    except MemoryError as error:
        raise OutOfMemoryError(f"hf:{spec}: out of memory while reading {path}") from error
    except (OSError, ValueError, KeyError, TypeError) as error:
        if isinstance(error, FileNotFoundError) or str(error).startswith(f"hf:{spec}"):
            raise
        raise ValueError(f"hf:{spec}: {path} is not a readable datasets folder or Parquet file "
                         f"({type(error).__name__}: {error})") from error


class ParquetSource(StoredImageSource):
    """The rows of Parquet files, local or remote (see the module doc), read with pyarrow in bounded slices."""

    def __init__(self, spec: str):
        _import_datasets()  # and with it pyarrow
        self.spec = spec
        location, image_column, label_column = parse_hf_spec(spec)
        self.storage = storage_for(location)
        self.files = _parquet_files(self.storage, location, spec)
        self._handles: dict[int, Any] = {}
        self._pid = os.getpid()
        self._slice: tuple[Any, ...] = (None, None)
        self._cursor: tuple[Any, ...] | None = None
        labels, names, rows = [], None, []
        for number, file in enumerate(self.files):
            parquet = self._parquet(number)
            image = image_column or _image_column(parquet) or "image"
            label = label_column or "label"
            _check_columns(f"{spec} ({file})", parquet.schema_arrow.names, image, label)
            column = self._read(number, lambda number=number, label=label: self._parquet(number).read(
                columns=[label]).column(label), f"column {label!r}")
            labels.append(labels_from_column(column, f"{file}: column {label!r}"))
            names = names or _class_label_names(parquet, label)
            groups = parquet.metadata
            rows.extend((number, group, row) for group in range(groups.num_row_groups)
                        for row in range(groups.row_group(group).num_rows))
            self.image_column = image
        self._rows = np.array(rows, np.int64).reshape(-1, 3)
        self.labels = np.concatenate(labels) if labels else np.zeros(0, np.int64)
        self.classes = _class_names(names, self.labels, f"hf:{spec}: the label column")
        self._sizes = [stat.bytes for stat in self.storage.stat_many(self.files)]

    def __getstate__(self) -> dict:
        return {**self.__dict__, "_handles": {}, "_slice": (None, None), "_cursor": None}

    def _parquet(self, number: int):
        import pyarrow.parquet as pq

        if self._pid != os.getpid():  # a data-loader worker: its own file handles
            self._handles, self._slice, self._cursor, self._pid = {}, (None, None), None, os.getpid()
        if number not in self._handles:
            self._handles[number] = self._read(number, lambda: pq.ParquetFile(
                self.storage.open(self.files[number]), pre_buffer=False, buffer_size=1 << 20), "its footer")
        return self._handles[number]

    def _read(self, number: int, call, what: str):
        """`call()`, retried as the storage retries, its errors named: the file and what was being read."""
        import pyarrow as pa

        def attempt():
            try:
                return call()
            except Exception:
                self._handles.pop(number, None)  # a connection cut mid-read: start again on a fresh handle
                self._cursor = None
                raise

        try:
            return self.storage.retry(attempt, self.files[number], what)
        except MemoryError as error:
            raise OutOfMemoryError(f"{self.files[number]}: out of memory while reading {what}") from error
        except (pa.ArrowException, OSError) as error:
            if isinstance(error, FileNotFoundError):
                raise
            raise ValueError(f"{self.files[number]}: not a readable Parquet file (reading {what}: {error})") from error

    def stored_bytes(self, index: int) -> bytes:
        number, group, row = (int(value) for value in self._rows[index])
        wanted = (number, group, row // SLICE_ROWS)
        if self._slice[0] != wanted:
            self._slice = (wanted, self._read(number, lambda: self._advance(*wanted),
                                              f"row group {group} of column {self.image_column!r}"))
        return _cell_bytes(self._slice[1][row % SLICE_ROWS].as_py(), self.path(index))

    def _advance(self, number: int, group: int, part: int):
        """Slice `part` of a row group's image column: decoded from the group's start, or onward from where the
        previous read stopped (rows read in order cost one pass)."""
        if self._cursor is None or self._cursor[:2] != (number, group) or self._cursor[2] > part:
            batches = self._parquet(number).iter_batches(batch_size=SLICE_ROWS, row_groups=[group],
                                                         columns=[self.image_column], use_threads=False)
            self._cursor = (number, group, 0, batches)
        _, _, position, batches = self._cursor
        for _ in range(part - position + 1):
            batch = next(batches)
        self._cursor = (number, group, part + 1, batches)
        return batch.column(0)

    def path(self, index: int) -> str:
        number, _, _ = self._rows[index]
        return f"{self.files[number]}[{index - int(np.searchsorted(self._rows[:, 0], number))}]"

    def _identity(self):
        yield json.dumps([self.files, self._sizes]).encode("utf-8", "surrogateescape")


def _parquet_files(storage, location: str, spec: str) -> list[str]:
    if is_remote(location):
        if location.endswith(".parquet"):
            return [location]
        found = sorted(entry for entry in storage.fs.find(location) if entry.endswith(".parquet"))
        protocol = location.split("://", 1)[0]
        return [entry if "://" in entry else f"{protocol}://{entry}" for entry in found] or _none(spec)
    path = Path(location)
    if not path.exists():
        raise FileNotFoundError(f"hf:{spec}: {path} does not exist")
    files = sorted(str(file) for file in path.glob("*.parquet")) if path.is_dir() else [str(path)]
    if not files or not all(file.endswith(".parquet") for file in files):
        _none(spec)
    return files


def _none(spec: str):
    raise ValueError(f"hf:{spec}: expected a save_to_disk folder, a .parquet file or a folder of them")


def _check_columns(where: str, columns: list[str], image_column: str, label_column: str) -> None:
    for column in (image_column, label_column):
        if column not in columns:
            raise ValueError(f"hf:{where}: no column {column!r} (columns: {', '.join(columns)}); name them as "
                             "hf:PATH#image=COL,label=COL")


def _datasets_features(parquet) -> dict:
    metadata = parquet.schema_arrow.metadata or {}
    try:
        features = json.loads(metadata.get(b"huggingface", b"{}"))["info"]["features"]
    except (ValueError, KeyError, TypeError):
        return {}
    return features if isinstance(features, dict) else {}


def _image_column(parquet) -> str | None:
    return next((name for name, feature in _datasets_features(parquet).items()
                 if isinstance(feature, dict) and feature.get("_type") == "Image"), None)


def _class_label_names(parquet, column: str) -> list[str] | None:
    feature = _datasets_features(parquet).get(column)
    if isinstance(feature, dict) and feature.get("_type") == "ClassLabel":
        names = feature.get("names")
        if isinstance(names, list) and all(isinstance(name, str) for name in names) and \
                len(names) <= LIMITS["num_labels"]:
            return names
    return None


def _import_datasets():
    try:
        import datasets
    except ImportError as error:
        raise ImportError("hf: data needs the datasets package: pip install 'bigtransfer[hf]'") from error
    return datasets
