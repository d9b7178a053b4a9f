"""Checkpoint files: readers (file or directory -> tensors), key maps (pure renames), formats (what a source
holds), the one loader (config, model class given, one strict load), writers and labels. Names become paths
in `bigtransfer.hub`.
"""

from .formats import Checkpoint, Preprocessing, describe_variant, read_checkpoint
from .labels import imagenet21k_labels, imagenet_labels, read_labels
from .loader import build, load, read, resolve
from .readers import read_directory_weights, read_npz, read_safetensors, read_torch_pickle, read_weights_file
from .writers import (
    save_big_transfer,
    save_npz,
    save_timm,
    save_transformers,
    to_big_transfer,
    to_google,
    to_timm,
)

__all__ = [
    "Checkpoint",
    "Preprocessing",
    "build",
    "describe_variant",
    "imagenet21k_labels",
    "imagenet_labels",
    "load",
    "read",
    "read_checkpoint",
    "read_directory_weights",
    "read_labels",
    "read_npz",
    "read_safetensors",
    "read_torch_pickle",
    "read_weights_file",
    "resolve",
    "save_big_transfer",
    "save_npz",
    "save_timm",
    "save_transformers",
    "to_big_transfer",
    "to_google",
    "to_timm",
]
