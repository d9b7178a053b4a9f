"""Where shard files live: the local file system or object storage through fsspec (`s3://`, `gs://`, `az://`,
`https://`), behind one small interface (stat, whole-file reads with a size bound, byte ranges, streams), and brace
patterns that name shards.

Remote reads are byte ranges, coalesced and fetched concurrently per batch, retried with bounded exponential
backoff on transient failures (connection resets, timeouts, 5xx, throttling) and then reported naming the object.
Endpoints and credentials come from the standard environment and configuration files of each client library
(`AWS_ENDPOINT_URL`, `AWS_ACCESS_KEY_ID`, `~/.aws`, `GOOGLE_APPLICATION_CREDENTIALS`, ...); they are never put in
a message, a log or a run directory, and a location with credentials in it (`https://user:secret@host/...`) is
refused.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import math
import os
import re
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Any, BinaryIO
from urllib.parse import urlsplit

from ..files import open_regular, read_bytes

MAX_SHARD_NAMES = 1_000_000  # ImageNet-21k comes in 4,095 shards, LAION-5B in about 230,000
DEFAULT_READ_TIMEOUT_S = 30.0  # one request's stall before it is retried (BIGTRANSFER_READ_TIMEOUT overrides)
RETRY_BUDGET_S = 60.0  # the most time one read spends retrying before it is reported
RETRY_DELAYS_S = (0.05, 0.1, 0.2, 0.4, 0.8, 1.6, 2.0, 2.0, 2.0, 2.0)
COALESCE_GAP = 64 << 10  # ranges closer than this are fetched as one request
FILESYSTEMS = {  # protocol -> (the fsspec implementation's package, the extra that installs it)
    "s3": ("s3fs", "remote"), "gs": ("gcsfs", "gcs"), "gcs": ("gcsfs", "gcs"), "az": ("adlfs", "azure"),
    "abfs": ("adlfs", "azure"), "abfss": ("adlfs", "azure"), "http": ("aiohttp", "remote"),
    "https": ("aiohttp", "remote"),
}
_PERMANENT = (FileNotFoundError, PermissionError, IsADirectoryError, NotADirectoryError, ValueError, TypeError,
              ImportError, MemoryError)


@dataclass(frozen=True)
class FileStat:
    """What a storage says about one file: its byte size, modification time (local files) and ETag (objects)."""

    bytes: int
    mtime_ns: int | None = None
    etag: str | None = None


def is_remote(location: str) -> bool:
    return "://" in location and not location.startswith("file://")


def expand_braces(pattern: str, limit: int = MAX_SHARD_NAMES, what: str = "wds:") -> list[str]:
    """The names of a brace pattern, webdataset's notation: `{000..099}` (zero-padded numbers) and `{a,b,c}`, any
    number of groups, the last varying fastest. The count is checked before any name is made."""
    pieces: list[Any] = []
    position = 0
    for found in re.finditer(r"\{([^{}]*)\}", pattern):
        pieces.append([pattern[position:found.start()]])
        numbers = re.fullmatch(r"(\d+)\.\.(\d+)", found[1])
        if numbers:
            low, high, width = int(numbers[1]), int(numbers[2]), len(numbers[1])
            if high < low:
                raise ValueError(f"{what}{pattern}: the range {{{found[1]}}} runs backwards")
            pieces.append(_Numbers(low, high, width))
        else:
            pieces.append(found[1].split(","))
        position = found.end()
    pieces.append([pattern[position:]])
    count = math.prod(len(piece) for piece in pieces)
    if count > limit:
        raise ValueError(f"{what}{pattern}: the brace pattern names {count:,} shards, more than the {limit:,} "
                         "a shard set may have")
    return ["".join(parts) for parts in itertools.product(*pieces)]


class _Numbers(Sequence):
    """`{low..high}` as zero-padded names, made only when asked for."""

    def __init__(self, low: int, high: int, width: int):
        self.low, self.high, self.width = low, high, width

    def __len__(self) -> int:
        return self.high - self.low + 1

    def __getitem__(self, index):
        if not 0 <= index < len(self):
            raise IndexError(index)
        return f"{self.low + index:0{self.width}d}"


def parent(location: str) -> str:
    return location.rsplit("/", 1)[0] if "/" in location else "."


def storage_for(location: str) -> LocalStorage | RemoteStorage:
    """The storage holding `location`: a local path or a URL of one of FILESYSTEMS's protocols."""
    if not is_remote(location):
        return LocalStorage()
    parts = urlsplit(location)
    if parts.password is not None or parts.username is not None:
        raise ValueError(f"{parts.scheme}://{parts.hostname}/...: credentials do not belong in a data location "
                         "(they would be written into run reports); set them in the environment or the client's "
                         "configuration files")
    if parts.scheme not in FILESYSTEMS:
        raise ValueError(f"{location}: unsupported location; local paths and {', '.join(sorted(FILESYSTEMS))}:// "
                         "are read")
    return RemoteStorage(parts.scheme)


