"""WebDataset tar shards with random access (`wds:PATTERN`), so that they train exactly like folders: every rank
and worker of a run takes its share of one seeded order by index, every rank runs the same number of steps
whatever the shard count, and `--resume` continues bit-exactly, as for folders and CSV files.

`PATTERN` names uncompressed tar shards by a brace pattern (`/data/in22k/shard-{000000..004094}.tar`) or a glob,
on this machine or in object storage (`s3://`, `gs://`, `az://`, `https://`; see `storage`). Members are
`KEY.jpg` / `.jpeg` / `.png` / `.webp` with `KEY.cls` (the class index as text) or `KEY.json`
(`{"label": index}`), as webdataset and timm write them. An `_info.json` beside the shards (written by
`bigtransfer shard`) gives the class names and each shard's sample count, which the indexes must agree with.
Shards are indexed once (see `tar_index`); images are then read as byte ranges, a batch's ranges in one request.
"""

from __future__ import annotations

import contextlib
import glob
import io
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image

from ..config import LIMITS
from ..errors import OutOfMemoryError
from ..files import json_object
from ..images import MemoryImage, decode_image
from .sources import BadImageError, ImageSource
from .storage import LocalStorage, RemoteStorage, expand_braces, is_remote, parent, storage_for
from .tar_index import INFO_NAME, ShardIndex, default_cache, fingerprint_part, open_shards

MAX_INFO_BYTES = 64 << 20  # _info.json with a million class names
READ_AHEAD_PARTS = 4  # a batch's images are requested at once and decoded in this many parts as they arrive


def expand_pattern(pattern: str) -> list[str]:
    """The shard locations of a brace pattern (webdataset's notation) or of a local glob."""
    if pattern.startswith("pipe:"):
        raise ValueError(f"wds:{pattern}: pipe: commands are not read (random access and exact resume need byte "
                         "ranges); give the shards' s3://, gs://, az:// or https:// location")
    if "{" in pattern:
        return expand_braces(pattern)
    if is_remote(pattern):
        return [pattern]
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


@dataclass(frozen=True)
class ShardInfo:
    """What `_info.json` says: class names (None: not given) and samples per shard file name."""

    class_names: list[str] | None
    lengths: dict[str, int]


def read_shard_info(storage: LocalStorage | RemoteStorage, path: str) -> ShardInfo:
    """The `_info.json` at `path` (empty without one); a field of the wrong kind is an error naming it."""
    if not storage.exists(path):
        return ShardInfo(None, {})
    info = json_object(storage.read_file(path, MAX_INFO_BYTES, "JSON file"), path)
    names = info.get("class_names")
    if names is not None and not (isinstance(names, list) and all(isinstance(name, str) for name in names)
                                  and 0 < len(names) <= LIMITS["num_labels"]):
        raise ValueError(f"{path}: class_names must be a list of 1 to {LIMITS['num_labels']:,} strings")
    splits = info.get("splits", {})
    split = splits.get("train", {}) if isinstance(splits, dict) else None
    if not isinstance(split, dict):
        raise ValueError(f"{path}: splits must be an object of splits (as bigtransfer shard writes it), got "
                         f"{type(splits).__name__}")
    files, lengths = split.get("filenames", []), split.get("shard_lengths", [])
    if not (isinstance(files, list) and isinstance(lengths, list) and len(files) == len(lengths)
            and all(isinstance(name, str) for name in files)
            and all(type(length) is int and 0 <= length for length in lengths)):
        raise ValueError(f"{path}: splits.train.filenames and shard_lengths must be lists of names and sample "
                         "counts of the same length")
    return ShardInfo(names, dict(zip(files, lengths, strict=True)))


