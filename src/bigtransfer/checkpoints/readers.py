"""Readers: pure functions from a file to a `dict[str, torch.Tensor]`, with errors that name the file."""

from __future__ import annotations

import os
import pickle
import zipfile
from pathlib import Path

import numpy as np
import torch
from safetensors import SafetensorError
from safetensors.torch import load_file

from ..errors import CheckpointError, UnsafeCheckpointError


def read_safetensors(path: str | os.PathLike) -> dict[str, torch.Tensor]:
    """Every tensor of a .safetensors file, on the CPU."""
    path = _existing_file(path)
    try:
        return load_file(str(path), device="cpu")
    except (SafetensorError, OSError, ValueError, RuntimeError) as error:
        raise CheckpointError(f"{path} is not a readable safetensors file ({error}); it may be truncated or corrupt") from None


def read_torch_pickle(path: str | os.PathLike) -> dict[str, torch.Tensor]:
    """A state dict saved with torch.save (.bin / .pth / .pt), loaded with `weights_only=True`.

    Pickles that reference anything but tensors and plain containers are refused without running anything.
    A checkpoint that wraps its state dict (`{"state_dict": ...}`, `{"model": ...}`) is unwrapped.
    """
    path = _existing_file(path)
    try:
        data = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as error:
        raise UnsafeCheckpointError(
            f"refused to load {path}: it is a pickle that would run code or build objects other than tensors "
            f"when loaded ({str(error).splitlines()[0]}); nothing from it was executed"
        ) from None
    except (RuntimeError, EOFError, OSError, ValueError, KeyError, IndexError, TypeError) as error:
        raise CheckpointError(f"{path} is not a readable PyTorch checkpoint ({error}); it may be truncated or corrupt") from None
    for wrapper in ("state_dict", "model", "model_state_dict", "module"):
        if isinstance(data, dict) and isinstance(data.get(wrapper), dict):
            data = data[wrapper]
    if not isinstance(data, dict) or not all(isinstance(v, torch.Tensor) for v in data.values()):
        raise CheckpointError(f"{path} does not hold a state dict (a mapping of names to tensors)")
    return {str(key): value for key, value in data.items()}


def read_npz(path: str | os.PathLike) -> dict[str, torch.Tensor]:
    """Every array of a NumPy .npz archive (Google's BiT checkpoints) as a CPU tensor, names unchanged.

    Loaded with `allow_pickle=False`: an archive holding object arrays (pickles) is refused, nothing is run.
    """
    path = _existing_file(path)
    try:
        with np.load(path, allow_pickle=False) as archive:
            arrays = {name: archive[name] for name in archive.files}
    except ValueError as error:
        if "allow_pickle" in str(error):
            raise UnsafeCheckpointError(
                f"refused to load {path}: it holds pickled object arrays, which could run code when loaded; "
                "nothing from it was executed"
            ) from None
        raise CheckpointError(f"{path} is not a readable .npz archive ({error}); it may be truncated or corrupt") from None
    except (OSError, EOFError, zipfile.BadZipFile, KeyError) as error:
        raise CheckpointError(f"{path} is not a readable .npz archive ({error}); it may be truncated or corrupt") from None
    tensors = {}
    for name, array in arrays.items():
        if array.dtype.kind not in "fiub":
            raise CheckpointError(f"{path}: array {name} has dtype {array.dtype}, expected numbers")
        tensors[name] = torch.from_numpy(np.ascontiguousarray(array))
    return tensors


def file_kind(path: str | os.PathLike) -> str:
    """'npz', 'torch' or 'safetensors', from the file's bytes, whatever its name says.

    safetensors: an 8-byte little-endian header length, then a JSON header; torch.save: a zip archive holding
    a pickle, or (legacy) a bare pickle starting with the protocol byte 0x80; .npz: a zip of .npy files.
    """
    path = _existing_file(path)
    with open(path, "rb") as handle:
        head = handle.read(9)
    header_length = int.from_bytes(head[:8], "little") if len(head) == 9 else 0
    if head[8:9] == b"{" and 0 < header_length <= path.stat().st_size - 8:
        return "safetensors"
    if head[:2] == b"PK":
        try:
            with zipfile.ZipFile(path) as archive:
                names = archive.namelist()
        except (zipfile.BadZipFile, OSError) as error:
            raise CheckpointError(f"{path} looks like a zip archive but cannot be read ({error})") from None
        if names and all(name.endswith(".npy") for name in names):
            return "npz"
        return "torch"
    if head[:1] == b"\x80":
        return "torch"
    raise CheckpointError(f"{path} is not a safetensors, torch.save or .npz file (its first bytes are {head[:8]!r})")


READERS = {"npz": read_npz, "torch": read_torch_pickle, "safetensors": read_safetensors}


def read_weights_file(path: str | os.PathLike) -> dict[str, torch.Tensor]:
    """Read a .safetensors file, a torch pickle or a .npz archive, chosen by the file's bytes, not its name."""
    return READERS[file_kind(path)](path)


def _existing_file(path: str | os.PathLike) -> Path:
    path = Path(path)
    if not path.is_file():
        raise OSError(f"no such weights file: {path}")
    if path.stat().st_size == 0:
        raise CheckpointError(f"{path} is empty (0 bytes)")
    return path
