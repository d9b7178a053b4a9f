"""Files of the user's: bounded reads of regular files only, atomic and transactional writes.

- Reading: `open_regular` opens only regular files (a FIFO would block forever, a device never end), and
  `read_bytes` / `read_json` check the size before reading.
- Writing: `atomic_path` replaces one file in one rename; `staged_outputs` puts every file a command writes (and
  its intermediates) in a staging folder beside the output and commits them together; `atomic_directory` is its
  one-folder case. A crash, a kill or a full disk leaves the old version or the new one, never a mix, and what a
  killed writer left is swept (or completed) by the next write of the same name. Renames replace symbolic links
  themselves: writes never follow one out of the output, nor does `folder_inside`.
Which outputs a command may write into is `bigtransfer.ownership`.
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import hashlib
import json
import logging
import os
import re
import secrets
import shutil
import signal
import socket
import stat
import tempfile
import threading
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, BinaryIO

from .errors import NotRegularFileError

logger = logging.getLogger("bigtransfer")

_UMASK = os.umask(0o022)  # reading the umask means setting it: restore it at once (at import, one thread)
os.umask(_UMASK)
_TEMPORARY_SUFFIX = ".tmp"
_RANDOM_PART = re.compile(r"[a-z0-9_]+")  # the characters tempfile.mkstemp draws names from
_HOST = hashlib.sha1(socket.gethostname().encode()).hexdigest()[:8]  # in temporary names: whose they are
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
    _sweep_temporaries(path)
    handle, temporary = tempfile.mkstemp(prefix=f".{path.name}.{_HOST}_{os.getpid()}_", suffix=_TEMPORARY_SUFFIX,
                                         dir=path.parent)
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


def _sweep_temporaries(path: Path) -> None:
    """Delete the temporaries of `path` that writers killed on this host left (their process is gone)."""
    prefix = f".{path.name}.{_HOST}_"
    with contextlib.suppress(FileNotFoundError, NotADirectoryError), os.scandir(path.parent) as entries:
        leftovers = [entry.name for entry in entries if entry.name.startswith(prefix)
                     and entry.name.endswith(_TEMPORARY_SUFFIX) and entry.is_file(follow_symlinks=False)]
    for name in leftovers:
        pid = name[len(prefix):].split("_", 1)[0]
        if pid.isdigit() and not is_alive(int(pid)):
            (path.parent / name).unlink(missing_ok=True)


def write_text_atomic(path: str | os.PathLike, text: str) -> None:
    """Write a text file atomically (see `atomic_path`)."""
    with atomic_path(path) as temporary:
        temporary.write_text(text, encoding="utf-8")


@contextlib.contextmanager
def atomic_directory(path: str | os.PathLike, keep_existing: bool | Callable[[str], bool] = False) -> Iterator[Path]:
    """Yield a new directory to fill; on success it takes `path`'s place as a whole (an atomic exchange where the
    file system has one), on error it is removed. With `keep_existing`, entries of the old directory that the new
    one does not have are carried over (hard links, so nothing is copied); a function of the entry's name keeps
    only those it accepts. A one-entry `staged_outputs`: what a killed writer leaves is swept by the next write
    of `path`."""
    path = Path(path)
    if path.is_symlink() or (path.exists() and not path.is_dir()):
        raise NotADirectoryError(f"cannot write {path}: it is a {'symbolic link' if path.is_symlink() else 'file'}, "
                                 "not a directory")
    with staged_outputs(path, keep_existing=keep_existing) as staging:
        directory = staging.path(path)
        directory.mkdir()
        yield directory


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


# ---------------------------------------------------------------------------------------------------------------
# Staged outputs: everything a command writes, as one transaction.

_STAGING_SUFFIX = ".staging"
_COMMIT_NAME = ".commit.json"  # written once every staged file is complete: from then on the new version wins
_STAGING_NAME = re.compile(r"(?P<host>[0-9a-f]{8})-(?P<pid>\d+)-[0-9a-f]{8}")
_HANDLED_SIGNALS = tuple(getattr(signal, name) for name in ("SIGINT", "SIGTERM", "SIGHUP") if hasattr(signal, name))


class Staging:
    """Where a command writes its outputs before they are put in place (see `staged_outputs`)."""

    def __init__(self, directory: Path, primary: Path):
        self.directory, self.primary = directory, primary
        self.targets: dict[str, Path] = {}
        self.obsolete: list[Path] = []
        self.committed = False  # the commit record is written: only rolling forward is left

    def path(self, target: str | os.PathLike) -> Path:
        """The staged path for `target` (a file or a directory beside the primary output): write it there."""
        target = Path(target)
        if target.parent != self.primary.parent or target.name in (_COMMIT_NAME, "scratch"):
            raise ValueError(f"{target} cannot be staged with {self.primary}: outputs of one command share a folder")
        self.targets[target.name] = target
        return self.directory / target.name

    @property
    def scratch(self) -> Path:
        """A folder for intermediate files, removed with the staging directory (a kill included: swept later)."""
        folder = self.directory / "scratch"
        folder.mkdir(exist_ok=True)
        return folder

    def remove_on_commit(self, path: str | os.PathLike) -> None:
        """A file beside the output that the new version makes obsolete: deleted once the new version is in."""
        self.obsolete.append(Path(path))


@contextlib.contextmanager
def staged_outputs(primary: str | os.PathLike, keep_existing: bool | Callable[[str], bool] = False) -> Iterator[Staging]:
    """Stage every file a command writes beside `primary`, and put them in place together.

    The staged files live in a hidden `.NAME.HOST-PID-TOKEN.staging` folder beside `primary`. When the block
    succeeds a commit record is written, then each staged entry replaces its target (files by one rename, folders
    by an atomic exchange; `keep_existing` carries the old folder's other entries over), the primary last. On an
    error, SIGINT, or SIGTERM / SIGHUP where nothing else handles them, the staging folder is removed; one left by
    a killed process is swept by the next `staged_outputs` of the same name: rolled forward when its commit record
    was written (the new version, whole), removed otherwise (the old version, untouched). Nothing existing is read.
    """
    primary = Path(primary)
    primary.parent.mkdir(parents=True, exist_ok=True)
    sweep_staged(primary)
    directory = primary.parent / f".{primary.name}.{_HOST}-{os.getpid()}-{secrets.token_hex(4)}{_STAGING_SUFFIX}"
    named_operation(os.mkdir, directory)
    staging = Staging(directory, primary)
    try:
        with _signals_raise():
            yield staging
        for name, target in staging.targets.items():
            if (directory / name).is_dir() and keep_existing and target.is_dir() and not target.is_symlink():
                _link_missing(target, directory / name, keep_existing if callable(keep_existing) else None)
        with _signals_blocked():
            _commit(staging)
    except BaseException as error:
        if not staging.committed:
            shutil.rmtree(directory, ignore_errors=True)
        if isinstance(error, OSError) and error.filename is None:  # np.save, tar writers: no path
            reason = os.strerror(error.errno) if error.errno else f"{error} (is the disk full?)"
            raise _path_error(error.errno or errno.EIO, f"cannot write {primary}: {reason}") from error
        raise  # a commit that failed half-way is left for the next sweep, which completes it
    shutil.rmtree(directory, ignore_errors=True)


def _commit(staging: Staging) -> None:
    """Make the staged files durable, record the commit, and put every entry in place."""
    directory = staging.directory
    names = sorted(staging.targets, key=lambda name: name == staging.primary.name)  # the primary last
    for name in names:
        _fsync_tree(directory / name)
    record = {"entries": [[name, os.lstat(directory / name).st_ino] for name in names],
              "obsolete": [path.name for path in staging.obsolete if path.parent == staging.primary.parent]}
    with open(directory / _COMMIT_NAME, "w", encoding="utf-8") as handle:
        handle.write(json.dumps(record))
        handle.flush()
        os.fsync(handle.fileno())
    _fsync_directory(directory)
    staging.committed = True
    _roll_forward(directory, staging.primary.parent, record)


def _roll_forward(directory: Path, parent: Path, record: dict[str, Any]) -> None:
    """Put each entry whose staged copy is still the new one (same inode) in place, then delete obsolete files."""
    for name, inode in record["entries"]:
        staged, target = directory / name, parent / name
        try:
            if os.lstat(staged).st_ino != inode:
                continue  # exchanged already: this is the old version
        except FileNotFoundError:
            continue  # renamed into place already
        if staged.is_dir() and target.is_dir() and not target.is_symlink():
            if not _exchange(staged, target):
                named_operation(os.rename, target, directory / f"{name}.old")
                named_operation(os.rename, staged, target)
        else:
            named_operation(os.replace, staged, target)
    for name in record["obsolete"]:
        with contextlib.suppress(FileNotFoundError, IsADirectoryError):
            (parent / name).unlink()
    _fsync_directory(parent)


def sweep_staged(primary: str | os.PathLike) -> list[Path]:
    """Finish or remove what killed writers of `primary` left: their staging folders, rolled forward when they got
    as far as their commit record, else deleted. Folders of live processes and of other hosts are left alone."""
    primary = Path(primary)
    prefix = f".{primary.name}."
    swept = []
    with contextlib.suppress(FileNotFoundError, NotADirectoryError), os.scandir(primary.parent) as entries:
        leftovers = [Path(entry.path) for entry in entries if entry.name.startswith(prefix)
                     and entry.name.endswith(_STAGING_SUFFIX) and entry.is_dir(follow_symlinks=False)]
    for directory in leftovers:
        match = _STAGING_NAME.fullmatch(directory.name[len(prefix):-len(_STAGING_SUFFIX)])
        if match is None or match["host"] != _HOST or is_alive(int(match["pid"])):
            continue
        try:
            record = read_json(directory / _COMMIT_NAME)
        except (OSError, ValueError):
            record = None  # no commit record (or a torn one): the write never finished, the old version stays
        if record is not None:
            logger.warning("completing %s, whose writer was killed after it had written everything", primary)
            _roll_forward(directory, primary.parent, record)
        shutil.rmtree(directory, ignore_errors=True)
        swept.append(directory)
    return swept


def is_alive(pid: int) -> bool:
    """Whether process `pid` exists on this host (one we may not signal counts as alive)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        pass
    return True


@contextlib.contextmanager
def _signals_raise() -> Iterator[None]:
    """SIGTERM and SIGHUP, where nothing else handles them, raise KeyboardInterrupt instead of killing the process
    outright, so the staged files are removed on the way out (SIGINT does so by itself)."""
    previous = {}
    if threading.current_thread() is threading.main_thread():
        for signum in _HANDLED_SIGNALS[1:]:
            if signal.getsignal(signum) == signal.SIG_DFL:
                previous[signum] = signal.signal(signum, signal.default_int_handler)  # KeyboardInterrupt
    try:
        yield
    finally:
        for signum, handler in previous.items():
            signal.signal(signum, handler)


@contextlib.contextmanager
def _signals_blocked() -> Iterator[None]:
    """The commit's renames are not interrupted by a signal (it is delivered once they are done)."""
    if threading.current_thread() is not threading.main_thread() or not hasattr(signal, "pthread_sigmask"):
        yield
        return
    previous = signal.pthread_sigmask(signal.SIG_BLOCK, _HANDLED_SIGNALS)
    try:
        yield
    finally:
        signal.pthread_sigmask(signal.SIG_SETMASK, previous)


def _fsync_tree(path: Path) -> None:
    for file in [path] if path.is_file() else [file for file in sorted(path.rglob("*")) if file.is_file()]:
        with open(file, "rb+") as written:
            os.fsync(written.fileno())


def named_operation(operation: Callable[..., Any], *paths: Path) -> Any:
    """Run a file-system operation; an OSError names the path (disk full, permission, exists)."""
    try:
        return operation(*paths)
    except OSError as error:
        if error.filename is not None or error.errno is None:
            raise
        raise _path_error(error.errno, f"cannot write {paths[-1]}: {os.strerror(error.errno)}") from None


def _path_error(code: int, message: str) -> OSError:
    error = OSError(message)  # one line naming the path once: str() is the message while filename is unset
    error.errno = code
    return error


def is_atomic_temporary(filename: str, name: str) -> bool:
    """Whether `filename` is a temporary `atomic_path` or a staging folder `staged_outputs` (`atomic_directory`)
    made for `name` (outlives only a killed writer)."""
    prefix = f".{name}."
    if not filename.startswith(prefix):
        return False
    middle = filename[len(prefix):]
    if middle.endswith(_STAGING_SUFFIX):
        return _STAGING_NAME.fullmatch(middle[: -len(_STAGING_SUFFIX)]) is not None
    return middle.endswith(_TEMPORARY_SUFFIX) and _RANDOM_PART.fullmatch(middle[: -len(_TEMPORARY_SUFFIX)]) is not None
