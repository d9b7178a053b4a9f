"""Checkpoint files: readers (file -> dict of tensors), key maps (pure renames), writers and hub resolution."""

from .readers import read_safetensors, read_torch_pickle, read_weights_file

__all__ = ["read_safetensors", "read_torch_pickle", "read_weights_file"]
