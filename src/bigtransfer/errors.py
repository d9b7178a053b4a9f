"""The package's own exception types; each is a ValueError or OSError so generic handlers still catch them."""

import pickle


class CheckpointError(ValueError):
    """A weight file or directory that cannot be read or does not fit the model (message names file, key, shapes)."""


class UnsafeCheckpointError(CheckpointError):
    """A pickled checkpoint that would import or call code when loaded; it was refused and nothing was run."""


class BadImageError(ValueError):
    """An image file that cannot be opened or decoded, or is too large to decode safely; `path` names it."""

    def __init__(self, path: str, reason: str = ""):
        super().__init__(f"cannot read image {path}: {reason}" if reason else f"cannot read image {path}")
        self.path = str(path)
        self.reason = reason

    def __reduce__(self):  # keep path and reason across process boundaries (DataLoader workers)
        return (type(self), (self.path, self.reason))


class UnsafePickleError(pickle.UnpicklingError, ValueError):
    """A data pickle (CIFAR's batches) that would import or call code when loaded; refused, nothing was run."""
