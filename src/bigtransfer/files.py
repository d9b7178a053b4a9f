"""Small file helpers shared by every module that writes user data: atomic writes and JSON reading."""

from __future__ import annotations

import contextlib
import json
import os
import re
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

_UMASK = os.umask(0o022)  # reading the umask means setting it: restore it at once (at import, one thread)
os.umask(_UMASK)
_TEMPORARY_SUFFIX = ".tmp"
_RANDOM_PART = re.compile(r"[a-z0-9_]+")  # the characters tempfile.mkstemp draws names from


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
        os.chmod(temporary, path.stat().st_mode & 0o7777 if path.exists() else 0o666 & ~_UMASK)
        os.replace(temporary, path)
    finally:
        temporary.unlink(missing_ok=True)


def write_text_atomic(path: str | os.PathLike, text: str) -> None:
    """Write a text file atomically (see `atomic_path`)."""
    with atomic_path(path) as temporary:
        temporary.write_text(text, encoding="utf-8")


def is_atomic_temporary(filename: str, name: str) -> bool:
    """Whether `filename` is a temporary `atomic_path` made for a file called `name` (outlives only a killed writer)."""
    prefix = f".{name}."
    if not (filename.startswith(prefix) and filename.endswith(_TEMPORARY_SUFFIX)):
        return False
    return _RANDOM_PART.fullmatch(filename[len(prefix):-len(_TEMPORARY_SUFFIX)]) is not None


def read_json(path: str | os.PathLike) -> dict[str, Any]:
    """Parse a JSON object from a file; a file that is not a JSON object raises ValueError naming it."""
    try:
        with open(path, encoding="utf-8") as handle:
            data = json.load(handle)
    except (json.JSONDecodeError, UnicodeDecodeError) as error:
        raise ValueError(f"{path} is not valid JSON: {error}") from None
    if not isinstance(data, dict):
        raise ValueError(f"{path} must hold a JSON object, got {type(data).__name__}")
    return data
