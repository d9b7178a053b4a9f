"""The package's own exception types (each a ValueError or OSError, so generic handlers still catch them) and the
helpers that word messages: the original text of a DataLoader worker's error, close matches for a mistyped name."""

import difflib
import pickle
import re
from collections.abc import Iterable


class CheckpointError(ValueError):
    """A weight file or directory that cannot be read or does not fit the model (message names file, key, shapes)."""


class MismatchedSizesError(CheckpointError, RuntimeError):
    """A head whose size does not fit the model's (a ValueError here, a RuntimeError as transformers raises it, so
    `except RuntimeError` written for transformers catches it too)."""


class UnsafeCheckpointError(CheckpointError):
    """A pickled checkpoint that would import or call code when loaded; it was refused and nothing was run."""


class SourceNotFoundError(FileNotFoundError):
    """A model source that is neither an existing path nor a name that could be resolved (the message lists what
    is accepted and the closest known names)."""


class NotRegularFileError(OSError):
    """A path that is a FIFO, a device, a socket or a directory where a regular file was expected: opening it could
    block forever or never end, so it is refused before any read."""

    def __init__(self, path: str, kind: str):
        super().__init__(f"{path} is {kind}, not a regular file")
        self.path, self.kind = path, kind

    def __reduce__(self):
        return (type(self), (self.path, self.kind))


class OutputInUseError(ValueError):
    """An output directory that holds the user's own files (not the kind of output the command writes)."""


class OutOfMemoryError(RuntimeError, MemoryError):
    """Work that does not fit the memory: the message gives the sizes and what to change. A RuntimeError as torch's
    out-of-memory errors are, and a MemoryError."""


class BadImageError(ValueError):
    """An image file that cannot be opened or decoded, or is too large to decode safely; `path` names it."""

    def __init__(self, path: str, reason: str = ""):
        path = str(path)
        if not reason and _WORKER_TRACEBACK in path:  # re-raised by torch from a DataLoader worker (see below)
            found = re.fullmatch(r"cannot read image (.*?): ((?:\w+(?:Error|Exception)|not an image|more pixels).*)",
                                 original_message(path), re.S)
            path, reason = found.groups() if found else (original_message(path), "")
        super().__init__(f"cannot read image {path}: {reason}" if reason else f"cannot read image {path}")
        self.path = path
        self.reason = reason

    def __reduce__(self):  # keep path and reason across process boundaries (DataLoader workers)
        return (type(self), (self.path, self.reason))


class UnsafePickleError(pickle.UnpicklingError, ValueError):
    """A data pickle (CIFAR's batches) that would import or call code when loaded; refused, nothing was run."""


# torch re-raises an exception from a DataLoader worker as `type(error)(text)`, where the text is
# "Caught <type> in DataLoader worker process N.\nOriginal Traceback (most recent call last):\n<frames>\n
# <module.type>: <message>": the original arguments are lost and the message carries a traceback.
_WORKER_TRACEBACK = "Original Traceback (most recent call last):"


def original_message(text: str) -> str:
    """The original message inside torch's DataLoader re-raise text; any other text unchanged."""
    if _WORKER_TRACEBACK not in text:
        return text
    lines = text.split(_WORKER_TRACEBACK, 1)[1].splitlines()
    last_frame = max((index for index, line in enumerate(lines) if line[:1].isspace()), default=-1)
    original = "\n".join(lines[last_frame + 1 :]).strip()
    return re.sub(r"^[\w.]+: ", "", original, count=1)  # drop "module.Type: "


def did_you_mean(word: str, choices: Iterable[str]) -> str:
    """" (did you mean X?)" naming the closest of `choices` to a mistyped `word`, or "" when none is close."""
    scored = sorted(((difflib.SequenceMatcher(None, word, choice).ratio(), choice) for choice in set(choices)),
                    reverse=True)
    matches = [choice for score, choice in scored[:3] if score >= max(0.6, scored[0][0] - 0.05)] if scored else []
    return f" (did you mean {' or '.join(matches)}?)" if matches else ""