class LocalStorage:
    """Files on this machine (regular files only: a FIFO or device is refused before a read)."""

    remote = False

    def stat_many(self, paths: Sequence[str]) -> list[FileStat | None]:
        """The FileStat of every path, None for the missing ones."""
        stats = []
        for path in paths:
            try:
                found = os.stat(path)
            except FileNotFoundError:
                stats.append(None)
                continue
            stats.append(FileStat(found.st_size, found.st_mtime_ns) if os.path.isfile(path) else None)
        return stats

    def read_file(self, path: str, limit: int, what: str) -> bytes:
        return read_bytes(path, limit, what)

    def read_ranges(self, ranges: Sequence[tuple[str, int, int]]) -> list[bytes]:
        """The bytes [start, end) of each (path, start, end)."""
        blocks = []
        for path, start, end in ranges:
            with open_regular(path) as handle:
                handle.seek(start)
                blocks.append(handle.read(end - start))
        return blocks

    def read_ahead(self, parts: Sequence[Sequence[tuple[str, int, int]]]) -> Iterator[list[bytes]]:
        """`read_ranges` of each part in turn."""
        for part in parts:
            yield self.read_ranges(part)

    def open(self, path: str) -> BinaryIO:
        return open_regular(path)

    def retry(self, call, path: str, what: str):
        return call()

    def exists(self, path: str) -> bool:
        return os.path.isfile(path)


class RemoteStorage:
    """Objects behind an fsspec file system, made afresh in each process (their clients do not survive a fork)."""

    remote = True

    def __init__(self, protocol: str):
        self.protocol = protocol
        self._fs, self._pid = None, None

    def __getstate__(self) -> dict:
        return {"protocol": self.protocol, "_fs": None, "_pid": None}

    @property
    def fs(self):
        if self._fs is None or self._pid != os.getpid():
            package, extra = FILESYSTEMS[self.protocol]
            try:
                import fsspec

                __import__(package)
            except ImportError as error:
                raise ImportError(f"{self.protocol}:// data needs fsspec and {package}: pip install "
                                  f"'bigtransfer[{extra}]'") from error
            self._fs = fsspec.filesystem(self.protocol, skip_instance_cache=True, **_client_options(self.protocol))
            if hasattr(self._fs, "retries"):
                self._fs.retries = 1  # one retry policy: ours (`retry`), which names the object at the end
            self._pid = os.getpid()
        return self._fs

    def stat_many(self, paths: Sequence[str]) -> list[FileStat | None]:
        """One listing per folder where the protocol lists (object stores), else one request per object."""
        listed: dict[str, dict] = {}
        if self.protocol not in ("http", "https"):
            for folder in sorted({parent(path) for path in paths}):
                entries = self.retry(lambda folder=folder: self.fs.ls(folder, detail=True), folder, "listing")
                listed.update({_strip(entry["name"]): entry for entry in entries})
        entries = ([listed.get(_strip(path)) for path in paths] if listed else
                   self.retry(lambda: self._infos(paths), paths[0], "metadata"))
        return [None if entry is None or entry.get("type") == "directory" else
                FileStat(int(entry["size"]), None, _etag(entry)) for entry in entries]

    def _infos(self, paths: Sequence[str]) -> list[dict | None]:
        """Every path's metadata, the requests sent concurrently (one HEAD each over http); None where missing."""
        from fsspec.asyn import sync

        async def gather():
            return await asyncio.gather(*(self.fs._info(path) for path in paths), return_exceptions=True)

        found = sync(self.fs.loop, gather) if hasattr(self.fs, "_info") else [self._info(path) for path in paths]
        for entry in found:
            if isinstance(entry, BaseException) and not isinstance(entry, FileNotFoundError):
                raise entry
        return [None if isinstance(entry, FileNotFoundError) else entry for entry in found]

    def _info(self, path: str) -> dict | BaseException:
        try:
            return self.fs.info(path)
        except FileNotFoundError as error:
            return error

    def read_file(self, path: str, limit: int, what: str) -> bytes:
        size = self.stat_many([path])[0]
        if size is None:
            raise FileNotFoundError(f"{path} not found")
        if size.bytes > limit:
            raise ValueError(f"{path} is {size.bytes:,} bytes, more than a {what} can be ({limit:,} bytes at most)")
        return self.read_ranges([(path, 0, size.bytes)])[0] if size.bytes else b""

    def read_ranges(self, ranges: Sequence[tuple[str, int, int]]) -> list[bytes]:
        """The bytes [start, end) of each (path, start, end): neighbours merged into one request, the requests
        sent concurrently, the whole retried on transient failures."""
        from fsspec.utils import merge_offset_ranges

        if not ranges:
            return []
        paths, starts, ends = (list(column) for column in zip(*ranges, strict=True))
        merged = merge_offset_ranges(paths, starts, ends, max_gap=COALESCE_GAP, sort=True)
        what = f"{len(ranges)} byte range(s), e.g. {starts[0]}-{ends[0]}"
        blocks = self.retry(lambda: self._fetch(*merged), paths[0], what)
        return [_cut(merged, blocks, path, start, end) for path, start, end in ranges]

    def _fetch(self, paths: list[str], starts: list[int], ends: list[int]) -> list[bytes]:
        return _checked(self.fs.cat_ranges(paths, starts, ends, on_error="return"), paths, starts, ends)

    def read_ahead(self, parts: Sequence[Sequence[tuple[str, int, int]]]) -> Iterator[list[bytes]]:
        """`read_ranges` of each part in turn, every part requested at once: the caller decodes the first while
        the others arrive. A part whose requests failed is read again through `read_ranges` (and its retries)."""
        from fsspec.utils import merge_offset_ranges

        fs, pending = self.fs, []
        for part in parts:
            paths, starts, ends = (list(column) for column in zip(*part, strict=True)) if part else ([], [], [])
            merged = merge_offset_ranges(paths, starts, ends, max_gap=COALESCE_GAP, sort=True)
            future = None
            if part and hasattr(fs, "_cat_ranges") and getattr(fs, "loop", None) is not None:
                future = asyncio.run_coroutine_threadsafe(fs._cat_ranges(*merged, on_error="return"), fs.loop)
            pending.append((part, merged, future))
        for part, merged, future in pending:
            try:
                blocks = _checked(future.result(), *merged) if future is not None else None
            except Exception:  # noqa: BLE001 - read again below, with retries and a message naming the object
                blocks = None
            yield ([_cut(merged, blocks, *wanted) for wanted in part] if blocks is not None
                   else self.read_ranges(part))

    def open(self, path: str) -> BinaryIO:
        return self.fs.open(path, "rb", block_size=8 << 20, cache_type="readahead")

    def exists(self, path: str) -> bool:
        return self.stat_many([path])[0] is not None

    def retry(self, call, path: str, what: str):
        """`call()`, again after transient failures (with growing pauses, up to RETRY_BUDGET_S), then an OSError
        naming the object."""
        began = time.monotonic()
        for attempt in itertools.count(1):
            try:
                return call()
            except _PERMANENT:
                raise
            except Exception as error:  # noqa: BLE001 - clients raise many types; the permanent ones are above
                if "Credentials" in type(error).__name__:  # botocore's NoCredentialsError and kin: no retry helps
                    raise PermissionError(f"{path}: {error}; give credentials in the environment or the client's "
                                          "configuration files (e.g. AWS_ACCESS_KEY_ID, ~/.aws/credentials)") from error
                delay = RETRY_DELAYS_S[min(attempt - 1, len(RETRY_DELAYS_S) - 1)]
                if attempt >= len(RETRY_DELAYS_S) or time.monotonic() - began + delay > RETRY_BUDGET_S:
                    raise OSError(f"{path}: reading {what} failed {attempt} times in {time.monotonic() - began:.0f} "
                                  f"s ({type(error).__name__}: {error})") from error
                time.sleep(delay)
                with contextlib.suppress(Exception):
                    self.fs.invalidate_cache(path)