class TarShardSource(StoredImageSource):
    """Samples of WebDataset tar shards (see the module doc).

    Args:
        pattern: the shards, e.g. `/data/shard-{000000..000099}.tar` or `s3://bucket/in22k/shard-{0000..4094}.tar`.
        index_cache: where indexes of shards without a global `_index.npz` are kept (default: the environment's
            `BIGTRANSFER_INDEX_CACHE`, else `~/.cache/bigtransfer/shard-index`).
    """

    def __init__(self, pattern: str, index_cache: str | os.PathLike | None = None):
        self.pattern = pattern
        self.shards = expand_pattern(pattern)
        self.storage = storage_for(pattern)
        stats = self.storage.stat_many(self.shards)
        missing = [path for path, stat in zip(self.shards, stats, strict=True) if stat is None]
        if missing:
            raise FileNotFoundError(f"wds:{pattern}: {len(missing)} of {len(self.shards)} shard file(s) not found, "
                                    f"e.g. {missing[0]}")
        info_path = f"{parent(self.shards[0])}/{INFO_NAME}"
        info = read_shard_info(self.storage, info_path)
        try:
            indexes = open_shards(self.storage, self.shards, stats, Path(index_cache or default_cache()))
        except MemoryError as error:
            raise OutOfMemoryError(f"wds:{pattern}: out of memory while reading the shards' indexes "
                                   f"({len(self.shards):,} shards)") from error
        self.damage_found = _compare_lengths(self.shards, indexes, info, info_path)
        self._gather(indexes)
        if not len(self.labels):
            raise ValueError(f"wds:{pattern}: no samples (an image member with a .cls or .json label) in "
                             f"{len(self.shards)} shard(s)")
        self.classes = info.class_names or [str(index) for index in range(int(self.labels.max()) + 1)]
        if self.labels.max() >= len(self.classes):
            raise ValueError(f"wds:{pattern}: labels must lie in [0, {len(self.classes)}) (the class_names of "
                             f"{info_path}), found {int(self.labels.max())}")

    def _gather(self, indexes: list[ShardIndex]) -> None:
        self._shard = np.concatenate([np.full(len(index), number, np.int32) for number, index in enumerate(indexes)])
        self._offset = np.concatenate([index.offset for index in indexes])
        self._size = np.concatenate([index.size for index in indexes])
        self.labels = np.concatenate([index.label for index in indexes]).astype(np.int64)
        self._key_blob = b"".join(index.key_blob for index in indexes)
        starts = np.cumsum([0] + [len(index.key_blob) for index in indexes])
        self._key_end = np.concatenate([index.key_end + start for index, start in zip(indexes, starts, strict=False)])
        self._identities = [fingerprint_part(path, index) for path, index in zip(self.shards, indexes, strict=True)]

    def damage(self) -> list[tuple[str, str]]:
        return list(self.damage_found)

    def _range(self, index: int) -> tuple[str, int, int]:
        shard, offset, size = self.shards[self._shard[index]], int(self._offset[index]), int(self._size[index])
        if size < 0:
            raise _link_error(self, index)
        return shard, offset, offset + size

    def stored_bytes(self, index: int) -> bytes:
        data = self.read_many([index])[0]
        if isinstance(data, BadImageError):
            raise data
        return data

    def read_many(self, indices) -> list[bytes | BadImageError]:
        """The stored bytes of several samples, fetched together (a BadImageError in place of an unreadable one)."""
        return [item for part in self._fetch_parts(indices, 1) for item in part[1]]

    def load_many(self, indices, min_size=None) -> list[tuple[Image.Image, int] | BadImageError]:
        """Images of several samples: all requested at once, decoded part by part as they arrive."""
        loaded: list = []
        for part_indices, part in self._fetch_parts(indices, READ_AHEAD_PARTS):
            for index, data in zip(part_indices, part, strict=True):
                try:
                    if isinstance(data, BadImageError):
                        raise data
                    loaded.append((decode_image(MemoryImage(data, self.path(index)), min_size),
                                   int(self.labels[index])))
                except BadImageError as error:
                    loaded.append(error)
        return loaded

    def _fetch_parts(self, indices, parts: int):
        """(indices, their bytes or BadImageErrors) of `indices` cut into `parts` consecutive parts."""
        indices = [int(index) for index in indices]
        size = max(1, -(-len(indices) // parts))
        chunks = [indices[start:start + size] for start in range(0, len(indices), size)]
        ranges: list[list[tuple[str, int, int]]] = []
        for chunk in chunks:
            ranges.append([])
            for index in chunk:
                with contextlib.suppress(BadImageError):
                    ranges[-1].append(self._range(index))
        try:
            for chunk, blocks in zip(chunks, self.storage.read_ahead(ranges), strict=True):
                found = iter(blocks)
                yield chunk, [next(found) if self._size[index] >= 0 else _link_error(self, index) for index in chunk]
        except MemoryError as error:
            wanted = sum(end - start for part in ranges for _, start, end in part)
            raise OutOfMemoryError(f"{self.shards[self._shard[indices[0]]]}: out of memory while reading "
                                   f"{len(indices)} images ({wanted:,} bytes)") from error

    def key(self, index: int) -> str:
        start = int(self._key_end[index - 1]) if index else 0
        return self._key_blob[start:int(self._key_end[index])].decode("utf-8", "surrogateescape")

    def path(self, index: int) -> str:
        return f"{self.shards[self._shard[index]]}#{self.key(index)}"

    def _identity(self):
        yield from self._identities

    def __repr__(self) -> str:
        return f"TarShardSource({self.pattern!r}, {len(self)} images, {self.num_classes} classes)"


def _link_error(source: TarShardSource, index: int) -> BadImageError:
    return BadImageError(source.path(index), "a link member or a truncated one: the shard does not hold this "
                         "image's bytes")


def _compare_lengths(paths: list[str], indexes: list[ShardIndex], info: ShardInfo,
                     info_path: str) -> list[tuple[str, str]]:
    """The shards' problems; a shard whose sample count is not the one _info.json records, without a problem that
    explains it, is refused."""
    damage = []
    for path, index in zip(paths, indexes, strict=True):
        damage.extend((path, problem.removeprefix(f"{path}: ")) for problem in index.problems)
        recorded = info.lengths.get(os.path.basename(path))
        if recorded is not None and recorded != len(index) and not index.problems:
            raise ValueError(f"{path} holds {len(index):,} samples but {info_path} records {recorded:,} "
                             "(shard_lengths): the shard or _info.json was changed after they were written")
    return damage
