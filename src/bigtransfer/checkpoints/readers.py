"""Readers: pure functions from a file to a `dict[str, torch.Tensor]`, with errors that name the file."""

from __future__ import annotations

import os
import pickle
from pathlib import Path

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


def read_weights_file(path: str | os.PathLike) -> dict[str, torch.Tensor]:
    """Read a .safetensors file or a torch pickle, chosen by the file's first bytes rather than its name."""
    path = _existing_file(path)
    with open(path, "rb") as handle:
        head = handle.read(8)
    if head[:2] == b"PK" or head[:1] == b"\x80":  # zip-format torch.save, or a legacy pickle
        return read_torch_pickle(path)
    return read_safetensors(path)


def _existing_file(path: str | os.PathLike) -> Path:
    path = Path(path)
    if not path.is_file():
        raise OSError(f"no such weights file: {path}")
    if path.stat().st_size == 0:
        raise CheckpointError(f"{path} is empty (0 bytes)")
    return path
