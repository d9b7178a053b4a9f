"""Files of the user's: bounded reads of regular files only, atomic and transactional writes, and outputs that a
command may write into without touching anything else of the user's.

- Reading: `open_regular` opens only regular files (a FIFO would block forever, a device never end), and
  `read_bytes` / `read_json` check the size before reading.
- Writing: `atomic_path` replaces one file in one rename; `atomic_directory` replaces a whole directory at once
  (an atomic exchange where the file system has one), so a crash, a kill or a full disk leaves the old version or
  the new one, never a mix. Renames replace symbolic links themselves: writes never follow one out of the output.
- Owning an output: `claim_output` refuses an output that is, holds or lies inside an input, or that holds files
  which are not of the kind the command writes (unless the user says `--overwrite`).
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import json
import os
import re
import shutil
import stat
import tempfile
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path
from typing import Any, BinaryIO

from .errors import NotRegularFileError, OutputInUseError

_UMASK = os.umask(0o022)  # reading the umask means setting it: restore it at once (at import, one thread)
os.umask(_UMASK)
_TEMPORARY_SUFFIX = ".tmp"
_RANDOM_PART = re.compile(r"[a-z0-9_]+")  # the characters tempfile.mkstemp draws names from
MAX_JSON_BYTES = 32 << 20  # config.json with ImageNet-21k's 21,843 names is 1.3 MB; a JSON file past this is no config


# ---------------------------------------------------------------------------------------------------------------
# Reading.


def open_regular(path: str | os.PathLike) -> BinaryIO:
    """Open a regular file for reading in binary; IsADirectoryError for a directory and NotRegularFileError (an
    OSError naming the path) for anything else. The check is made on the opened file, so a path swapped for a FIFO
    in between is caught too."""
    descriptor = os.open(path, os.O_RDONLY | os.O_NONBLOCK | getattr(os, "O_CLOEXEC", 0))
    try:
        mode = os.fstat(descriptor).st_mode
        if stat.S_ISDIR(mode):
            raise IsADirectoryError(errno.EISDIR, os.strerror(errno.EISDIR), os.fspath(path))
        if not stat.S_ISREG(mode):
            raise NotRegularFileError(os.fspath(path), _kind(mode))
        os.set_blocking(descriptor, True)
        return os.fdopen(descriptor, "rb")
    except BaseException:
        os.close(descriptor)
        raise


def _kind(mode: int) -> str:
    for test, name in ((stat.S_ISFIFO, "a FIFO (named pipe)"), (stat.S_ISSOCK, "a socket"),
                       (stat.S_ISCHR, "a character device"), (stat.S_ISBLK, "a block device")):
        if test(mode):
            return name
    return "not a regular file"


def read_bytes(path: str | os.PathLike, limit: int, what: str) -> bytes:
    """The whole of a regular file of at most `limit` bytes; ValueError naming the file and `what` it should be."""
    with open_regular(path) as handle:
        size = os.fstat(handle.fileno()).st_size
        if size > limit:
            raise ValueError(f"{os.fspath(path)} is {size:,} bytes, more than a {what} can be ({limit:,} bytes at most)")
        return handle.read(limit + 1)


def read_json(path: str | os.PathLike, max_bytes: int = MAX_JSON_BYTES) -> dict[str, Any]:
    """Parse a JSON object from a file; a file that is not a JSON object raises ValueError naming it."""
    return json_object(read_bytes(path, max_bytes, "JSON file"), os.fspath(path))


def json_object(data: bytes, where: str) -> dict[str, Any]:
    """Parse the bytes of a JSON object (read from `where`, which errors name)."""
    try:
        parsed = json.loads(data.decode("utf-8-sig"))
    except (ValueError, UnicodeDecodeError, RecursionError) as error:  # ValueError: also 5,000-digit integers
        raise ValueError(f"{where} is not valid JSON: {error}") from None
    if not isinstance(parsed, dict):
        raise ValueError(f"{where} must hold a JSON object, got {type(parsed).__name__}")
    return parsed


# ---------------------------------------------------------------------------------------------------------------
# Writing.


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary path beside `path`; on success it replaces `path` in one rename, on error it is removed.

    Readers see the old file or the new one, never a partial write, even if the process is killed.
    """
    path = Path(path)
    handle, temporary = tempfile.mkstemp(prefix=f".{path.name}.", suffix=_TEMPORARY_SUFFIX, dir=path.parent)
    os.close(handle)
    temporary = Path(temporary)
    try:
        yield temporary
        with open(temporary, "rb+") as written:
            os.fsync(written.fileno())
        # mkstemp creates the file 0600; give it the mode a plain open() would (or the replaced file's).
        os.chmod(temporary, path.stat().st_mode & 0o7777 if path.is_file() else 0o666 & ~_UMASK)
        os.replace(temporary, path)
    finally:
        temporary.unlink(missing_ok=True)


