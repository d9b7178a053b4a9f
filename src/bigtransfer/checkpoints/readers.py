"""Readers: pure functions from a file or directory to a `dict[str, torch.Tensor]`, with errors that name the file.

Files are read by their bytes (safetensors, torch pickle, .npz), whatever their names say; directories in the
transformers and timm layouts (`config.json` beside model.safetensors, sharded safetensors or
pytorch_model.bin) by the weight file names those libraries write. The files are untrusted input, and the parsers underneath (safetensors, torch.load, zipfile, numpy) raise
almost any exception type on damaged bytes (AssertionError, struct.error, MemoryError, ...): every reader
turns whatever they raise into a CheckpointError naming the file.
"""

from __future__ import annotations

import json
import os
import pickle
import re
import zipfile
from pathlib import Path

import numpy as np
import torch
from safetensors import safe_open
from safetensors.torch import load_file

from ..errors import CheckpointError, UnsafeCheckpointError
from ..files import read_json

SAFE_WEIGHTS_NAME = "model.safetensors"
SAFE_WEIGHTS_INDEX_NAME = "model.safetensors.index.json"
WEIGHTS_NAME = "pytorch_model.bin"
# The safetensors metadata key under which the writers record what the tensors cannot tell (GroupNorm groups,
# epsilons), as a JSON object.
RECORDED_CONFIG_KEY = "bigtransfer_config"


def read_safetensors(path: str | os.PathLike) -> dict[str, torch.Tensor]:
    """Every tensor of a .safetensors file, on the CPU."""
    path = _existing_file(path)
    try:
        return load_file(str(path), device="cpu")
    except Exception as error:  # damaged bytes: see the module docstring
        raise _corrupt(path, "safetensors file", error) from None


def read_torch_pickle(path: str | os.PathLike) -> dict[str, torch.Tensor]:
    """A state dict saved with torch.save (.bin / .pth / .pt), loaded with `weights_only=True`.

    Pickles that reference anything but tensors and plain containers are refused without running anything.
    A checkpoint that wraps its state dict (`{"state_dict": ...}`, `{"model": ...}`) is unwrapped.
    """
    path = _existing_file(path)
    try:
        data = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as error:
        refusal = _weights_only_refusal(error)
        if refusal is None:  # e.g. "pickle data was truncated"
            raise _corrupt(path, "PyTorch checkpoint", error) from None
        raise UnsafeCheckpointError(
            f"refused to load {path}: it is a pickle that would run code or build objects other than tensors "
            f"when loaded ({refusal}); nothing from it was executed"
        ) from None
    except Exception as error:  # damaged bytes: see the module docstring
        raise _corrupt(path, "PyTorch checkpoint", error) from None
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
        raise _corrupt(path, ".npz archive", error) from None
    except Exception as error:  # damaged bytes: see the module docstring
        raise _corrupt(path, ".npz archive", error) from None
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
        except Exception as error:  # damaged bytes: see the module docstring
            raise CheckpointError(f"{path} looks like a zip archive but cannot be read ({_one_line(error)})") from None
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


def read_directory_weights(directory: str | os.PathLike) -> dict[str, torch.Tensor]:
    """The state dict of a transformers- or timm-layout directory: model.safetensors, else the shards its
    model.safetensors.index.json lists, else pytorch_model.bin."""
    directory = Path(directory)
    if (directory / SAFE_WEIGHTS_NAME).is_file():
        return read_safetensors(directory / SAFE_WEIGHTS_NAME)
    if (directory / SAFE_WEIGHTS_INDEX_NAME).is_file():
        index = read_json(directory / SAFE_WEIGHTS_INDEX_NAME)
        state: dict[str, torch.Tensor] = {}
        for shard in sorted(set(index.get("weight_map", {}).values())):
            if Path(shard).name != shard:
                raise CheckpointError(f"{directory / SAFE_WEIGHTS_INDEX_NAME} names a shard outside the directory: {shard}")
            state.update(read_safetensors(directory / shard))
        return state
    if (directory / WEIGHTS_NAME).is_file():
        return read_torch_pickle(directory / WEIGHTS_NAME)
    raise CheckpointError(
        f"no weights in {directory}: expected {SAFE_WEIGHTS_NAME}, {SAFE_WEIGHTS_INDEX_NAME} or {WEIGHTS_NAME}"
    )


def read_recorded_config(path: str | os.PathLike) -> dict:
    """The BitConfig fields a bigtransfer writer recorded in a safetensors file's metadata (empty for files
    written elsewhere)."""
    path = Path(path)
    try:
        with safe_open(str(path), framework="pt") as handle:
            metadata = handle.metadata() or {}
        recorded = json.loads(metadata.get(RECORDED_CONFIG_KEY, "{}"))
    except Exception as error:  # damaged bytes: see the module docstring
        raise _corrupt(path, "safetensors file", error) from None
    if not isinstance(recorded, dict):
        raise CheckpointError(f"{path}: metadata {RECORDED_CONFIG_KEY} must be a JSON object, got {recorded!r}")
    return recorded


def _one_line(error: BaseException) -> str:
    text = re.sub(r"\x1b\[[0-9;]*m", "", str(error))  # torch colours parts of its messages
    return " ".join(line.strip() for line in text.splitlines() if line.strip()) or type(error).__name__


def _corrupt(path: Path, kind: str, error: BaseException) -> CheckpointError:
    return CheckpointError(
        f"{path} is not a readable {kind} ({type(error).__name__}: {_one_line(error)}); it may be truncated or corrupt"
    )


def _weights_only_refusal(error: pickle.UnpicklingError) -> str | None:
    """What torch's weights-only unpickler refused ("unsupported GLOBAL os.system ..."), or None for damaged data.

    torch's message is a page of advice (including how to load the file unsafely); only its reason is kept.
    Its wording varies between torch versions ("Unsupported global: GLOBAL builtins.exec", "Trying to load
    unsupported GLOBAL os.makedirs whose module os is blocked"), so anything the weights-only loader rejects
    counts as a refusal unless the reason says the pickle itself is cut short.
    """
    text = re.sub(r"\x1b\[[0-9;]*m", "", str(error))
    if "Weights only load failed" not in text:
        return None  # e.g. "pickle data was truncated" from the plain unpickler
    reasons = [
        line.strip()
        for line in text.splitlines()
        if re.search(r"unsupported global|WeightsUnpickler error|blocked|not an allowed", line, re.IGNORECASE)
    ]
    reason = reasons[0] if reasons else ""
    reason = reason.removeprefix("WeightsUnpickler error:").strip()
    if re.search(r"truncated|unexpected end|EOF", reason, re.IGNORECASE):
        return None
    return reason.split(". Please")[0].split(" Please")[0].rstrip(".") or "an object weights-only loading does not allow"


def _existing_file(path: str | os.PathLike) -> Path:
    path = Path(path)
    if not path.is_file():
        raise OSError(f"no such weights file: {path}")
    if path.stat().st_size == 0:
        raise CheckpointError(f"{path} is empty (0 bytes)")
    return path
