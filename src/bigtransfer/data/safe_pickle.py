"""Loading data pickles (CIFAR's python batches) without running code from the file, within a budget.

``pickle.load`` calls whatever global a file names, so a crafted file can run any command. The unpickler
here resolves only the few numpy functions that rebuild arrays; plain containers, strings, bytes and
numbers need no globals at all. Anything else is refused before it is called.

Nor may a small file cost much: arrays are only ever rebuilt from the bytes the file holds (an empty shell
filled by ``__setstate__``, as numpy writes them, never an allocation of a size the file merely names), and the
object check visits each shared container once, so a kilobyte of references to references (the "billion laughs"
shape) is walked in microseconds, not 2^60 steps.
"""

from __future__ import annotations

import codecs
import io
import math
import os
import pickle

import numpy as np

from ..errors import UnsafePickleError
from ..files import read_bytes

MAX_PICKLE_BYTES = 2 << 30  # CIFAR-100's training pickle is 155 MB

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


def _reconstruct(subtype, shape, dtype):
    """numpy's array shell for unpickling: refused unless empty (its data must come from the file itself)."""
    if not isinstance(shape, tuple) or math.prod(int(size) for size in shape) != 0:
        raise UnsafePickleError(f"refusing to allocate an array of shape {str(shape)[:60]} that the file does not hold")
    return _multiarray._reconstruct(np.ndarray if subtype is _ndarray else subtype, shape, dtype)


def _ndarray(shape, dtype=float, *args, **kwargs):
    """`numpy.ndarray(shape, dtype)` called by the file: bounded as `_reconstruct` is (empty only)."""
    return _reconstruct(np.ndarray, shape if isinstance(shape, tuple) else (shape,), _dtype(dtype))


def _encode_latin1(text: str, encoding: str = "latin1") -> bytes:
    if encoding.replace("-", "").replace("_", "").lower() not in ("latin1", "iso88591"):
        raise UnsafePickleError(f"refusing _codecs.encode with encoding {encoding!r}")
    return codecs.encode(text, "latin1")


_ALLOWED_GLOBALS = {
    ("numpy", "ndarray"): _ndarray,
    ("numpy", "dtype"): _dtype,
    ("numpy.core.multiarray", "_reconstruct"): _reconstruct,
    ("numpy._core.multiarray", "_reconstruct"): _reconstruct,
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


MAX_CONTAINERS = 10_000_000  # distinct lists, tuples and dicts: CIFAR-100's train pickle has 6


def _check_no_objects(value, where: str) -> None:
    """Refuse object arrays anywhere in `value`; each container is visited once however often it is shared."""
    seen: set[int] = set()
    pending = [value]
    while pending:
        item = pending.pop()
        if isinstance(item, np.ndarray):
            if item.dtype.hasobject:
                raise UnsafePickleError(f"{where}: object arrays are not allowed")
            continue
        if not isinstance(item, (dict, list, tuple)) or id(item) in seen:
            continue
        seen.add(id(item))
        if len(seen) > MAX_CONTAINERS:
            raise ValueError(f"{where} holds more than {MAX_CONTAINERS:,} containers; not a data pickle")
        pending.extend(item.values() if isinstance(item, dict) else item)


def safe_load(path: str | os.PathLike, encoding: str = "bytes"):
    """Unpickle a data file allowing only containers, str/bytes, numbers and numpy arrays.

    ``encoding="bytes"`` reads Python 2 pickles (CIFAR's) with their strings as ``bytes``.

    Raises:
        UnsafePickleError (a pickle.UnpicklingError and a ValueError): for any other global (the file's code is
            never run), naming the file.
        ValueError: a truncated or corrupt pickle, naming the file.
    """
    data = read_bytes(path, MAX_PICKLE_BYTES, "data pickle")
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
