"""Writers: a model (or its state) back to the tool a user came from: timm, Google .npz, original big_transfer.

Each writer is a key map (`bigtransfer.checkpoints.keymaps`) plus one atomic file write; values are copied
bit for bit, so reading the file back gives the same tensors. The weight-standardization eps is not stored
in any of these formats: timm computes with 1e-8, the original code with 1e-10 (`config.ws_eps` here).
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import save_file

from ..files import atomic_path
from . import keymaps


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
    return _save_tensors(to_timm(model_or_state), Path(path))


def save_big_transfer(model_or_state, path: str | os.PathLike) -> Path:
    """Write an original big_transfer state dict: safetensors for a `.safetensors` path, else `torch.save`."""
    return _save_tensors(to_big_transfer(model_or_state), Path(path))


def save_npz(model_or_state, path: str | os.PathLike) -> Path:
    """Write a Google-style BiT .npz (loadable by timm's `model.load_pretrained(path)` and the original code)."""
    path = Path(path)
    arrays = to_google(model_or_state)
    path.parent.mkdir(parents=True, exist_ok=True)
    with atomic_path(path) as temporary, open(temporary, "wb") as handle:
        np.savez(handle, **arrays)
    return path


def _save_tensors(state: dict[str, torch.Tensor], path: Path) -> Path:
    state = {key: value.contiguous() for key, value in state.items()}
    path.parent.mkdir(parents=True, exist_ok=True)
    with atomic_path(path) as temporary:
        if path.suffix == ".safetensors":
            save_file(state, str(temporary), metadata={"format": "pt"})
        else:
            torch.save(state, temporary)
    return path
