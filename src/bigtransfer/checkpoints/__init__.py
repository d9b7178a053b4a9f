"""Checkpoint files: readers (file -> dict of tensors), key maps (pure renames), writers and hub resolution."""

from .convert import (
    ConversionResult,
    convert_checkpoint,
    imagenet21k_labels,
    imagenet_labels,
    load_checkpoint,
    read_labels,
)
from .formats import Checkpoint, Preprocessing, read_checkpoint
from .readers import read_npz, read_safetensors, read_torch_pickle, read_weights_file
from .writers import save_big_transfer, save_npz, save_timm, to_big_transfer, to_google, to_timm

__all__ = [
    "Checkpoint",
    "ConversionResult",
    "Preprocessing",
    "convert_checkpoint",
    "imagenet21k_labels",
    "imagenet_labels",
    "load_checkpoint",
    "read_checkpoint",
    "read_labels",
    "read_npz",
    "read_safetensors",
    "read_torch_pickle",
    "read_weights_file",
    "save_big_transfer",
    "save_npz",
    "save_timm",
    "to_big_transfer",
    "to_google",
    "to_timm",
]
