"""BiT as a backbone for dense tasks: timm-style feature extraction and an FPN for torchvision's detectors.

- `create_model(name, features_only=True, out_indices=...)`: a `BitFeatures` model returning a list of feature
  maps at timm's feature points (the stem convolution at stride 2, then every stage), with timm's `feature_info`
  (`.channels()`, `.reduction()`, `.module_name()`), so code written for `timm.create_model(...,
  features_only=True)` runs on it; without `features_only` the classifier, with timm's `forward_features`,
  `forward_head` and `reset_classifier`.
- `fpn_backbone(model)`: BiT stages under torchvision's FeaturePyramidNetwork, the `backbone` that
  `torchvision.models.detection.FasterRCNN` (and Mask / Keypoint R-CNN, RetinaNet) takes. torchvision is only
  needed for this (an optional dependency).

Example:
    >>> features = create_model("BiT-M-R50x1", pretrained=True, features_only=True, out_indices=(1, 2, 3, 4))
    >>> [map.shape[1] for map in features(torch.randn(1, 3, 224, 224))], features.feature_info.reduction()
"""

from __future__ import annotations

import os
from collections import OrderedDict
from collections.abc import Sequence
from typing import Any

import torch
from torch import nn

from .checkpoints import loader
from .config import BitConfig, is_variant
from .modeling import BitForImageClassification, BitModel

DEFAULT_OUT_INDICES = (0, 1, 2, 3, 4)


class FeatureInfo(list):
    """timm's `feature_info`: one dict (`num_chs`, `reduction`, `module`) per returned feature map, readable as
    lists through `channels()`, `reduction()` and `module_name()`."""

    def channels(self, index: int | None = None):
        return self._get("num_chs", index)

    def reduction(self, index: int | None = None):
        return self._get("reduction", index)

    def module_name(self, index: int | None = None):
        return self._get("module", index)

    def _get(self, key: str, index: int | None):
        return [info[key] for info in self] if index is None else self[index][key]


class BitFeatures(nn.Module):
    """Feature maps of a BitModel at timm's points: index 0 is the stem convolution's output (stride 2, before
    padding and pooling), 1.. the stages' outputs (strides 4, 8, 16, 32; the last before the final norm, as timm
    gives it). `forward` returns the maps of `out_indices` as a list."""

    def __init__(self, model: BitModel, out_indices: Sequence[int] = DEFAULT_OUT_INDICES):
        super().__init__()
        self.bit = model
        config = model.config
        count = len(config.depths) + 1
        indices = sorted({index % count for index in out_indices})
        if not out_indices or any(index >= count or index < -count for index in out_indices):
            raise ValueError(f"out_indices must pick from 0..{count - 1} (stem, then each stage), got {list(out_indices)}")
        self.out_indices = indices
        channels = [config.embedding_size, *config.stage_widths]
        reductions = [2] + [min(4 * 2**index, config.output_stride) for index in range(len(config.depths))]
        modules = ["bit.embedder.convolution"] + [f"bit.encoder.stages.{index}" for index in range(len(config.depths))]
        self.feature_info = FeatureInfo(
            dict(num_chs=channels[index], reduction=reductions[index], module=modules[index]) for index in indices
        )

    @property
    def config(self) -> BitConfig:
        return self.bit.config

    def forward(self, pixel_values: torch.Tensor) -> list[torch.Tensor]:
        pixel_values = self.bit._checked_pixel_values(pixel_values)
        embedder = self.bit.embedder
        stem = embedder.convolution(pixel_values)
        if self.out_indices == [0]:
            return [stem]
        x = embedder.pooler(embedder.norm(embedder.pad(stem)))
        _, states = self.bit.encoder.run_stages(x, max(self.out_indices))
        maps = [stem, *states[1:]]
        return [maps[index] for index in self.out_indices]


def create_model(
    name: str | os.PathLike, pretrained: bool = False, *, features_only: bool = False,
    out_indices: Sequence[int] = DEFAULT_OUT_INDICES, num_classes: int | None = None, **config_overrides: Any,
) -> nn.Module:
    """A BiT model in the manner of `timm.create_model`.

    `name` is a variant (`BiT-M-R50x1`, `tiny`; random weights unless `pretrained`, which loads the Google
    checkpoint of that name) or any checkpoint source `from_pretrained` takes (then `pretrained` is implied).
    `features_only` gives a `BitFeatures`; otherwise a BitForImageClassification whose head has `num_classes`
    (a fresh zero-initialised one when that differs from the checkpoint's).
    """
    text = os.fspath(name)
    if is_variant(text) and not pretrained and not os.path.exists(text):
        overrides = dict(config_overrides, **({"num_labels": num_classes} if num_classes is not None else {}))
        model = BitForImageClassification(BitConfig.from_variant(text, **overrides))
    else:
        model = loader.load(BitForImageClassification, text, new_head=num_classes is not None,
                            **config_overrides, **({"num_labels": num_classes} if num_classes is not None else {}))
    return BitFeatures(model.bit, out_indices) if features_only else model


def fpn_backbone(
    model: nn.Module, returned_stages: Sequence[int] = (1, 2, 3, 4), out_channels: int = 256,
    extra_pool: bool = True,
) -> nn.Module:
    """BiT stages under a FeaturePyramidNetwork: the `backbone` torchvision's detectors take.

    `model` is a BitModel, a BitForImageClassification or BitBackbone (its backbone is used, weights shared).
    `returned_stages` are 1-based stage numbers (stride 4 to 32); `extra_pool` adds the max-pooled level ("pool")
    Faster R-CNN's anchor generator expects. The result has `out_channels`, as torchvision requires.
    """
    try:
        from torchvision.ops import FeaturePyramidNetwork
        from torchvision.ops.feature_pyramid_network import LastLevelMaxPool
    except ImportError:
        raise ImportError("fpn_backbone needs torchvision: pip install torchvision") from None
    bit = model.base_model if hasattr(model, "base_model") else model
    features = BitFeatures(bit, out_indices=tuple(returned_stages))
    return _BitFPN(features, FeaturePyramidNetwork(features.feature_info.channels(), out_channels,
                                                   extra_blocks=LastLevelMaxPool() if extra_pool else None),
                   out_channels)


class _BitFPN(nn.Module):
    def __init__(self, body: BitFeatures, fpn: nn.Module, out_channels: int):
        super().__init__()
        self.body, self.fpn, self.out_channels = body, fpn, out_channels

    def forward(self, images: torch.Tensor) -> OrderedDict[str, torch.Tensor]:
        return self.fpn(OrderedDict((str(index), level) for index, level in enumerate(self.body(images))))
