"""Indexes of WebDataset tar shards (each sample's image offset, size, label and key), and the checks that an
index still describes the shard it indexes.

A shard's identity is its byte size, its modification time (local files), its ETag (objects) and a SHA-256 of
four sampled 16 KiB blocks (the first, the last and two between), which tells a same-size replacement apart. An
index is used only while the shard's identity is the one it recorded; otherwise the shard is indexed again (and
a warning names it). Every index read is checked before use: offsets and sizes inside the shard, no more samples
than the shard has room for, labels class indices, and the counts `_info.json` records.

Indexes come from three places, fastest first: the global `_index.npz` that `bigtransfer shard` writes beside its
shards (every shard in one file), a per-shard entry in the index cache (`BIGTRANSFER_INDEX_CACHE`, by default
`~/.cache/bigtransfer/shard-index`; written once, under a lock, so concurrent ranks index each shard once), and a
scan of the shard's tar headers (no image bytes are read).
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import io
import json
import os
import re
import tarfile
import warnings
import zipfile
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from ..config import LIMITS
from ..files import atomic_path, read_bytes
from .storage import FileStat, LocalStorage, RemoteStorage, parent

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".webp")
LABEL_SUFFIXES = (".cls", ".json")
MAX_LABEL_BYTES = 64 << 10  # a .cls or .json label member
MAX_IMAGE_BYTES = 256 << 20  # an encoded image member
MAX_SHARD_MEMBERS = 10_000_000
MAX_INDEX_BYTES = 4 << 30  # a global index of 100 million samples
INFO_NAME, INDEX_NAME = "_info.json", "_index.npz"
INDEX_FORMAT = "bigtransfer-shard-index/1"
DIGEST_BLOCK = 16 << 10
_ARRAYS = {"offset": np.dtype("<i8"), "size": np.dtype("<i8"), "label": np.dtype("<i8"), "key_blob": np.dtype("u1"),
           "key_end": np.dtype("<i8"), "meta": np.dtype("u1")}
Storage = LocalStorage | RemoteStorage


@dataclass
class ShardIndex:
    """One shard's samples (image offset and size, label, key; size -1 marks a link member, unreadable) and
    identity, plus the problems found while indexing it (a truncated header)."""

    name: str
    stat: FileStat
    digest: str
    offset: np.ndarray
    size: np.ndarray
    label: np.ndarray
    key_blob: bytes  # the keys, end to end (key_end[i] is where key i ends)
    key_end: np.ndarray
    problems: list[str] = field(default_factory=list)
    md5: str | None = None

    def __len__(self) -> int:
        return len(self.label)


# ---------------------------------------------------------------------------------------------------------------
# Scanning a shard's headers.


def scan_shard(storage: Storage, path: str, stat: FileStat, digest: str) -> ShardIndex:
    """Index one shard by its tar headers; label members are read (bounded), images are not."""
    images: dict[str, tuple[int, int]] = {}
    labels: dict[str, int] = {}
    problems: list[str] = []
    try:
        with storage.open(path) as handle, tarfile.open(fileobj=handle, mode="r:") as tar:
            for count, member in enumerate(tar):
                if count >= MAX_SHARD_MEMBERS:
                    raise ValueError(f"{path}: more than {MAX_SHARD_MEMBERS:,} members")
                _add_member(tar, member, path, images, labels)
            problems.extend(_tail_problem(handle, tar.offset, stat.bytes, path))
    except tarfile.TarError as error:
        raise ValueError(f"{path}: not a readable uncompressed tar shard ({error})") from error
    for key, (offset, size) in images.items():
        if size >= 0 and offset + size > stat.bytes:
            problems.append(f"{path}: member {key} runs past the end of the shard (it is truncated)")
            images[key] = (offset, -1)
    keys = [key for key in images if key in labels]
    encoded = [key.encode("utf-8", "surrogateescape") for key in keys]
    return ShardIndex(os.path.basename(path), stat, digest,
                      np.array([images[key][0] for key in keys], np.int64),
                      np.array([images[key][1] for key in keys], np.int64),
                      np.array([labels[key] for key in keys], np.int64),
                      b"".join(encoded), np.cumsum([len(key) for key in encoded], dtype=np.int64), problems)


def _add_member(tar: tarfile.TarFile, member: tarfile.TarInfo, path: str, images: dict, labels: dict) -> None:
    key, suffix = split_name(member.name)
    if suffix not in IMAGE_SUFFIXES + LABEL_SUFFIXES or member.isdir():
        return
    if member.islnk() or member.issym():  # a sample whose bytes are elsewhere: reported when it is loaded
        if suffix in IMAGE_SUFFIXES:
            images[key] = (member.offset_data, -1)
        else:
            raise ValueError(f"{path}: label member {member.name} is a {'hard' if member.islnk() else 'symbolic'} "
                             "link; shards must hold their labels as files")
        return
    if not member.isfile():
        return
    if suffix in IMAGE_SUFFIXES:
        if member.size > MAX_IMAGE_BYTES:
            raise ValueError(f"{path}: member {member.name} is {member.size:,} bytes, more than the "
                             f"{MAX_IMAGE_BYTES:,} an encoded image may have")
        images[key] = (member.offset_data, member.size)
    else:
        labels[key] = read_label(tar, member, path)


def _tail_problem(handle, end: int, size: int, path: str) -> list[str]:
    """tarfile stops without a word at a truncated or corrupt header: what lies where it stopped says which."""
    if size - end <= 0:
        return []
    handle.seek(end)
    block = handle.read(min(512, size - end))
    if len(block) == 512 and not any(block):
        return []  # the end-of-archive marker
    what = "truncated" if size - end < 512 else "corrupt"
    return [f"{path}: the tar header at byte {end:,} is {what}; the {size - end:,} bytes after it were not read"]


def split_name(name: str) -> tuple[str, str]:
    """`dir/n01440764_10026.jpg` -> (`dir/n01440764_10026`, `.jpg`): the key runs to the first dot of the base
    name, as webdataset groups members."""
    folder, _, base = name.rpartition("/")
    stem, dot, rest = base.partition(".")
    return (f"{folder}/{stem}" if folder else stem), (f".{rest.rsplit('.', 1)[-1].lower()}" if dot else "")


def read_label(tar: tarfile.TarFile, member: tarfile.TarInfo, path: str) -> int:
    """A class index from a `.cls` member (its decimal text) or a `.json` one (`{"label": index}`)."""
    if member.size > MAX_LABEL_BYTES:
        raise ValueError(f"{path}: label member {member.name} is {member.size:,} bytes (at most {MAX_LABEL_BYTES:,})")
    text = tar.extractfile(member).read().decode("utf-8", "replace").strip()
    return parse_label(text, member.name.endswith(".json"), f"{path}: label member {member.name}")


def parse_label(text: str, is_json: bool, where: str) -> int:
    limit = LIMITS["num_labels"]
    value: object = text
    if is_json:
        try:
            value = json.loads(text)["label"]
        except (ValueError, KeyError, TypeError):
            value = None
    elif re.fullmatch(r"\d{1,18}", text):
        value = int(text)
    if type(value) is not int or not 0 <= value < limit:  # type(): True and 1.7 are no class index
        what = 'a JSON object with an integer "label"' if is_json else "an integer"
        raise ValueError(f"{where} holds {text[:40]!r}, expected {what}: a class index in [0, {limit:,})")
    return value


# ---------------------------------------------------------------------------------------------------------------
# Identity.


def sampled_digests(storage: Storage, paths: list[str], stats: list[FileStat]) -> list[str]:
    """Each file's size and four sampled blocks, hashed (all files' blocks fetched in one batch)."""
    ranges, owners = [], []
    for number, (path, stat) in enumerate(zip(paths, stats, strict=True)):
        block = min(DIGEST_BLOCK, stat.bytes)
        for start in sorted({(stat.bytes - block) * part // 3 for part in range(4)}):
            ranges.append((path, start, start + block))
            owners.append(number)
    digests = [hashlib.sha256(str(stat.bytes).encode()) for stat in stats]
    for owner, data in zip(owners, storage.read_ranges(ranges), strict=True):
        digests[owner].update(data)
    return [digest.hexdigest()[:32] for digest in digests]


def same_identity(recorded: ShardIndex, stat: FileStat, digest: str, remote: bool) -> bool:
    """Whether a shard is still the one an index was made from."""
    if recorded.stat.bytes != stat.bytes or recorded.digest != digest:
        return False
    if not remote:
        return recorded.stat.mtime_ns == stat.mtime_ns
    if recorded.stat.etag and stat.etag:
        return recorded.stat.etag == stat.etag
    plain_md5 = stat.etag is not None and re.fullmatch(r"[0-9a-f]{32}", stat.etag)
    return not (plain_md5 and recorded.md5) or recorded.md5 == stat.etag  # an upload's ETag is its MD5


def fingerprint_part(path: str, index: ShardIndex) -> bytes:
    return f"{path} {index.stat.bytes} {index.digest}".encode("utf-8", "surrogateescape")


# ---------------------------------------------------------------------------------------------------------------
# Index files (the global one and cache entries share the format: stored .npy arrays in a zip).


def encode_index(shards: list[ShardIndex]) -> bytes:
    meta = {"format": INDEX_FORMAT, "shards": [
        {"name": shard.name, "bytes": shard.stat.bytes, "mtime_ns": shard.stat.mtime_ns, "etag": shard.stat.etag,
         "digest": shard.digest, "md5": shard.md5, "samples": len(shard), "problems": shard.problems}
        for shard in shards]}
    arrays = dict(offset=_joined(shards, "offset"), size=_joined(shards, "size"), label=_joined(shards, "label"),
                  key_blob=np.frombuffer(b"".join(shard.key_blob for shard in shards), np.uint8),
                  key_end=_key_ends(shards),
                  meta=np.frombuffer(json.dumps(meta).encode(), np.uint8))
    buffer = io.BytesIO()
    np.savez(buffer, **arrays)  # stored, not compressed: read back with bounds
    return buffer.getvalue()


def _key_ends(shards: list[ShardIndex]) -> np.ndarray:
    ends, start = [np.zeros(0, np.int64)], 0
    for shard in shards:
        ends.append(shard.key_end + start)
        start += len(shard.key_blob)
    return np.concatenate(ends)


def _joined(shards: list[ShardIndex], name: str) -> np.ndarray:
    return np.concatenate([getattr(shard, name) for shard in shards] or [np.zeros(0, np.int64)]).astype(np.int64)


def decode_index(data: bytes, where: str) -> list[ShardIndex]:
    """The shards of an index file, every array and field checked (ValueError naming `where` and the field)."""
    arrays = _read_arrays(data, where)
    try:
        meta = json.loads(arrays["meta"].tobytes())
        if meta["format"] != INDEX_FORMAT or not isinstance(meta["shards"], list):
            raise ValueError(f"format {meta['format']!r}")
        entries = [_entry(entry) for entry in meta["shards"]]
    except (ValueError, KeyError, TypeError) as error:
        raise ValueError(f"{where}: not a {INDEX_FORMAT} index (its meta field is {type(error).__name__}: "
                         f"{error})") from None
    counts = [entry["samples"] for entry in entries]
    total, key_end = sum(counts), arrays["key_end"]
    if any(len(arrays[name]) != total for name in ("offset", "size", "label", "key_end")):
        raise ValueError(f"{where}: its arrays do not hold the {total:,} samples its shards list")
    if total and (np.any(np.diff(key_end) < 0) or key_end[0] < 0 or key_end[-1] != len(arrays["key_blob"])):
        raise ValueError(f"{where}: its key table is inconsistent")
    blob, shards, start = arrays["key_blob"].tobytes(), [], 0
    for entry, count in zip(entries, counts, strict=True):
        rows = slice(start, start + count)
        first = int(key_end[start - 1]) if start else 0
        last = int(key_end[start + count - 1]) if count else first
        shards.append(ShardIndex(entry["name"], FileStat(entry["bytes"], entry["mtime_ns"], entry["etag"]),
                                 entry["digest"], arrays["offset"][rows], arrays["size"][rows],
                                 arrays["label"][rows], blob[first:last], key_end[rows] - first,
                                 entry["problems"], entry["md5"]))
        start += count
    return shards


def _entry(entry: dict) -> dict:
    checks = dict(name=str, bytes=int, mtime_ns=(int, type(None)), etag=(str, type(None)), digest=str,
                  md5=(str, type(None)), samples=int, problems=list)
    for name, kind in checks.items():
        if not isinstance(entry[name], kind) or isinstance(entry[name], bool):
            raise TypeError(f"shard field {name!r} is {entry[name]!r}")
    if entry["samples"] < 0 or entry["bytes"] < 0:
        raise ValueError(f"shard {entry['name']!r} has a negative count")
    return entry


def _read_arrays(data: bytes, where: str) -> dict[str, np.ndarray]:
    """The arrays of an .npz, each header checked against its stored bytes before anything is allocated."""
    arrays = {}
    try:
        with zipfile.ZipFile(io.BytesIO(data)) as archive:
            for name, dtype in _ARRAYS.items():
                info = archive.getinfo(f"{name}.npy")
                if info.compress_type != zipfile.ZIP_STORED:
                    raise ValueError(f"array {name} is compressed")
                with archive.open(info) as member:
                    version = np.lib.format.read_magic(member)
                    reader = {(1, 0): np.lib.format.read_array_header_1_0,
                              (2, 0): np.lib.format.read_array_header_2_0}.get(version)
                    if reader is None:
                        raise ValueError(f"array {name} has .npy format {version}")
                    shape, _, found = reader(member)
                    if found != dtype or len(shape) != 1 or shape[0] * dtype.itemsize > info.file_size:
                        raise ValueError(f"array {name} is {found}{list(shape)}, expected {dtype} of at most "
                                         f"{info.file_size // dtype.itemsize:,} values")
                    arrays[name] = np.frombuffer(member.read(shape[0] * dtype.itemsize), dtype)
    except (zipfile.BadZipFile, KeyError, ValueError, EOFError, OSError) as error:
        raise ValueError(f"{where}: not a readable shard index ({error})") from None
    return arrays


def check_index(shard: ShardIndex, path: str, where: str) -> None:
    """An index that claims what its shard cannot hold is refused (it was not made from this shard)."""
    size, offset, label = shard.size, shard.offset, shard.label
    room = shard.stat.bytes // 1024  # a sample is two members: a 512-byte header and a data block each
    bad = (len(shard) > room or np.any(offset < 512) or np.any(size < -1) or np.any(offset + size > shard.stat.bytes)
           or np.any(label < 0) or np.any(label >= LIMITS["num_labels"]))
    if bad:
        raise ValueError(f"{where}: its entry for {path} ({len(shard):,} samples) does not fit the "
                         f"{shard.stat.bytes:,}-byte shard; delete {where} to index the shards again")


# ---------------------------------------------------------------------------------------------------------------
# Opening: global index, cache, scan.


def default_cache() -> Path:
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(os.environ.get("BIGTRANSFER_INDEX_CACHE") or os.path.join(base, "bigtransfer", "shard-index"))


def open_shards(storage: Storage, paths: list[str], stats: list[FileStat], cache: Path | None) -> list[ShardIndex]:
    """The index of every shard, from the global index, the cache or a scan, each checked against its shard."""
    digests = sampled_digests(storage, paths, stats)
    chosen: list[ShardIndex | None] = [None] * len(paths)
    global_path = f"{parent(paths[0])}/{INDEX_NAME}"
    if storage.exists(global_path):
        recorded = {shard.name: shard for shard in decode_index(storage.read_file(global_path, MAX_INDEX_BYTES,
                                                                                  "shard index"), global_path)}
        changed = []
        for number, path in enumerate(paths):
            shard = recorded.get(os.path.basename(path))
            if shard is None:
                continue
            if same_identity(shard, stats[number], digests[number], storage.remote):
                check_index(shard, path, global_path)
                chosen[number] = shard
            else:
                changed.append(path)
        if changed:  # relabelled, replaced, or copied without their modification times (rsync -a keeps them)
            warnings.warn(f"{', '.join(changed[:3])}{' and others' if len(changed) > 3 else ''}: {len(changed)} "
                          f"shard(s) changed since {global_path} was written; indexing them again", stacklevel=2)
    for number, path in enumerate(paths):
        if chosen[number] is None:
            chosen[number] = _cached_or_scanned(storage, path, stats[number], digests[number], cache)
    return chosen


def _cached_or_scanned(storage: Storage, path: str, stat: FileStat, digest: str, cache: Path | None) -> ShardIndex:
    def scan() -> ShardIndex:
        return storage.retry(lambda: scan_shard(storage, path, stat, digest), path, "its tar headers")

    opened = _cache_entry(cache, path)
    if opened is None:
        return scan()
    entry, lock = opened
    with lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # one process indexes, the others wait and read its entry
        if entry.is_file():
            with contextlib.suppress(ValueError, OSError):  # a damaged entry is simply made again
                shard = decode_index(read_bytes(entry, MAX_INDEX_BYTES, "shard index"), str(entry))[0]
                if same_identity(shard, stat, digest, storage.remote):
                    check_index(shard, path, str(entry))
                    return shard
        shard = scan()
        with atomic_path(entry) as temporary:
            temporary.write_bytes(encode_index([shard]))
        return shard


def _cache_entry(cache: Path | None, path: str):
    """(the cache entry for `path`, its lock file opened), or None where there is no writable cache."""
    if cache is None:
        return None
    entry = cache / (hashlib.sha256(path.encode("utf-8", "surrogateescape")).hexdigest()[:40] + ".npz")
    try:
        cache.mkdir(parents=True, exist_ok=True)
        return entry, open(entry.with_suffix(".lock"), "a")  # noqa: SIM115 - the caller closes it
    except OSError as error:  # a read-only home, say: index without the cache
        warnings.warn(f"the index cache {cache} cannot be written ({error}); indexing {path} without it",
                      stacklevel=4)
        return None
