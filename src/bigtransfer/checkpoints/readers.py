"""Readers: pure functions from a file or directory to a `dict[str, torch.Tensor]`, with errors that name the file.

Files are read by their bytes (safetensors, torch pickle, .npz), whatever their names say; directories in the
transformers and timm layouts (`config.json` beside model.safetensors, sharded safetensors or
pytorch_model.bin) by the weight file names those libraries write. The files are untrusted input, and the parsers underneath (safetensors, torch.load, zipfile, numpy) raise
almost any exception type on damaged bytes (AssertionError, struct.error, MemoryError, ...): every reader
turns whatever they raise into a CheckpointError naming the file.
"""

from __future__ import annotations

import json
import math
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
from ..files import open_regular
from ..hub import shard_names, weight_names

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
        data = _torch_load(path)
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
    for key, value in data.items():
        _check_stored(path, str(key), value)
    return {str(key): value for key, value in data.items()}


def _torch_load(path: Path):
    """torch.load, weights only, memory-mapped where the file allows it (the zip format): nothing is read into
    memory until it is used, whatever sizes the file declares."""
    try:
        return torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except RuntimeError as error:
        if "mmap" not in str(error):
            raise
        return torch.load(path, map_location="cpu", weights_only=True)  # the legacy format cannot be mapped


def _check_stored(path: Path, key: str, tensor: torch.Tensor) -> None:
    """Refuse a tensor that declares more elements than its storage holds (a stride-0 or overlapping view): a copy
    of it would allocate what the file never stored."""
    needed = tensor.numel() * tensor.element_size()
    stored = tensor.untyped_storage().nbytes()
    if needed > stored:
        raise CheckpointError(
            f"{path}: {key} declares {tuple(tensor.shape)} ({needed:,} bytes) over {stored:,} stored bytes (strides "
            f"{tensor.stride()}); a checkpoint's tensors hold their own values"
        )


# A zip member may declare at most this many times its compressed size, once the archive passes 256 MiB: weights
# compress about 1.1x (savez_compressed of a checkpoint with a zero 21k-class head: 3x), a zip bomb thousands of times.
MAX_EXPANSION = 64
_EXPANSION_FLOOR = 256 << 20


def read_npz(path: str | os.PathLike) -> dict[str, torch.Tensor]:
    """Every array of a NumPy .npz archive (Google's BiT checkpoints) as a CPU tensor, names unchanged.

    Loaded with `allow_pickle=False`: an archive holding object arrays (pickles) is refused, nothing is run.
    Before any array is read, what the archive declares is checked against what it holds: members that would
    expand more than `MAX_EXPANSION` times, and array headers whose shapes need more bytes than their member
    has, are refused. Big-endian arrays are read in the machine's byte order.
    """
    path = _existing_file(path)
    try:
        with zipfile.ZipFile(path) as archive:
            _check_archive(path, archive)
            arrays = {}
            for member in archive.infolist():
                with archive.open(member) as stream:
                    _check_npy_header(path, member, stream)
                with archive.open(member) as stream:
                    arrays[member.filename.removesuffix(".npy")] = np.lib.format.read_array(stream, allow_pickle=False)
    except CheckpointError:
        raise
    except ValueError as error:
        if "allow_pickle" in str(error) or "Object arrays" in str(error):
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
        if not array.dtype.isnative:
            array = array.astype(array.dtype.newbyteorder("="))
        tensors[name] = torch.from_numpy(np.ascontiguousarray(array))
    return tensors


def _check_archive(path: Path, archive: zipfile.ZipFile) -> None:
    declared = sum(member.file_size for member in archive.infolist())
    compressed = sum(member.compress_size for member in archive.infolist())
    if declared > _EXPANSION_FLOOR and declared > MAX_EXPANSION * max(compressed, 1):
        raise CheckpointError(
            f"{path}: its members declare {declared:,} bytes from {compressed:,} compressed ({declared // max(compressed, 1):,}x); "
            f"refused as a possible zip bomb (weights do not compress {MAX_EXPANSION}x)"
        )


def _check_npy_header(path: Path, member: zipfile.ZipInfo, stream) -> None:
    """The shape and dtype an .npy member declares must fit in the bytes it holds."""
    version = np.lib.format.read_magic(stream)
    if version == (1, 0):
        shape, _, dtype = np.lib.format.read_array_header_1_0(stream)
    elif version == (2, 0):
        shape, _, dtype = np.lib.format.read_array_header_2_0(stream)
    else:
        raise CheckpointError(f"{path}: {member.filename} is an .npy of version {version}, expected 1.0 or 2.0")
    needed = math.prod(shape) * dtype.itemsize
    if needed > member.file_size:
        raise CheckpointError(
            f"{path}: {member.filename} declares shape {shape} of {dtype} ({needed:,} bytes) but holds "
            f"{member.file_size:,}"
        )


def file_kind(path: str | os.PathLike) -> str:
    """'npz', 'torch' or 'safetensors', from the file's bytes, whatever its name says.

    safetensors: an 8-byte little-endian header length, then a JSON header; torch.save: a zip archive holding
    a pickle, or (legacy) a bare pickle starting with the protocol byte 0x80; .npz: a zip of .npy files.
    """
    path = _existing_file(path)
    with open_regular(path) as handle:
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


def read_directory_weights(directory: str | os.PathLike, use_safetensors: bool | None = None,
                           variant: str | None = None) -> dict[str, torch.Tensor]:
    """The state dict of a transformers- or timm-layout directory: model.safetensors, else the shards its
    model.safetensors.index.json lists, else pytorch_model.bin (`use_safetensors`: True, safetensors only;
    False, pytorch_model.bin only; `variant`: those files' variant names, see `weight_names`)."""
    directory = Path(directory)
    safe, index, pickled = weight_names(variant)
    if use_safetensors is not False:
        if (directory / safe).is_file():
            return read_safetensors(directory / safe)
        if (directory / index).is_file():
            state: dict[str, torch.Tensor] = {}
            for shard in shard_names(directory / index):
                state.update(read_safetensors(directory / shard))
            return state
    if use_safetensors is not True and (directory / pickled).is_file():
        return read_torch_pickle(directory / pickled)
    expected = {None: f"{safe}, {index} or {pickled}", True: f"{safe} or {index} (use_safetensors=True)",
                False: f"{pickled} (use_safetensors=False)"}[use_safetensors]
    raise CheckpointError(f"no weights in {directory}: expected {expected}")


def has_directory_weights(directory: Path, variant: str | None = None) -> bool:
    return any((directory / name).is_file() for name in weight_names(variant))


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
    """`path`, if it is a non-empty regular file (a FIFO or a device is refused before it is read)."""
    path = Path(path)
    if not path.exists():
        raise OSError(f"no such weights file: {path}")
    with open_regular(path) as handle:
        if os.fstat(handle.fileno()).st_size == 0:
            raise CheckpointError(f"{path} is empty (0 bytes)")
    return path
