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
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import save_file

from ..files import atomic_path
from . import keymaps
from .readers import RECORDED_CONFIG_KEY, SAFE_WEIGHTS_NAME, WEIGHTS_NAME

RECORDED_FIELDS = ("num_groups", "ws_eps", "gn_eps", "hidden_act", "global_padding", "embedding_dynamic_padding")


def save_transformers(model: torch.nn.Module, directory: str | os.PathLike, safe_serialization: bool = True) -> Path:
    """config.json + model.safetensors (or pytorch_model.bin), each written atomically: the layout
    `from_pretrained` reads here and in transformers. The config records the class (`architectures`) and the
    weights' dtype, as transformers does."""
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
    state = {key: value.detach().cpu().contiguous() for key, value in model.state_dict().items()}
    if safe_serialization:
        with atomic_path(directory / SAFE_WEIGHTS_NAME) as temporary:
            save_safetensors(state, temporary, {"format": "pt"}, directory / SAFE_WEIGHTS_NAME)
        (directory / WEIGHTS_NAME).unlink(missing_ok=True)
    else:
        with atomic_path(directory / WEIGHTS_NAME) as temporary:
            torch.save(state, temporary)
        (directory / SAFE_WEIGHTS_NAME).unlink(missing_ok=True)
    return directory


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
