"""BiT models: stem -> bottleneck layers -> stages -> encoder -> BitModel / BitForImageClassification / BitBackbone.

Module and parameter names follow transformers exactly, so its checkpoints load here and ours load there.
`from_pretrained` / `save_pretrained` delegate to `bigtransfer.checkpoints` (the model code opens no files).
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
import torch.utils._pytree as pytree
from torch import nn
from torch.utils.checkpoint import checkpoint

from . import hub, integrations
from .checkpoints import loader, writers
from .config import BitConfig, make_divisible
from .layers import DropPath, GroupNormAct, MaxPool2dSame, StdConv2d, activation

# ---------------------------------------------------------------------------------------------------------------
# Outputs: named fields, with the tuple and dict access of transformers' ModelOutput.


class ModelOutput(dict):
    """Named fields (each output class is a dataclass) that also read as a dict of the fields that are not None
    (`out["logits"]`, `out.get("loss")`, `out.keys()`) and by position (`out[0]`, `out.to_tuple()`, None fields left
    out), as transformers' ModelOutput does.

    Built from keywords or, as transformers' is, from one mapping of field names (`type(out)({...})`: accelerate's
    mixed precision and the pipelines rebuild outputs that way). Every subclass is a pytree node, so torch.export,
    torch.onnx, `torch.jit.trace(strict=False)`, `torch.func.vmap` and DDP see its tensors as a plain container's.
    """

    def __post_init__(self) -> None:
        names = [field.name for field in dataclasses.fields(self)]
        first = getattr(self, names[0])
        if not isinstance(first, Mapping) or any(getattr(self, name) is not None for name in names[1:]):
            return
        unknown = sorted(set(first) - set(names))
        if unknown:
            raise TypeError(f"{type(self).__name__} has no fields {unknown} (its fields: {names})")
        for name in names:  # in field order, so positions match a keyword-built output
            setattr(self, name, first.get(name))

    def __init_subclass__(cls, **kwargs):
        super().__init_subclass__(**kwargs)
        pytree.register_pytree_node(
            cls, lambda output: (list(output.values()), list(output.keys())),
            lambda values, keys: cls(**dict(zip(keys, values, strict=True))),
            serialized_type_name=f"{cls.__module__}.{cls.__qualname__}",
        )

    def __setattr__(self, name: str, value: Any) -> None:
        if name in getattr(self, "__dataclass_fields__", {}):
            if value is None:
                dict.pop(self, name, None)
            else:
                dict.__setitem__(self, name, value)
        super().__setattr__(name, value)

    def __setitem__(self, key: str, value: Any) -> None:
        setattr(self, key, value)

    def __getitem__(self, item):
        if isinstance(item, str):
            return dict.__getitem__(self, item)
        return self.to_tuple()[item]

    def to_tuple(self) -> tuple:
        return tuple(self.values())


@dataclasses.dataclass
class BaseModelOutputWithPoolingAndNoAttention(ModelOutput):
    last_hidden_state: torch.Tensor | None = None
    pooler_output: torch.Tensor | None = None
    hidden_states: tuple[torch.Tensor, ...] | None = None


@dataclasses.dataclass
class ImageClassifierOutputWithNoAttention(ModelOutput):
    loss: torch.Tensor | None = None
    logits: torch.Tensor | None = None
    hidden_states: tuple[torch.Tensor, ...] | None = None


@dataclasses.dataclass
class BackboneOutput(ModelOutput):
    feature_maps: tuple[torch.Tensor, ...] | None = None
    hidden_states: tuple[torch.Tensor, ...] | None = None
    attentions: None = None


# ---------------------------------------------------------------------------------------------------------------
# Building blocks.


class ConvHolder(nn.Module):
    """A module with StdConv2d children: a PEFT LoRA wrapper installed over one is switched to apply its update
    inside the weight standardization (`integrations.standardized_adapter`: exact merges, a plain BiT after)."""

    def __setattr__(self, name: str, value: Any) -> None:
        replaced = self.__dict__.get("_modules", {}).get(name)
        if isinstance(replaced, StdConv2d) and integrations.is_peft_layer(value):
            value = integrations.standardized_adapter(value)
        super().__setattr__(name, value)


class BitEmbeddings(ConvHolder):
    """Stem: 7x7 stride-2 conv -> zero pad 1 (unless SAME) -> [GN+act for bottleneck] -> 3x3 stride-2 max pool.

    The explicit zero padding before the pool matters: stem outputs can be negative, so it differs from
    MaxPool's own -inf padding (timm and the original code do the same).
    """

    def __init__(self, config: BitConfig):
        super().__init__()
        self.convolution = StdConv2d(
            config.num_channels, config.embedding_size, 7, stride=2, padding=config.global_padding, eps=config.ws_eps
        )
        self.pooler = MaxPool2dSame(3, 2, dynamic_padding=config.embedding_dynamic_padding)
        self.pad = nn.Identity() if config.global_padding == "SAME" else nn.ConstantPad2d(1, 0.0)
        self.norm = (
            nn.Identity()
            if config.layer_type == "preactivation"
            else GroupNormAct(config.num_groups, config.embedding_size, config.gn_eps, config.hidden_act)
        )

    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        return self.pooler(self.norm(self.pad(self.convolution(pixel_values))))


class BitDownsampleConv(ConvHolder):
    """1x1 strided projection of the shortcut (GroupNorm after it only in the non-pre-activation block)."""

    def __init__(self, config: BitConfig, in_channels: int, out_channels: int, stride: int, preact: bool):
        super().__init__()
        self.conv = StdConv2d(in_channels, out_channels, 1, stride=stride, padding=config.global_padding, eps=config.ws_eps)
        self.norm = nn.Identity() if preact else GroupNormAct(config.num_groups, out_channels, config.gn_eps, act=None)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.norm(self.conv(x))


class BitPreActivationBottleneckLayer(ConvHolder):
    """ResNet-v2 bottleneck: relu(gn1(x)) feeds both the projection shortcut and conv1 -> conv2 (3x3) -> conv3."""

    def __init__(
        self, config: BitConfig, in_channels: int, out_channels: int, stride: int, dilation: int,
        drop_path_rate: float, is_first_layer: bool,
    ):
        super().__init__()
        mid_channels = _mid_channels(out_channels)
        conv = dict(padding=config.global_padding, eps=config.ws_eps)
        norm = dict(eps=config.gn_eps, act=config.hidden_act)
        self.downsample = (
            BitDownsampleConv(config, in_channels, out_channels, stride, preact=True) if is_first_layer else None
        )
        self.norm1 = GroupNormAct(config.num_groups, in_channels, **norm)
        self.conv1 = StdConv2d(in_channels, mid_channels, 1, **conv)
        self.norm2 = GroupNormAct(config.num_groups, mid_channels, **norm)
        # Unlike transformers, the dilation is applied (output_stride < 32), as in timm.
        self.conv2 = StdConv2d(mid_channels, mid_channels, 3, stride=stride, dilation=dilation, **conv)
        self.norm3 = GroupNormAct(config.num_groups, mid_channels, **norm)
        self.conv3 = StdConv2d(mid_channels, out_channels, 1, **conv)
        self.drop_path = DropPath(drop_path_rate) if drop_path_rate > 0 else nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        preact = self.norm1(x)
        shortcut = self.downsample(preact) if self.downsample is not None else x
        x = self.conv1(preact)
        x = self.conv2(self.norm2(x))
        x = self.conv3(self.norm3(x))
        return _residual_add(self.drop_path(x), shortcut)


class BitBottleneckLayer(ConvHolder):
    """Non-pre-activation bottleneck (ViT/DPT hybrids): conv+gn+act twice, conv+gn, act(branch + shortcut)."""

    def __init__(
        self, config: BitConfig, in_channels: int, out_channels: int, stride: int, dilation: int,
        drop_path_rate: float, is_first_layer: bool,
    ):
        super().__init__()
        mid_channels = _mid_channels(out_channels)
        conv = dict(padding=config.global_padding, eps=config.ws_eps)
        norm = dict(eps=config.gn_eps, act=config.hidden_act)
        self.downsample = (
            BitDownsampleConv(config, in_channels, out_channels, stride, preact=False) if is_first_layer else None
        )
        self.conv1 = StdConv2d(in_channels, mid_channels, 1, **conv)
        self.norm1 = GroupNormAct(config.num_groups, mid_channels, **norm)
        self.conv2 = StdConv2d(mid_channels, mid_channels, 3, stride=stride, dilation=dilation, **conv)
        self.norm2 = GroupNormAct(config.num_groups, mid_channels, **norm)
        self.conv3 = StdConv2d(mid_channels, out_channels, 1, **conv)
        self.norm3 = GroupNormAct(config.num_groups, out_channels, eps=config.gn_eps, act=None)
        self.drop_path = DropPath(drop_path_rate) if drop_path_rate > 0 else nn.Identity()
        self.activation = activation(config.hidden_act)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shortcut = self.downsample(x) if self.downsample is not None else x
        x = self.norm1(self.conv1(x))
        x = self.norm2(self.conv2(x))
        x = self.norm3(self.conv3(x))
        return self.activation(_residual_add(self.drop_path(x), shortcut))


class BitStage(nn.Module):
    """`depth` bottleneck layers; the first one carries the stride and the projection shortcut."""

    def __init__(
        self, config: BitConfig, in_channels: int, out_channels: int, stride: int, dilation: int,
        drop_path_rates: list[float],
    ):
        super().__init__()
        layer_class = BitBottleneckLayer if config.layer_type == "bottleneck" else BitPreActivationBottleneckLayer
        # The first layer of a dilated stage keeps the previous stage's dilation (timm's rule).
        first_dilation = 1 if dilation in (1, 2) else 2
        self.layers = nn.Sequential()
        for index, rate in enumerate(drop_path_rates):
            self.layers.add_module(
                str(index),
                layer_class(
                    config, in_channels if index == 0 else out_channels, out_channels,
                    stride=stride if index == 0 else 1, dilation=first_dilation if index == 0 else dilation,
                    drop_path_rate=rate, is_first_layer=index == 0,
                ),
            )

    def forward(self, x: torch.Tensor, checkpointing: Checkpointing | None = None, first_index: int = 0) -> torch.Tensor:
        """`checkpointing` recomputes the activations of every `checkpointing.every`-th layer in the backward
        pass (`first_index` is this stage's first layer's index in the whole network)."""
        for index, layer in enumerate(self.layers, start=first_index):
            if checkpointing is not None and torch.is_grad_enabled() and index % checkpointing.every == 0:
                x = checkpoint(layer, x, **{"use_reentrant": False, **checkpointing.options})
            else:
                x = layer(x)
        return x


@dataclasses.dataclass(frozen=True)
class Checkpointing:
    """Activation checkpointing settings: every `every`-th layer, with `torch.utils.checkpoint` `options`."""

    every: int = 1
    options: dict = dataclasses.field(default_factory=dict)


class BitEncoder(nn.Module):
    """The stages; strides 1, 2, 2, 2 after the stride-4 stem, turned into dilation past `output_stride`."""

    def __init__(self, config: BitConfig):
        super().__init__()
        total = sum(config.depths)
        rates = [config.drop_path_rate * index / max(total - 1, 1) for index in range(total)]
        self.stages = nn.ModuleList()
        in_channels, current_stride, dilation, start = config.embedding_size, 4, 1, 0
        for stage_index, (depth, out_channels) in enumerate(zip(config.depths, config.stage_widths, strict=True)):
            stride = 1 if stage_index == 0 else 2
            if current_stride >= config.output_stride:
                dilation, stride = dilation * stride, 1
            self.stages.append(
                BitStage(config, in_channels, out_channels, stride, dilation, rates[start : start + depth])
            )
            in_channels, current_stride, start = out_channels, current_stride * stride, start + depth
        self.checkpointing: Checkpointing | None = None

    @property
    def gradient_checkpointing(self) -> bool:  # the attribute transformers looks for on modules
        return self.checkpointing is not None

    def run_stages(self, x: torch.Tensor, stages: int | None = None):
        """(output, hidden states) of the first `stages` stages (all by default), checkpointed when training."""
        checkpointing = self.checkpointing if self.training else None
        hidden_states, first = (x,), 0
        for stage in self.stages[:stages]:
            x = stage(x, checkpointing, first)
            hidden_states += (x,)
            first += len(stage.layers)
        return x, hidden_states

    def forward(self, x: torch.Tensor, output_hidden_states: bool = False):
        x, hidden_states = self.run_stages(x)
        return x, hidden_states if output_hidden_states else None


def _mid_channels(out_channels: int) -> int:
    return make_divisible(out_channels * 0.25)


def _residual_add(branch: torch.Tensor, shortcut: torch.Tensor) -> torch.Tensor:
    """branch + shortcut, written into `branch` (a fresh conv / norm output that no backward needs) when the
    dtypes and shapes agree: one allocation less per layer, which on CPU costs about as much as the add."""
    if branch.dtype == shortcut.dtype and branch.shape == shortcut.shape:
        return branch.add_(shortcut)
    return branch + shortcut


# ---------------------------------------------------------------------------------------------------------------
# Models.


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
    def base_model(self) -> BitModel:
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

        Keyword arguments override config fields (`num_labels=10`, `out_features=[...]`; any other name raises
        TypeError); with `ignore_mismatched_sizes=True` a head whose shape no longer matches is re-initialised
        (zeros, as the BiT recipe does) and a warning says so; without it a mismatch raises ValueError naming
        key and shapes. As in transformers, `dtype` (or `torch_dtype`: a torch dtype, "bfloat16", ... or "auto"
        for the stored weights' dtype) casts the model, `device_map` ("cuda:0", 0, "auto") moves it to one
        device, and `revision` picks a Hub branch, tag or commit.

        A weights file or Google name has no config.json: its architecture is read off the tensors, and a
        `num_labels` other than its head's starts a new zero head (no flag needed).

        transformers' other loading arguments work as there: `pretrained_model_name_or_path=`, `config=`,
        `state_dict=` (these tensors instead of the source's), `output_loading_info=True` (returns the model
        and its missing / unexpected / mismatched keys), `subfolder`, `cache_dir`, `token`, `local_files_only`,
        `force_download`, `use_safetensors`; `low_cpu_mem_usage`, `trust_remote_code` and `attn_implementation`
        are accepted and mean nothing here (see `checkpoints.loader.IGNORED_ARGUMENTS`). A head whose size does
        not fit raises `MismatchedSizesError`, both a ValueError and (as in transformers) a RuntimeError.

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


class BitModel(BitPreTrainedModel):
    """The BiT backbone with the final GroupNorm + activation (pre-activation nets) and global average pooling.

    Example:
        >>> model = BitModel(BitConfig.from_variant("tiny")).eval()
        >>> model(torch.randn(1, 3, 64, 64)).pooler_output.shape
        torch.Size([1, 512, 1, 1])
    """

    def __init__(self, config: BitConfig):
        super().__init__(config)
        self.embedder = BitEmbeddings(config)
        self.encoder = BitEncoder(config)
        # Sized from the widened stage (transformers uses hidden_sizes[-1] and so cannot build wide BiTs).
        self.norm = (
            GroupNormAct(config.num_groups, config.num_features, config.gn_eps, config.hidden_act)
            if config.layer_type == "preactivation"
            else nn.Identity()
        )
        self.pooler = nn.AdaptiveAvgPool2d((1, 1))
        self.post_init()

    def forward(
        self,
        pixel_values: torch.Tensor,
        output_hidden_states: bool | None = None,
        return_dict: bool | None = None,
        **kwargs: Any,
    ) -> BaseModelOutputWithPoolingAndNoAttention | tuple:
        """Returns last_hidden_state (after the final norm), pooler_output (B, C, 1, 1) and, when asked,
        hidden_states: the stem output and the output of every stage (the last one before the final norm)."""
        output_hidden_states = self.config.output_hidden_states if output_hidden_states is None else output_hidden_states
        return_dict = self.config.return_dict if return_dict is None else return_dict
        pixel_values = self._checked_pixel_values(pixel_values)
        x, hidden_states = self.encoder(self.embedder(pixel_values), output_hidden_states=output_hidden_states)
        last_hidden_state = self.norm(x)
        pooled = self.pooler(last_hidden_state)
        if not return_dict:
            return (last_hidden_state, pooled) + ((hidden_states,) if hidden_states is not None else ())
        return BaseModelOutputWithPoolingAndNoAttention(last_hidden_state, pooled, hidden_states)


class BitForImageClassification(BitPreTrainedModel):
    """BitModel with a linear classifier on the pooled features (`num_labels=0`: identity head, features out).

    Example:
        >>> model = BitForImageClassification(BitConfig.from_variant("tiny", num_labels=5)).eval()
        >>> model(torch.randn(2, 3, 64, 64)).logits.shape
        torch.Size([2, 5])
    """

    def __init__(self, config: BitConfig):
        super().__init__(config)
        self.num_labels = config.num_labels
        self.bit = BitModel(config)
        self.classifier = nn.Sequential(
            nn.Flatten(),
            nn.Linear(config.num_features, config.num_labels) if config.num_labels > 0 else nn.Identity(),
        )
        self.post_init()

    def forward(
        self,
        pixel_values: torch.Tensor,
        labels: torch.Tensor | None = None,
        output_hidden_states: bool | None = None,
        return_dict: bool | None = None,
        **kwargs: Any,
    ) -> ImageClassifierOutputWithNoAttention | tuple:
        """Returns logits, the loss when `labels` are given (by `config.problem_type`, inferred as transformers
        does: one label -> regression, integer labels -> cross-entropy, else multi-label BCE), hidden_states."""
        return_dict = self.config.return_dict if return_dict is None else return_dict
        outputs = self.bit(pixel_values, output_hidden_states=output_hidden_states, return_dict=True)
        logits = self.classifier(outputs.pooler_output)
        loss = self.loss_function(labels, logits, self.config) if labels is not None else None
        if not return_dict:
            output = (logits,) + ((outputs.hidden_states,) if outputs.hidden_states is not None else ())
            return ((loss,) + output) if loss is not None else output
        return ImageClassifierOutputWithNoAttention(loss, logits, outputs.hidden_states)

    # -- timm's names: the backbone's features, the head, a new head ------------------------------------------
    def forward_features(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """The backbone's last feature map, after the final norm (timm's `forward_features`)."""
        return self.bit(pixel_values, return_dict=True).last_hidden_state

    def forward_head(self, features: torch.Tensor, pre_logits: bool = False) -> torch.Tensor:
        """Pooled features (`pre_logits=True`) or logits from `forward_features`' output (timm's `forward_head`)."""
        pooled = self.bit.pooler(features).flatten(1)
        return pooled if pre_logits else self.classifier(pooled)

    def reset_classifier(self, num_classes: int) -> None:
        """A new head of `num_classes` (0: none, features out), zero-initialised as the BiT recipe starts one."""
        if isinstance(num_classes, bool) or not isinstance(num_classes, int) or num_classes < 0:
            raise ValueError(f"num_classes must be a non-negative integer, got {num_classes!r}")
        parameter = next(self.parameters())
        head = nn.Linear(self.config.num_features, num_classes) if num_classes else nn.Identity()
        if num_classes:
            nn.init.zeros_(head.weight)
            nn.init.zeros_(head.bias)
        self.classifier[1] = head.to(device=parameter.device, dtype=parameter.dtype)
        if self.config.num_labels != num_classes:  # setting it renames the classes; the same count keeps their names
            self.config.num_labels = num_classes
        self.num_labels = num_classes

    @property
    def loss_function(self):
        """What the forward computes its loss with, called as transformers calls it: `(labels, logits, config)`.
        Assign another function of that signature to replace it (as in transformers); `loss` is the default."""
        return self.__dict__.get("_loss_function") or self._default_loss

    @loss_function.setter
    def loss_function(self, function) -> None:
        self.__dict__["_loss_function"] = function

    def _default_loss(self, labels: torch.Tensor, logits: torch.Tensor, config: BitConfig | None = None,
                      **kwargs: Any) -> torch.Tensor:
        return self.loss(logits, labels)

    def loss(self, logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        """The training loss for `labels`, following `config.problem_type` (set on first use, as in transformers)."""
        num_labels = self.config.num_labels
        if num_labels == 0:
            raise ValueError("cannot compute a loss with num_labels=0 (the model has no classification head)")
        if not isinstance(labels, torch.Tensor):
            raise TypeError(f"labels must be a torch.Tensor, got {type(labels).__name__}")
        labels = labels.to(logits.device)
        if self.config.problem_type is None:
            if num_labels == 1:
                self.config.problem_type = "regression"
            elif labels.dtype in (torch.long, torch.int):
                self.config.problem_type = "single_label_classification"
            else:
                self.config.problem_type = "multi_label_classification"
        problem = self.config.problem_type
        if problem == "regression":
            if num_labels == 1:
                return F.mse_loss(logits.squeeze(), labels.squeeze().to(logits.dtype))
            return F.mse_loss(logits, labels.to(logits.dtype))
        if problem == "single_label_classification":
            labels = labels.reshape(-1)
            if labels.numel() != logits.shape[0]:
                raise ValueError(f"expected {logits.shape[0]} labels for {logits.shape[0]} images, got {labels.numel()}")
            if labels.is_floating_point():
                raise TypeError(f"single-label classification needs integer labels, got {labels.dtype}")
            if not torch.compiler.is_compiling():  # a data-dependent branch: compiled graphs leave it to the kernel
                _check_label_range(labels, num_labels)
            return F.cross_entropy(logits.reshape(-1, num_labels), labels)
        if labels.shape != logits.shape:
            raise ValueError(f"multi-label targets must have the logits' shape {tuple(logits.shape)}, got {tuple(labels.shape)}")
        return F.binary_cross_entropy_with_logits(logits, labels.to(logits.dtype))


def _check_label_range(labels: torch.Tensor, num_labels: int) -> None:
    valid = labels[labels != -100]  # cross-entropy's ignore_index
    if valid.numel() and (valid.min() < 0 or valid.max() >= num_labels):
        raise ValueError(
            f"labels must be in [0, {num_labels - 1}] (num_labels={num_labels}), got values from "
            f"{int(valid.min())} to {int(valid.max())}"
        )


class BitBackbone(BitPreTrainedModel):
    """Feature maps of the stages named in `config.out_features`, for detection and segmentation heads.

    Only the requested maps are kept, and stages after the last requested one are not run.
    """

    backbone_type = "transformers"  # transformers' BackboneType.TRANSFORMERS, as its plain value

    def __init__(self, config: BitConfig):
        super().__init__(config)
        self.bit = BitModel(config)
        self.stage_names = config.stage_names
        self.num_features = [config.embedding_size] + config.stage_widths
        self.post_init()

    @property
    def out_features(self) -> list[str]:
        return self.config.out_features

    @property
    def out_indices(self) -> list[int]:
        return self.config.out_indices

    @property
    def channels(self) -> list[int]:
        """Channels of each returned feature map, with `width_factor` applied."""
        return [self.num_features[index] for index in self.config.out_indices]

    @property
    def out_feature_channels(self) -> dict[str, int]:
        """Channels of every stage's map by stage name (transformers' BackboneMixin)."""
        return dict(zip(self.stage_names, self.num_features, strict=True))

    @property
    def feature_info(self) -> list[dict[str, Any]]:
        """timm's description of the returned maps: channels, reduction (stride) and module, per map."""
        reductions = [4] + [min(4 * 2**index, self.config.output_stride) for index in range(len(self.config.depths))]
        modules = ["bit.embedder"] + [f"bit.encoder.stages.{index}" for index in range(len(self.config.depths))]
        return [dict(num_chs=self.num_features[index], reduction=reductions[index], module=modules[index])
                for index in self.config.out_indices]

    def forward(
        self,
        pixel_values: torch.Tensor,
        output_hidden_states: bool | None = None,
        return_dict: bool | None = None,
        **kwargs: Any,
    ) -> BackboneOutput | tuple:
        output_hidden_states = self.config.output_hidden_states if output_hidden_states is None else output_hidden_states
        return_dict = self.config.return_dict if return_dict is None else return_dict
        pixel_values = self._checked_pixel_values(pixel_values)
        wanted = sorted({index % len(self.stage_names) for index in self.config.out_indices})
        stages = len(self.bit.encoder.stages) if output_hidden_states else max(wanted)
        _, states = self.bit.encoder.run_stages(self.bit.embedder(pixel_values), stages)
        feature_maps = tuple(states[index] for index in wanted)
        hidden_states = states if output_hidden_states else None
        if not return_dict:
            return (feature_maps,) + ((hidden_states,) if output_hidden_states else ())
        return BackboneOutput(feature_maps=feature_maps, hidden_states=hidden_states)
