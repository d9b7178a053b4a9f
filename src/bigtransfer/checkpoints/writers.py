"""Writers: a model (or its state) in the transformers directory layout, or back to the tool a user came from
(timm, Google .npz, original big_transfer).

Each writer is a key map (`bigtransfer.checkpoints.keymaps`) plus atomic file writes; values are copied bit for
bit, so reading the file back gives the same tensors. What the tensors cannot tell (GroupNorm groups, the
epsilons) is not part of the timm, .npz and original formats: their safetensors files carry it in their metadata
(`readers.RECORDED_CONFIG_KEY`); otherwise readers infer it (timm computes with ws eps 1e-8, the original code
with 1e-10).
"""

from __future__ import annotations

import json
import os
import re
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import save_file

from ..files import atomic_path
from ..hub import weight_names
from . import keymaps
from .readers import RECORDED_CONFIG_KEY

RECORDED_FIELDS = ("num_groups", "ws_eps", "gn_eps", "hidden_act", "global_padding", "embedding_dynamic_padding")


def save_transformers(
    model: torch.nn.Module, directory: str | os.PathLike, safe_serialization: bool = True,
    max_shard_size: int | str | None = None, state_dict: dict[str, torch.Tensor] | None = None,
    variant: str | None = None,
) -> Path:
    """config.json + model.safetensors (or pytorch_model.bin), each written atomically: the layout
    `from_pretrained` reads here and in transformers. The config records the class (`architectures`) and the
    weights' dtype, as transformers does. `max_shard_size` (bytes, or "5GB", "500MB", "2GiB") splits the weights
    into model-0000i-of-0000N.safetensors files and an index; `state_dict` saves those tensors instead of the
    model's; `variant` names the files model.<variant>.safetensors (and so on) as transformers does. Weight files
    of another layout left from an earlier save of the same variant are removed."""
    safe, _, pickled = weight_names(variant)  # checks the variant before anything is written
    directory = save_config(model, directory)
    state = {key: value.detach().cpu().contiguous() for key, value in (state_dict or model.state_dict()).items()}
    if not safe_serialization:
        if max_shard_size is not None:
            raise ValueError("max_shard_size shards safetensors files only: keep safe_serialization=True")
        with atomic_path(directory / pickled) as temporary:
            torch.save(state, temporary)
        written = {pickled}
    else:
        written = _save_shards(state, directory, None if max_shard_size is None else parse_size(max_shard_size), variant)
    _remove_other_weights(directory, written, variant)
    return directory


def save_config(model: torch.nn.Module, directory: str | os.PathLike) -> Path:
    """The model's config.json, recording its class (`architectures`) and its weights' dtype as transformers
    does; returns the directory (created if needed)."""
    directory = Path(directory)
    if directory.exists() and not directory.is_dir():
        raise NotADirectoryError(f"cannot save model: {directory} is a file, not a directory")
    directory.mkdir(parents=True, exist_ok=True)
    config = model.config
    config.extra["architectures"] = [type(model).__name__]
    parameter = next(model.parameters(), None)
    config.extra["dtype"] = str(parameter.dtype if parameter is not None else torch.float32).removeprefix("torch.")
    config.extra.pop("torch_dtype", None)
    config.save_pretrained(directory)
    return directory


def _save_shards(state: dict[str, torch.Tensor], directory: Path, shard_bytes: int | None,
                 variant: str | None = None) -> set[str]:
    """model.safetensors, or shards of at most `shard_bytes` (a larger tensor gets a shard of its own) and the index
    (transformers' names, with `variant`)."""
    single, index_name, _ = weight_names(variant)
    shards: list[dict[str, torch.Tensor]] = [{}]
    size = 0
    for key, value in state.items():
        nbytes = value.numel() * value.element_size()
        if shard_bytes is not None and shards[-1] and size + nbytes > shard_bytes:
            shards.append({})
            size = 0
        shards[-1][key] = value
        size += nbytes
    if len(shards) == 1:
        with atomic_path(directory / single) as temporary:
            save_safetensors(state, temporary, {"format": "pt"}, directory / single)
        return {single}
    stem = single.removesuffix(".safetensors")
    names = [f"{stem}-{index:05d}-of-{len(shards):05d}.safetensors" for index in range(1, len(shards) + 1)]
    for name, shard in zip(names, shards, strict=True):
        with atomic_path(directory / name) as temporary:
            save_safetensors(shard, temporary, {"format": "pt"}, directory / name)
    index = {"metadata": {"total_size": sum(v.numel() * v.element_size() for v in state.values())},
             "weight_map": {key: name for name, shard in zip(names, shards, strict=True) for key in shard}}
    with atomic_path(directory / index_name) as temporary:
        temporary.write_text(json.dumps(index, indent=2) + "\n", encoding="utf-8")
    return {*names, index_name}


