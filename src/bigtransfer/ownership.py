"""Owning an output: `claim_output` refuses an output that is, holds or lies inside an input, or that holds files
which are not of the kind the command writes; `claim_files` refuses files beside a named output that the command
did not write (both unless the user says `--overwrite`); `folder_inside` gives a folder of an output that is not a
link out of it."""

from __future__ import annotations

import os
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

from .errors import OutputInUseError
from .files import named_operation


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


def claim_files(paths: Iterable[str | os.PathLike], ours: Callable[[], bool], overwrite: bool = False,
                flag: str = "--output") -> list[Path]:
    """Check that a command may write the files `paths` (the one `flag` names first, then the files it writes
    beside it). Refused: a directory among them; a file beside the named one that already exists, unless the set
    is `ours` (a previous output of the same command) or `overwrite`."""
    named, *beside = paths = [Path(path) for path in paths]
    for path in paths:
        if path.is_dir() and not path.is_symlink():
            raise IsADirectoryError(f"{flag} {named}: {path} is a directory; give a file name")
    existing = [str(path) for path in beside if path.exists() or path.is_symlink()]
    if existing and not overwrite and not ours():
        raise OutputInUseError(
            f"{flag} {named} would replace {', '.join(existing)}, not written with it by this command; choose "
            "another name, or pass --overwrite to replace them"
        )
    return paths


def folder_inside(root: str | os.PathLike, name: str, what: str) -> Path:
    """`root/name`, a folder a command creates and writes into (tracker logs), checked to stay inside `root`: a
    symbolic link (it would carry the writes wherever it points) or a file there is refused, naming it and `what`
    it is for. The folder is created."""
    path = Path(root) / name
    if path.is_symlink():
        raise ValueError(f"{path} is a symbolic link (to {os.readlink(path)}); {what} are written only inside "
                         f"{root}: remove the link, or choose another output")
    if path.exists() and not path.is_dir():
        raise NotADirectoryError(f"{path} is a file; {what} go into a folder of that name: move the file away, or "
                                 "choose another output")
    named_operation(lambda folder: folder.mkdir(parents=True, exist_ok=True), path)
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
