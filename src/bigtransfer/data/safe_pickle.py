"""Loading data pickles (CIFAR's python batches) without running code from the file.

``pickle.load`` calls whatever global a file names, so a crafted file can run any command. The unpickler
here resolves only the few numpy functions that rebuild arrays; plain containers, strings, bytes and
numbers need no globals at all. Anything else is refused before it is called.
"""

from __future__ import annotations

import codecs
import io
import os
import pickle

import numpy as np

from ..errors import UnsafePickleError

try:  # numpy >= 2 moved the array internals to numpy._core; pickles written by either name them
    from numpy._core import multiarray as _multiarray
    from numpy._core import numeric as _numeric
except ImportError:  # pragma: no cover - numpy 1.x
    from numpy.core import multiarray as _multiarray
    from numpy.core import numeric as _numeric


def _dtype(*args, **kwargs) -> np.dtype:
    dtype = np.dtype(*args, **kwargs)
    if dtype.hasobject:
        raise UnsafePickleError("refusing to load an object array from a data pickle")
    return dtype


def _encode_latin1(text: str, encoding: str = "latin1") -> bytes:
    if encoding.replace("-", "").replace("_", "").lower() not in ("latin1", "iso88591"):
        raise UnsafePickleError(f"refusing _codecs.encode with encoding {encoding!r}")
    return codecs.encode(text, "latin1")


_ALLOWED_GLOBALS = {
    ("numpy", "ndarray"): np.ndarray,
    ("numpy", "dtype"): _dtype,
    ("numpy.core.multiarray", "_reconstruct"): _multiarray._reconstruct,
    ("numpy._core.multiarray", "_reconstruct"): _multiarray._reconstruct,
    ("numpy.core.numeric", "_frombuffer"): _numeric._frombuffer,
    ("numpy._core.numeric", "_frombuffer"): _numeric._frombuffer,
    # Python 3 writes bytes as _codecs.encode(text, "latin1") in protocol 2 (a pure data conversion).
    ("_codecs", "encode"): _encode_latin1,
}


class RestrictedUnpickler(pickle.Unpickler):
    """An unpickler that resolves only numpy array reconstruction; every other global is refused."""

    def find_class(self, module: str, name: str):
        try:
            return _ALLOWED_GLOBALS[(module, name)]
        except KeyError:
            raise UnsafePickleError(
                f"refusing to load global {module}.{name}: data pickles may only hold containers, "
                "strings, bytes, numbers and numpy arrays"
            ) from None

    def persistent_load(self, pid):
        raise UnsafePickleError("refusing persistent ids in a data pickle")


def _check_no_objects(value, where: str) -> None:
    if isinstance(value, np.ndarray) and value.dtype.hasobject:
        raise UnsafePickleError(f"{where}: object arrays are not allowed")
    if isinstance(value, dict):
        for item in value.values():
            _check_no_objects(item, where)
    elif isinstance(value, list | tuple):
        for item in value:
            _check_no_objects(item, where)


def safe_load(path: str | os.PathLike, encoding: str = "bytes"):
    """Unpickle a data file allowing only containers, str/bytes, numbers and numpy arrays.

    ``encoding="bytes"`` reads Python 2 pickles (CIFAR's) with their strings as ``bytes``.

    Raises:
        UnsafePickleError (a pickle.UnpicklingError and a ValueError): for any other global (the file's code is
            never run), naming the file.
        ValueError: a truncated or corrupt pickle, naming the file.
    """
    with open(path, "rb") as file:
        data = file.read()
    try:
        value = RestrictedUnpickler(io.BytesIO(data), encoding=encoding).load()
    except UnsafePickleError as error:
        raise UnsafePickleError(f"{path}: {error}") from None
    except (pickle.UnpicklingError, EOFError, ValueError, TypeError, IndexError, KeyError, AttributeError,
            OverflowError, RecursionError, MemoryError) as error:  # what malformed opcodes or lengths raise
        raise ValueError(
            f"{path} is not a readable pickle ({type(error).__name__}: {error}); it may be truncated or corrupt"
        ) from None
    _check_no_objects(value, str(path))
    return value
