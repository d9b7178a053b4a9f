"""The package's own exception types; each is a ValueError or OSError so generic handlers still catch them."""


class CheckpointError(ValueError):
    """A weight file or directory that cannot be read or does not fit the model (message names file, key, shapes)."""


class UnsafeCheckpointError(CheckpointError):
    """A pickled checkpoint that would import or call code when loaded; it was refused and nothing was run."""