def _client_options(protocol: str) -> dict:
    """Timeouts, so that a stalled connection is retried rather than waited on forever."""
    timeout = float(os.environ.get("BIGTRANSFER_READ_TIMEOUT") or DEFAULT_READ_TIMEOUT_S)
    if protocol == "s3":
        return {"config_kwargs": {"connect_timeout": timeout, "read_timeout": timeout,
                                  "retries": {"max_attempts": 1}}}
    if protocol in ("http", "https"):
        import aiohttp

        return {"client_kwargs": {"timeout": aiohttp.ClientTimeout(total=None, sock_connect=timeout,
                                                                   sock_read=timeout)}}
    return {}


def _strip(name: str) -> str:
    return name.split("://", 1)[-1].rstrip("/")


def _etag(entry: dict) -> str | None:
    etag = entry.get("ETag") or entry.get("etag")
    return str(etag).strip('"') if etag else None


def _checked(blocks: list, paths: list[str], starts: list[int], ends: list[int]) -> list[bytes]:
    for block, path, start, end in zip(blocks, paths, starts, ends, strict=True):
        if isinstance(block, BaseException):
            raise block
        if len(block) != end - start:  # a connection cut short: fetch again
            raise ConnectionError(f"{path}: {len(block)} of {end - start} bytes arrived")
    return blocks


def _cut(merged, blocks: list[bytes], path: str, start: int, end: int) -> bytes:
    for block_path, block_start, block_end, block in zip(*merged, blocks, strict=True):
        if block_path == path and block_start <= start and end <= block_end:
            return block[start - block_start:end - block_start]
    raise AssertionError(f"{path} {start}-{end} not among the merged ranges")
