"""What every BiT model shares: weight init, input checks, activation checkpointing, and the transformers surface
(from_config, from_pretrained, save_pretrained, push_to_hub) delegating to `bigtransfer.checkpoints` and `hub`."""

from __future__ import annotations

import dataclasses
import os
from pathlib import Path
from typing import Any

import torch
from torch import nn

from . import hub
from .checkpoints import loader, writers
from .config import BitConfig


@dataclasses.dataclass(frozen=True)
class Checkpointing:
    """Activation checkpointing settings: every `every`-th layer, with `torch.utils.checkpoint` `options`."""

    every: int = 1
    options: dict = dataclasses.field(default_factory=dict)


class BitPreTrainedModel(nn.Module):
    """Shared behaviour: weight init, input checks, gradient checkpointing, save / load in transformers' layout."""

    config_class = BitConfig
    base_model_prefix = "bit"
    main_input_name = "pixel_values"
    supports_gradient_checkpointing = True  # transformers' BiT says False
    name_or_path = ""  # what from_pretrained loaded, as in transformers

    def __init__(self, config: BitConfig):
        super().__init__()
        if not isinstance(config, BitConfig):
            raise TypeError(f"config must be a bigtransfer.BitConfig, got {type(config).__name__}")
        if config.global_padding == "VALID":
            # transformers builds this and then fails on the first residual sum: every unpadded 3x3 conv
            # shrinks the branch by two pixels while the shortcut keeps its size.
            raise ValueError(
                "global_padding='VALID' cannot build a residual network: unpadded 3x3 convolutions shrink the "
                "residual branch so it no longer matches the shortcut; use None (symmetric) or 'SAME' padding"
            )
        self.config = config

    def _init_weights(self, module: nn.Module) -> None:
        if isinstance(module, nn.Conv2d):
            nn.init.kaiming_normal_(module.weight, mode="fan_out", nonlinearity="relu")
            if module.bias is not None:
                nn.init.zeros_(module.bias)
        elif isinstance(module, nn.GroupNorm):
            nn.init.ones_(module.weight)
            nn.init.zeros_(module.bias)
        elif isinstance(module, nn.Linear):
            module.reset_parameters()

    def post_init(self) -> None:
        self.apply(self._init_weights)

    @property
    def device(self) -> torch.device:
        return next(self.parameters()).device

    @property
    def dtype(self) -> torch.dtype:
        return next(self.parameters()).dtype

    @property
    def base_model(self) -> nn.Module:
        """The backbone (`self.bit`; a BitModel is its own): the usual handle to freeze it."""
        return getattr(self, self.base_model_prefix, self)

    def num_parameters(self, only_trainable: bool = False, exclude_embeddings: bool = False) -> int:
        """Parameters (`only_trainable`: those that require gradients); BiT has no embedding tables, so
        `exclude_embeddings` (what transformers' Trainer passes) changes nothing."""
        return sum(p.numel() for p in self.parameters() if p.requires_grad or not only_trainable)

    def get_memory_footprint(self, return_buffers: bool = True) -> int:
        """Bytes held by the parameters (and buffers)."""
        tensors = list(self.parameters()) + (list(self.buffers()) if return_buffers else [])
        return sum(tensor.nelement() * tensor.element_size() for tensor in tensors)

    def activation_checkpointing_enable(self, activation_checkpointing_kwargs: dict | None = None,
                                        every_n_layers: int = 1, offload: bool = False) -> None:
        """Recompute activations in the backward pass: less memory, about a third more compute. As in
        transformers: every `every_n_layers`-th layer, `activation_checkpointing_kwargs` passed to
        `torch.utils.checkpoint.checkpoint` (`use_reentrant` is False unless given)."""
        if isinstance(every_n_layers, bool) or not isinstance(every_n_layers, int) or every_n_layers < 1:
            raise ValueError(f"every_n_layers must be a positive integer, got {every_n_layers!r}")
        if offload:
            raise ValueError("offload=True (activations in pinned host memory) is not supported for BiT; its "
                             "activations are small next to a transformer's at long sequences")
        self.base_model.encoder.checkpointing = Checkpointing(every_n_layers, dict(activation_checkpointing_kwargs or {}))

    def activation_checkpointing_disable(self) -> None:
        self.base_model.encoder.checkpointing = None

    @property
    def is_activation_checkpointing(self) -> bool:
        return self.base_model.encoder.checkpointing is not None

    def gradient_checkpointing_enable(self, gradient_checkpointing_kwargs: dict | None = None, **kwargs: Any) -> None:
        """The older name of `activation_checkpointing_enable` (both are kept, as in transformers 5)."""
        self.activation_checkpointing_enable(gradient_checkpointing_kwargs, **kwargs)

    def gradient_checkpointing_disable(self) -> None:
        self.activation_checkpointing_disable()

    @property
    def is_gradient_checkpointing(self) -> bool:
        return self.is_activation_checkpointing

    def enable_input_require_grads(self) -> None:
        """Make the stem's output require gradients, so checkpointed layers of a frozen backbone (adapters,
        partial fine-tuning) still pass gradients on, as transformers does for input embeddings."""
        self.disable_input_require_grads()
        self._input_grad_hook = self.base_model.embedder.register_forward_hook(
            lambda module, inputs, output: output.requires_grad_(True)
        )

    def disable_input_require_grads(self) -> None:
        hook = getattr(self, "_input_grad_hook", None)
        if hook is not None:
            hook.remove()
            self._input_grad_hook = None

    def _checked_pixel_values(self, pixel_values: Any) -> torch.Tensor:
        """`pixel_values` validated, and in the weights' dtype (under autocast the convolutions pick their own)."""
        if not isinstance(pixel_values, torch.Tensor):
            raise TypeError(f"pixel_values must be a torch.Tensor, got {type(pixel_values).__name__}")
        if pixel_values.ndim != 4:
            raise ValueError(
                f"pixel_values must be 4-D (batch, channels, height, width), got shape {tuple(pixel_values.shape)}"
            )
        if not pixel_values.is_floating_point():
            raise TypeError(
                f"pixel_values must be a floating-point tensor, got {pixel_values.dtype}; use the image processor "
                "to turn images into normalised floats"
            )
        batch, channels, height, width = pixel_values.shape
        if channels != self.config.num_channels:
            raise ValueError(
                f"pixel_values has {channels} channels (shape {tuple(pixel_values.shape)}), but the model expects "
                f"{self.config.num_channels} (config.num_channels)"
            )
        if batch == 0 or height == 0 or width == 0:
            raise ValueError(f"pixel_values is empty: shape {tuple(pixel_values.shape)}")
        weight = next(self.parameters(), None)
        if weight is not None and pixel_values.device != weight.device:
            raise ValueError(
                f"pixel_values is on {pixel_values.device} but the model is on {weight.device}; move one of them "
                "(pixel_values.to(model.device))"
            )
        traced = torch.compiler.is_compiling() or torch.jit.is_tracing() or torch.jit.is_scripting()
        if not (traced or torch._C._functorch.is_functorch_wrapped_tensor(pixel_values)):  # vmap / grad: no data checks
            # A sum is one pass with no temporary; only a non-finite sum (or an overflow) needs the exact check.
            if not torch.isfinite(pixel_values.sum()) and not torch.isfinite(pixel_values).all():
                raise ValueError("pixel_values contains NaN or infinite values")
        return pixel_values if weight is None else pixel_values.to(weight.dtype)  # a bf16 model takes float32

    # -- persistence (file handling lives in bigtransfer.checkpoints) ------------------------------------------
    @classmethod
    def from_config(cls, config: BitConfig, *, dtype: Any = None, torch_dtype: Any = None) -> BitPreTrainedModel:
        """A freshly initialised model of `config` (transformers' `from_config` / `_from_config`), in `dtype` when
        given (a torch dtype or its name)."""
        if not isinstance(config, BitConfig):
            raise TypeError(f"config must be a bigtransfer.BitConfig, got {type(config).__name__}")
        dtype = dtype if dtype is not None else torch_dtype
        model = cls(config)
        return model if dtype is None else model.to(loader.resolve_dtype(dtype, torch.float32))

    _from_config = from_config

    @classmethod
    def from_pretrained(cls, path_or_name: str | os.PathLike | None = None, *args: Any, **kwargs: Any):
        """Load a model from a transformers-layout directory (config.json + model.safetensors or pytorch_model.bin),
        a Hub name (`google/bit-50`, `timm/resnetv2_50x1_bit.goog_in21k`), a single weights file in any supported
        format (timm, Google .npz, original big_transfer) or a Google name (`BiT-M-R50x1`).

        Keyword arguments override config fields (`num_labels=10`, `out_features=[...]`; a name that is neither a
        field nor a loading argument of transformers raises TypeError); with `ignore_mismatched_sizes=True` a head whose shape no longer matches is re-initialised
        (zeros, as the BiT recipe does) and a warning says so; without it a mismatch raises ValueError naming
        key and shapes. As in transformers, `dtype` (or `torch_dtype`: a torch dtype, "bfloat16", ... or "auto"
        for the stored weights' dtype) casts the model, `device_map` ("cuda:0", 0, "auto") moves it to one
        device, and `revision` picks a Hub branch, tag or commit.

        A weights file or Google name has no config.json: its architecture is read off the tensors, and a
        `num_labels` other than its head's starts a new zero head (no flag needed).

        transformers' other loading arguments work as there: `pretrained_model_name_or_path=`, `config=`,
        `state_dict=` (these tensors instead of the source's), `output_loading_info=True` (returns the model
        and sets of its missing / unexpected / mismatched keys), `subfolder`, `cache_dir`, `token`,
        `local_files_only`, `force_download`, `use_safetensors`, `variant` (model.<variant>.safetensors),
        `key_mapping` (regular expressions renaming the stored keys; the first match wins) and `device_map` as
        a device, "auto" or {"": device}. Keywords that mean nothing for a model that fits one device
        (`low_cpu_mem_usage`, `offload_folder`, `max_memory`, ...) are accepted and ignored
        (`checkpoints.loader.IGNORED_ARGUMENTS`); `proxies`, `weights_only=False`, `quantization_config`,
        `use_kernels`, `tp_plan`, `adapter_kwargs`, ... raise a ValueError naming the keyword and what to do instead
        (`checkpoints.loader.REFUSED_ARGUMENTS`). A head whose size does not fit raises `MismatchedSizesError`,
        both a ValueError and (as in transformers) a RuntimeError.

        Example:
            >>> model = BitForImageClassification.from_pretrained("runs/pets/model", num_labels=37,
            ...                                                   ignore_mismatched_sizes=True)
        """
        if args:
            raise TypeError(f"{cls.__name__}.from_pretrained takes the source and keyword arguments only")
        return loader.load(cls, path_or_name, **kwargs)

    def save_pretrained(
        self, save_directory: str | os.PathLike, safe_serialization: bool = True, *,
        max_shard_size: int | str | None = None, state_dict: dict[str, torch.Tensor] | None = None,
        is_main_process: bool = True, push_to_hub: bool = False, variant: str | None = None, **hub_kwargs: Any,
    ) -> None:
        """Write config.json and model.safetensors (or pytorch_model.bin) atomically, loadable by transformers.

        As in transformers: `max_shard_size` ("5GB", bytes) splits the weights into indexed shards, `state_dict`
        saves those tensors, `variant` names the weight files model.<variant>.safetensors, `is_main_process=False`
        writes nothing (other ranks), `push_to_hub=True` also uploads what was written, with a model card
        (`repo_id=`, default the directory's name, and `push_to_hub`'s other arguments).
        """
        if not is_main_process:
            return
        writers.save_transformers(self, save_directory, safe_serialization=safe_serialization,
                                  max_shard_size=max_shard_size, state_dict=state_dict, variant=variant)
        if push_to_hub:
            self.push_to_hub(hub_kwargs.pop("repo_id", Path(save_directory).name), max_shard_size=max_shard_size,
                             safe_serialization=safe_serialization, variant=variant, **hub_kwargs)

    def push_to_hub(self, repo_id: str, *, commit_message: str | None = None, private: bool | None = None,
                    token: str | bool | None = None, revision: str | None = None, create_pr: bool = False,
                    max_shard_size: int | str | None = None, safe_serialization: bool = True,
                    variant: str | None = None):
        """Upload config.json and the weights (sharded and named as `save_pretrained` would write them) to the Hugging
        Face Hub repository `repo_id` (created if missing), with a model card when the repository has none."""
        pipeline_tag = "image-classification" if hasattr(self, "classifier") else "image-feature-extraction"
        return hub.push_folder(
            repo_id, lambda directory: writers.save_transformers(
                self, directory, safe_serialization=safe_serialization, max_shard_size=max_shard_size, variant=variant),
            commit_message=commit_message, private=private, token=token, revision=revision, create_pr=create_pr,
            model_card=hub.model_card(repo_id, pipeline_tag),
        )
