"""`bigtransfer shard`: any data set this package reads, written once as WebDataset tar shards in timm's layout
(`shard-000000.tar`, ... with `KEY.jpg|png|webp` + `KEY.cls` members and an `_info.json`), to pre-train from, plus
one global index of every shard (`_index.npz`: offsets, sizes, labels, keys and each shard's identity), so that a
reader opens millions of samples without scanning a shard. The folder is replaced as a whole: shards, index and
`_info.json` appear together, and no shard of an earlier, larger set survives an overwrite."""

from __future__ import annotations

import hashlib
import io
import json
import os
import re
from pathlib import Path
from typing import Any

from ..files import atomic_directory, read_bytes
from .shards import StoredImageSource
from .sources import FileSource, ImageSource
from .storage import LocalStorage
from .tar_index import (
    IMAGE_SUFFIXES,
    INDEX_NAME,
    INFO_NAME,
    MAX_IMAGE_BYTES,
    encode_index,
    sampled_digests,
    scan_shard,
)

SHARD_NAME = "shard-{:06d}.tar"
_OUTPUTS = re.compile(r"shard-\d+\.tar|shard-\d+\.idx\.npy|_info\.json|_index\.npz")  # this and earlier versions'


def is_shard_output(name: str) -> bool:
    """Whether a file name is one `bigtransfer shard` writes (an overwrite replaces all of them)."""
    return _OUTPUTS.fullmatch(name) is not None


def encoded(source: ImageSource, index: int) -> tuple[str, bytes]:
    """(extension, bytes) of one image as it is stored: a file's own bytes when webdataset readers take its
    format, shard members as they are, anything else (arrays, other formats) encoded as PNG."""
    if isinstance(source, FileSource):
        path = source.path(index)
        suffix = os.path.splitext(path)[1].lower()
        if suffix in IMAGE_SUFFIXES:
            return ("jpg" if suffix == ".jpeg" else suffix[1:]), read_bytes(path, MAX_IMAGE_BYTES, "image")
    if isinstance(source, StoredImageSource):  # a shard or Arrow source: its stored bytes
        data = source.stored_bytes(index)
        kind = {b"\xff\xd8": "jpg", b"\x89P": "png"}.get(data[:2], "webp" if data[8:12] == b"WEBP" else None)
        if kind:
            return kind, data
    image, _ = source[index]
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return "png", buffer.getvalue()


def write_shards(source: ImageSource, output: str | os.PathLike, shard_size: int = 10_000, name: str = "",
                 overwrite: bool = False, progress: Any = None) -> dict[str, Any]:
    """Write `source` (in its order) as tar shards of `shard_size` samples into `output`, whole or not at all;
    returns the _info.json written beside them."""
    try:
        from webdataset import TarWriter
    except ImportError as error:
        raise ImportError("writing shards needs webdataset: pip install 'bigtransfer[wds]'") from error
    if shard_size < 1:
        raise ValueError(f"shard_size must be >= 1, got {shard_size}")
    filenames, lengths, indexes = [], [], []
    with atomic_directory(Path(output), keep_existing=(lambda name: not is_shard_output(name)) if overwrite
                          else False) as written:
        for start in range(0, len(source), shard_size):
            filename = SHARD_NAME.format(len(filenames))
            with open(written / filename, "wb") as handle, TarWriter(handle) as writer:
                for index in range(start, min(start + shard_size, len(source))):
                    extension, data = encoded(source, index)
                    writer.write({"__key__": f"{index:09d}", extension: data, "cls": int(source.labels[index])})
                    if progress is not None:
                        progress.update(1)
            indexes.append(_indexed(written / filename))
            filenames.append(filename)
            lengths.append(min(shard_size, len(source) - start))
        (written / INDEX_NAME).write_bytes(encode_index(indexes))
        info = dict(name=name, num_classes=source.num_classes, class_names=list(source.classes),
                    splits={"train": dict(name="train", num_samples=len(source), filenames=filenames,
                                          shard_lengths=lengths, shard_bytes=[index.stat.bytes for index in indexes])})
        (written / INFO_NAME).write_text(json.dumps(info, indent=2) + "\n", encoding="utf-8")
    return info


def _indexed(shard: Path):
    """A written shard's index and identity, with the MD5 an object store reports as a single upload's ETag."""
    storage, path = LocalStorage(), str(shard)
    stat = storage.stat_many([path])[0]
    index = scan_shard(storage, path, stat, sampled_digests(storage, [path], [stat])[0])
    md5 = hashlib.md5(usedforsecurity=False)
    with open(shard, "rb") as handle:
        for block in iter(lambda: handle.read(8 << 20), b""):
            md5.update(block)
    index.md5 = md5.hexdigest()
    return index
