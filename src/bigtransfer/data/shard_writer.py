"""`bigtransfer shard`: any data set this package reads, written once as WebDataset tar shards in timm's layout
(`shard-000000.tar`, ... with `KEY.jpg|png|webp` + `KEY.cls` members and an `_info.json`), to pre-train from; each
shard's index (`shard-000000.idx.npy`: offsets, sizes, labels) goes beside it, so readers need not scan it."""

from __future__ import annotations

import io
import json
import os
from pathlib import Path
from typing import Any

import numpy as np

from ..files import atomic_directory, read_bytes
from .shards import IMAGE_SUFFIXES, INFO_NAME, MAX_IMAGE_BYTES, StoredImageSource, index_path, read_index
from .sources import FileSource, ImageSource

SHARD_NAME = "shard-{:06d}.tar"


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
    filenames, lengths, sizes = [], [], []
    with atomic_directory(Path(output), keep_existing=overwrite) as written:
        for start in range(0, len(source), shard_size):
            filename = SHARD_NAME.format(len(filenames))
            with open(written / filename, "wb") as handle, TarWriter(handle) as writer:
                for index in range(start, min(start + shard_size, len(source))):
                    extension, data = encoded(source, index)
                    writer.write({"__key__": f"{index:09d}", extension: data, "cls": int(source.labels[index])})
                    if progress is not None:
                        progress.update(1)
            with open(index_path(written / filename), "wb") as handle:  # readers skip the header scan
                np.save(handle, read_index(str(written / filename), None), allow_pickle=False)
            filenames.append(filename)
            lengths.append(min(shard_size, len(source) - start))
            sizes.append((written / filename).stat().st_size)
        info = dict(name=name, num_classes=source.num_classes, class_names=list(source.classes),
                    splits={"train": dict(name="train", num_samples=len(source), filenames=filenames,
                                          shard_lengths=lengths, shard_bytes=sizes)})
        (written / INFO_NAME).write_text(json.dumps(info, indent=2) + "\n", encoding="utf-8")
    return info