def write_text_atomic(path: str | os.PathLike, text: str) -> None:
    """Write a text file atomically (see `atomic_path`)."""
    with atomic_path(path) as temporary:
        temporary.write_text(text, encoding="utf-8")


@contextlib.contextmanager
def atomic_directory(path: str | os.PathLike, keep_existing: bool | Callable[[str], bool] = False) -> Iterator[Path]:
    """Yield a temporary directory beside `path`; on success it takes `path`'s place as a whole, on error it is
    removed. An existing `path` is exchanged for it in one step (Linux `renameat2(RENAME_EXCHANGE)`), then
    deleted; where the file system cannot exchange, the old directory is moved aside first, so a crash there
    leaves it as `.NAME.*.old` beside the missing `path`. With `keep_existing`, entries of the old directory
    that the new one does not have are carried over (hard links, so nothing is copied) before the exchange; a
    function of the entry's name keeps only those it accepts."""
    path = Path(path)
    if path.is_symlink() or (path.exists() and not path.is_dir()):
        raise NotADirectoryError(f"cannot write {path}: it is a {'symbolic link' if path.is_symlink() else 'file'}, "
                                 "not a directory")
    temporary = Path(tempfile.mkdtemp(prefix=f".{path.name}.", suffix=_TEMPORARY_SUFFIX, dir=path.parent))
    try:
        yield temporary
        if keep_existing and path.is_dir():
            _link_missing(path, temporary, keep_existing if callable(keep_existing) else None)
        for file in sorted(temporary.rglob("*")):
            if file.is_file():
                with open(file, "rb+") as written:
                    os.fsync(written.fileno())
        os.chmod(temporary, 0o777 & ~_UMASK)  # mkdtemp makes it 0700
        if not path.exists():
            os.rename(temporary, path)
        elif not _exchange(temporary, path):
            aside = Path(tempfile.mkdtemp(prefix=f".{path.name}.", suffix=".old", dir=path.parent))
            os.rename(path, aside / path.name)
            os.rename(temporary, path)
            shutil.rmtree(aside)
        _fsync_directory(path.parent)
    finally:
        if temporary.exists():
            shutil.rmtree(temporary, ignore_errors=True)


def _link_missing(source: Path, target: Path, keep: Callable[[str], bool] | None = None) -> None:
    """Hard-link (or copy, across file systems) the entries of `source` that `target` lacks (and `keep` accepts)
    into `target`."""
    for entry in source.iterdir():
        destination = target / entry.name
        if destination.exists() or destination.is_symlink() or (keep is not None and not keep(entry.name)):
            continue
        if entry.is_symlink():
            os.symlink(os.readlink(entry), destination)
        elif entry.is_dir():
            shutil.copytree(entry, destination, copy_function=_link_or_copy, symlinks=True)
        else:
            _link_or_copy(entry, destination)


def _link_or_copy(source: str | os.PathLike, destination: str | os.PathLike) -> None:
    try:
        os.link(source, destination)
    except OSError:
        shutil.copy2(source, destination)


