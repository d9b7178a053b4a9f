"""BiT models: stem -> bottleneck layers -> stages -> encoder -> BitModel / BitForImageClassification / BitBackbone.

Module and parameter names follow transformers exactly, so its checkpoints load here and ours load there. What the
models share (from_pretrained / save_pretrained, checkpointing, input checks) is `pretrained.BitPreTrainedModel`;
their outputs are in `outputs` (re-exported here).
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

from . import integrations
from .config import BitConfig, make_divisible
from .layers import DropPath, GroupNormAct, MaxPool2dSame, StdConv2d, activation
from .outputs import (  # re-exported: the models' output types
    BackboneOutput,
    BaseModelOutputWithPoolingAndNoAttention,
    ImageClassifierOutputWithNoAttention,
    ModelOutput,
)
from .pretrained import BitPreTrainedModel, Checkpointing

__all__ = [
    "BackboneOutput", "BaseModelOutputWithPoolingAndNoAttention", "BitBackbone", "BitForImageClassification",
    "BitModel", "BitPreTrainedModel", "Checkpointing", "ImageClassifierOutputWithNoAttention", "ModelOutput",
]

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