def _remove_other_weights(directory: Path, written: set[str], variant: str | None = None) -> None:
    names = weight_names(variant)
    shard = re.compile(re.escape(names[0].removesuffix(".safetensors")) + r"-\d{5}-of-\d{5}\.safetensors")
    for path in directory.iterdir():
        stale = path.name in names or shard.fullmatch(path.name) is not None
        if stale and path.name not in written:
            path.unlink()


def parse_size(size: int | str) -> int:
    """Bytes from an int or transformers' size strings: "5GB" (10^9), "500MB", "2GiB" (2^30), "100KB"."""
    if isinstance(size, int) and not isinstance(size, bool) and size > 0:
        return size
    match = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([KMGT]?)(i?)B\s*", str(size), re.IGNORECASE)
    if not match:
        raise ValueError(f"max_shard_size must be a number of bytes or a size such as '5GB' or '500MiB', got {size!r}")
    number, unit, binary = float(match[1]), match[2].upper(), bool(match[3])
    return max(1, int(number * (1024 if binary else 1000) ** " KMGT".index(unit or " ")))


def transformers_state(model_or_state: torch.nn.Module | dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The transformers-named state of a bigtransfer model (or of a state dict), detached, on the CPU."""
    state = model_or_state.state_dict() if isinstance(model_or_state, torch.nn.Module) else model_or_state
    return {key: value.detach().cpu() for key, value in state.items()}


def to_timm(model_or_state) -> dict[str, torch.Tensor]:
    """A timm `resnetv2_*_bit` state dict (`timm.create_model(..., num_classes=N).load_state_dict` takes it)."""
    return keymaps.from_transformers(transformers_state(model_or_state), keymaps.TIMM)


def to_google(model_or_state) -> dict[str, np.ndarray]:
    """Google .npz arrays (`resnet/...` names, HWIO kernels, float32), as the original code and timm read them."""
    state = keymaps.from_transformers(transformers_state(model_or_state), keymaps.GOOGLE)
    return {key: value.float().numpy() if value.is_floating_point() else value.numpy() for key, value in state.items()}


def to_big_transfer(model_or_state) -> dict[str, torch.Tensor]:
    """An original big_transfer `ResNetV2` state dict (`root.conv`, `body.block{b}.unit{NN}`, `head.gn/conv`)."""
    return keymaps.from_transformers(transformers_state(model_or_state), keymaps.BIG_TRANSFER)


def save_timm(model_or_state, path: str | os.PathLike) -> Path:
    """Write a timm state dict: safetensors for a `.safetensors` path, else `torch.save` (.pth / .bin)."""
    return _save_tensors(to_timm(model_or_state), Path(path), _recorded(model_or_state))


def save_big_transfer(model_or_state, path: str | os.PathLike) -> Path:
    """Write an original big_transfer state dict: safetensors for a `.safetensors` path, else `torch.save`."""
    return _save_tensors(to_big_transfer(model_or_state), Path(path), _recorded(model_or_state))


def save_npz(model_or_state, path: str | os.PathLike) -> Path:
    """Write a Google-style BiT .npz (loadable by timm's `model.load_pretrained(path)` and the original code)."""
    path = Path(path)
    arrays = to_google(model_or_state)
    path.parent.mkdir(parents=True, exist_ok=True)
    with atomic_path(path) as temporary, open(temporary, "wb") as handle:
        np.savez(handle, **arrays)
    return path


def save_safetensors(state: dict[str, torch.Tensor], path: Path, metadata: dict[str, str],
                     shown: Path | None = None) -> None:
    """safetensors' save_file, with its write errors (a full disk) as the OSError they are, naming `shown` (the
    file being replaced, when `path` is its temporary)."""
    try:
        save_file(state, str(path), metadata=metadata)
    except OSError:
        raise
    except Exception as error:  # safetensors raises its own SafetensorError for I/O failures
        raise OSError(f"cannot write {shown or path}: {error}") from None


def _recorded(model_or_state) -> dict:
    """The config fields a model's tensors cannot tell (nothing for a bare state dict)."""
    config = getattr(model_or_state, "config", None)
    return {} if config is None else {name: getattr(config, name) for name in RECORDED_FIELDS}


def _save_tensors(state: dict[str, torch.Tensor], path: Path, recorded: dict) -> Path:
    state = {key: value.contiguous() for key, value in state.items()}
    path.parent.mkdir(parents=True, exist_ok=True)
    with atomic_path(path) as temporary:
        if path.suffix == ".safetensors":
            metadata = {"format": "pt"} | ({RECORDED_CONFIG_KEY: json.dumps(recorded)} if recorded else {})
            save_safetensors(state, temporary, metadata, path)
        else:
            torch.save(state, temporary)
    return path