def _exchange(first: Path, second: Path) -> bool:
    """Swap two directories atomically; False where the system or file system cannot."""
    try:
        renameat2 = ctypes.CDLL(None, use_errno=True).renameat2
    except (OSError, AttributeError):
        return False
    at_cwd, exchange = -100, 2  # AT_FDCWD, RENAME_EXCHANGE
    if renameat2(at_cwd, os.fsencode(first), at_cwd, os.fsencode(second), exchange) == 0:
        return True
    code = ctypes.get_errno()
    if code in (errno.EINVAL, errno.ENOSYS, errno.EOPNOTSUPP):
        return False
    raise OSError(code, f"cannot replace {second}: {os.strerror(code)}", os.fspath(second))


def _fsync_directory(directory: Path) -> None:
    with contextlib.suppress(OSError):  # not every file system lets a directory be opened
        descriptor = os.open(directory, os.O_RDONLY)
        try:
            os.fsync(descriptor)
        finally:
            os.close(descriptor)


def is_atomic_temporary(filename: str, name: str) -> bool:
    """Whether `filename` is a temporary `atomic_path` or `atomic_directory` made for `name` (outlives only a
    killed writer)."""
    prefix = f".{name}."
    if not (filename.startswith(prefix) and filename.endswith(_TEMPORARY_SUFFIX)):
        return False
    return _RANDOM_PART.fullmatch(filename[len(prefix):-len(_TEMPORARY_SUFFIX)]) is not None


# ---------------------------------------------------------------------------------------------------------------
# Owning an output.


def claim_output(
    path: str | os.PathLike, kind: str, recognise: Callable[[Path], bool], inputs: Iterable[Any] = (),
    overwrite: bool = False, flag: str = "--output", create: bool = True,
) -> Path:
    """Check that a command may write `path` (a directory), and create it (unless `create=False`).

    Refused: `path` equal to, inside, or above one of `inputs` (local paths the command reads); a symbolic link;
    a file; an existing directory that is neither empty nor `recognise`d as this command's `kind` of output,
    unless `overwrite`. The message names the flag and what to do.
    """
    path = Path(path)
    if not str(path).strip():
        raise ValueError(f"{flag} is empty")
    check_outside_inputs(path, inputs, flag)
    if path.is_symlink():
        raise ValueError(f"{flag} {path} is a symbolic link; give the directory itself")
    if path.exists() and not path.is_dir():
        raise ValueError(f"{flag} {path} is a file: {kind} needs a directory (a new one, or one it wrote before)")
    if path.is_dir() and any(path.iterdir()) and not recognise(path) and not overwrite:
        shown = sorted(entry.name for entry in path.iterdir())
        listing = ", ".join(shown[:5]) + (f" and {len(shown) - 5} more" if len(shown) > 5 else "")
        raise OutputInUseError(
            f"{flag} {path} already holds files that are not a {kind} ({listing}); choose a new or empty directory, "
            "or pass --overwrite to write into it anyway (files of the same names are replaced, the others kept)"
        )
    if create:
        path.mkdir(parents=True, exist_ok=True)
    return path


def check_outside_inputs(path: str | os.PathLike, inputs: Iterable[Any], flag: str = "--output") -> None:
    """ValueError when `path` is one of `inputs`, lies inside one, or contains one (inputs that are not local paths
    are ignored)."""
    target = _real(Path(path))
    for source in inputs:
        if source is None or not isinstance(source, (str, os.PathLike)) or not os.path.exists(source):
            continue
        real = _real(Path(source))
        if target == real or real in target.parents or target in real.parents:
            relation = "is" if target == real else "is inside" if real in target.parents else "contains"
            raise ValueError(f"{flag} {path} {relation} the input {source}: outputs never go into, over or above "
                             "what a command reads; choose another directory")


def _real(path: Path) -> Path:
    """The absolute path with symbolic links resolved as far as the path exists."""
    return Path(os.path.realpath(path))
