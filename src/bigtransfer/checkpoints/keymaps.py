"""Key maps: pure functions from one checkpoint naming to another, and the architecture read off the tensors.

The hub naming is transformers' (`bit.embedder.convolution.weight`, `bit.encoder.stages.{i}.layers.{j}.*`,
`bit.norm.*`, `classifier.1.*`): every other naming is mapped to it and back. Each `*_to_transformers`
function returns a new dict and raises CheckpointError listing every key it does not recognise; each
`transformers_to_*` function is its exact inverse, so round trips are lossless (renames, transposes and
reshapes only; values are never touched). Stage and block indices are 0-based in transformers and timm,
1-based (`block1`, `unit01`) in Google's files and the original big_transfer code.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Mapping

import torch

from ..config import ARCHITECTURES, VARIANTS, make_divisible
from ..errors import CheckpointError

State = dict[str, torch.Tensor]

# Naming names, as `detect_naming` returns them.
TRANSFORMERS, TIMM, GOOGLE, BIG_TRANSFER = "transformers", "timm", "google", "big_transfer"
NAMINGS = (TRANSFORMERS, TIMM, GOOGLE, BIG_TRANSFER)

_LAYER = "bit.encoder.stages.{stage}.layers.{layer}."
_HEAD_WEIGHT, _HEAD_BIAS = "classifier.1.weight", "classifier.1.bias"
# Data-parallel wrappers (torch.nn.DataParallel, DDP) prefix every key with this; the original
# big_transfer training script saved its checkpoints that way.
_WRAPPER_PREFIX = "module."


def detect_naming(keys) -> str:
    """Which naming a set of keys uses: 'transformers', 'timm', 'google' (.npz) or 'big_transfer' (original PyTorch)."""
    keys = [key.removeprefix(_WRAPPER_PREFIX) for key in keys]
    if any(key.endswith("root_block/standardized_conv2d/kernel") or re.search(r"(^|/)block\d+/unit\d+/", key) for key in keys):
        return GOOGLE
    if any(key.startswith(("root.conv.", "body.block")) for key in keys):
        return BIG_TRANSFER
    if any(key.startswith(("stem.conv.", "stages.")) for key in keys):
        return TIMM
    if any(key.startswith(("bit.", "embedder.", "encoder.")) for key in keys):
        return TRANSFORMERS
    sample = sorted(keys)[:5]
    raise CheckpointError(
        f"the checkpoint's keys match no known BiT naming (transformers, timm, Google .npz, original big_transfer); "
        f"first keys: {sample}"
    )


def to_transformers(state: Mapping[str, torch.Tensor], naming: str | None = None) -> State:
    """Rename any supported naming to transformers'; `naming` defaults to `detect_naming(state)`."""
    state = strip_wrapper(state)
    naming = naming or detect_naming(state)
    if naming == TRANSFORMERS:
        return _add_bit_prefix(state)
    return _FROM[naming](state)


def from_transformers(state: Mapping[str, torch.Tensor], naming: str) -> State:
    """Rename a transformers-named state (`BitForImageClassification` or `BitModel` keys) to `naming`."""
    state = _add_bit_prefix(strip_wrapper(state))
    if naming == TRANSFORMERS:
        return dict(state)
    if naming not in _TO:
        raise ValueError(f"unknown naming {naming!r}; expected one of {', '.join(NAMINGS)}")
    return _TO[naming](state)


def strip_wrapper(state: Mapping[str, torch.Tensor]) -> State:
    """Remove the `module.` prefix that data-parallel wrappers put on every key."""
    if state and all(key.startswith(_WRAPPER_PREFIX) for key in state):
        return {key.removeprefix(_WRAPPER_PREFIX): value for key, value in state.items()}
    return dict(state)


def _add_bit_prefix(state: Mapping[str, torch.Tensor]) -> State:
    """BitModel checkpoints have no `bit.` prefix; give them the BitForImageClassification layout."""
    if any(key.startswith("bit.") for key in state):
        return dict(state)
    return {(key if key.startswith("classifier.") else "bit." + key): value for key, value in state.items()}


def _rename(state: Mapping[str, torch.Tensor], rename: Callable[[str], str | None], source: str) -> State:
    """Apply a per-key rename; keys it does not know (None) are collected and reported together."""
    renamed: State = {}
    unknown = []
    for key, value in state.items():
        new_key = rename(key)
        if new_key is None:
            unknown.append(key)
            continue
        if new_key in renamed:
            raise CheckpointError(f"{source} checkpoint: two keys map to {new_key} (one of them is {key})")
        renamed[new_key] = value
    if unknown:
        raise CheckpointError(f"unexpected keys in the {source} checkpoint: {unknown}")
    return renamed


# ---------------------------------------------------------------------------------------------------------------
# timm: `stem.conv`, `stages.{i}.blocks.{j}.*`, `norm`, `head.fc` (a 1x1 conv). Block contents share names.

_TIMM_TO_TRANSFORMERS = (
    (r"stem\.conv\.weight", "bit.embedder.convolution.weight"),
    (r"stem\.norm\.(weight|bias)", r"bit.embedder.norm.\1"),
    (r"stages\.(\d+)\.blocks\.(\d+)\.(.+)", r"bit.encoder.stages.\1.layers.\2.\3"),
    (r"norm\.(weight|bias)", r"bit.norm.\1"),
    (r"head\.fc\.(weight|bias)", r"classifier.1.\1"),
)
_BLOCK_PARAMETER = re.compile(r"(norm[123]\.(weight|bias)|conv[123]\.weight|downsample\.conv\.weight|downsample\.norm\.(weight|bias))")


def _apply_rules(key: str, rules) -> str | None:
    for pattern, template in rules:
        match = re.fullmatch(pattern, key)
        if match:
            return match.expand(template)
    return None


def _timm_key(key: str) -> str | None:
    new_key = _apply_rules(key, _TIMM_TO_TRANSFORMERS)
    if new_key and ".layers." in new_key and not _BLOCK_PARAMETER.fullmatch(new_key.split(".", 6)[-1]):
        return None
    return new_key


def timm_to_transformers(state: Mapping[str, torch.Tensor]) -> State:
    """timm `resnetv2_*_bit` state dict -> transformers naming; the 1x1-conv head becomes a linear weight."""
    renamed = _rename(state, _timm_key, "timm")
    if _HEAD_WEIGHT in renamed and renamed[_HEAD_WEIGHT].ndim == 4:
        renamed[_HEAD_WEIGHT] = _squeeze_1x1(renamed[_HEAD_WEIGHT], "head.fc.weight")
    return renamed


_TRANSFORMERS_TO_TIMM = (
    (r"bit\.embedder\.convolution\.weight", "stem.conv.weight"),
    (r"bit\.embedder\.norm\.(weight|bias)", r"stem.norm.\1"),
    (r"bit\.encoder\.stages\.(\d+)\.layers\.(\d+)\.(.+)", r"stages.\1.blocks.\2.\3"),
    (r"bit\.norm\.(weight|bias)", r"norm.\1"),
    (r"classifier\.1\.(weight|bias)", r"head.fc.\1"),
)


def _timm_name_for(key: str) -> str | None:
    return _apply_rules(key, _TRANSFORMERS_TO_TIMM)


def transformers_to_timm(state: Mapping[str, torch.Tensor]) -> State:
    """transformers naming -> timm `resnetv2_*_bit` state dict, head as timm's (classes, C, 1, 1) conv."""
    renamed = _rename(state, _timm_name_for, "transformers")
    if "head.fc.weight" in renamed:
        renamed["head.fc.weight"] = renamed["head.fc.weight"][:, :, None, None]
    return renamed


# ---------------------------------------------------------------------------------------------------------------
# Google .npz: `resnet/root_block/...`, `resnet/block{b}/unit{NN}/{a,b,c}/...`, `resnet/group_norm/...`,
# `resnet/head/conv2d/...`. Kernels are HWIO. Within a unit, `a` holds the pre-activation norm of the unit's
# input (norm1) and the first 1x1 conv, `b` the 3x3 conv and the norm before it, `c` the last 1x1 conv.

GOOGLE_PREFIX = "resnet/"
_GOOGLE_UNIT = re.compile(r"block(\d+)/unit(\d+)/(a|b|c)/(?:(proj)/)?(standardized_conv2d/kernel|group_norm/gamma|group_norm/beta)")
_UNIT_PART = {"a": "1", "b": "2", "c": "3"}
_GN_PARAMETER = {"gamma": "weight", "beta": "bias"}


def normalise_google_names(arrays: Mapping[str, torch.Tensor]) -> State:
    """Undo the `standardized_conv2d_N` naming some Google files have (a TF graph-uniquifying suffix)."""
    renamed: State = {}
    for key, value in arrays.items():
        new_key = re.sub(r"/standardized_conv2d_\d+/", "/standardized_conv2d/", key)
        if new_key in renamed:
            raise CheckpointError(f"Google checkpoint: {key} and another array both mean {new_key}")
        renamed[new_key] = value
    return renamed


def _google_prefix(keys) -> str:
    for key in keys:
        if key.endswith("root_block/standardized_conv2d/kernel"):
            return key.removesuffix("root_block/standardized_conv2d/kernel")
    return GOOGLE_PREFIX


def _google_key(key: str, prefix: str) -> str | None:
    if not key.startswith(prefix):
        return None
    key = key[len(prefix):]
    if key == "root_block/standardized_conv2d/kernel":
        return "bit.embedder.convolution.weight"
    if key in ("group_norm/gamma", "group_norm/beta"):
        return f"bit.norm.{_GN_PARAMETER[key.rsplit('/', 1)[1]]}"
    if key in ("head/conv2d/kernel", "head/conv2d/bias"):
        return "classifier.1." + ("weight" if key.endswith("kernel") else "bias")
    match = _GOOGLE_UNIT.fullmatch(key)
    if not match or int(match[1]) < 1 or int(match[2]) < 1:
        return None
    block, unit, part, projection, parameter = match.groups()
    layer = _LAYER.format(stage=int(block) - 1, layer=int(unit) - 1)
    if projection:
        return layer + "downsample.conv.weight" if parameter.endswith("kernel") and part == "a" else None
    if parameter.endswith("kernel"):
        return f"{layer}conv{_UNIT_PART[part]}.weight"
    return f"{layer}norm{_UNIT_PART[part]}.{_GN_PARAMETER[parameter.rsplit('/', 1)[1]]}"


def google_to_transformers(arrays: Mapping[str, torch.Tensor]) -> State:
    """Google .npz arrays (HWIO kernels) -> transformers naming (OIHW kernels, linear head)."""
    arrays = normalise_google_names(arrays)
    prefix = _google_prefix(arrays)
    renamed = _rename(arrays, lambda key: _google_key(key, prefix), "Google .npz")
    converted: State = {}
    for key, value in renamed.items():
        if key == _HEAD_WEIGHT:
            value = _squeeze_1x1(value.permute(3, 2, 0, 1), "head/conv2d/kernel") if value.ndim == 4 else value.t()
        elif value.ndim == 4:
            value = value.permute(3, 2, 0, 1)  # HWIO -> OIHW
        elif value.ndim > 1:  # some exports keep GroupNorm parameters as (1, 1, 1, C)
            value = value.reshape(-1)
        converted[key] = value.contiguous()
    return converted


def transformers_to_google(state: Mapping[str, torch.Tensor], prefix: str = GOOGLE_PREFIX) -> State:
    """transformers naming -> Google .npz names and layouts (HWIO kernels, (1, 1, C, classes) head)."""
    inverse = {}
    for key in state:
        inverse[key] = _google_name_for(key, prefix)
    unknown = [key for key, name in inverse.items() if name is None]
    if unknown:
        raise CheckpointError(f"keys with no Google .npz name (non-pre-activation layers cannot be written): {unknown}")
    arrays: State = {}
    for key, value in state.items():
        if key == _HEAD_WEIGHT:
            value = value.t()[None, None]
        elif value.ndim == 4:
            value = value.permute(2, 3, 1, 0)  # OIHW -> HWIO
        arrays[inverse[key]] = value.contiguous()
    return arrays


def _google_name_for(key: str, prefix: str) -> str | None:
    if key == "bit.embedder.convolution.weight":
        return prefix + "root_block/standardized_conv2d/kernel"
    if key in ("bit.norm.weight", "bit.norm.bias"):
        return prefix + "group_norm/" + ("gamma" if key.endswith("weight") else "beta")
    if key in (_HEAD_WEIGHT, _HEAD_BIAS):
        return prefix + "head/conv2d/" + ("kernel" if key.endswith("weight") else "bias")
    match = re.fullmatch(r"bit\.encoder\.stages\.(\d+)\.layers\.(\d+)\.(.+)", key)
    if not match:
        return None
    unit = f"{prefix}block{int(match[1]) + 1}/unit{int(match[2]) + 1:02d}/"
    parameter = match[3]
    if parameter == "downsample.conv.weight":
        return unit + "a/proj/standardized_conv2d/kernel"
    conv = re.fullmatch(r"conv([123])\.weight", parameter)
    if conv:
        return unit + "abc"[int(conv[1]) - 1] + "/standardized_conv2d/kernel"
    norm = re.fullmatch(r"norm([123])\.(weight|bias)", parameter)
    if norm:
        return unit + "abc"[int(norm[1]) - 1] + "/group_norm/" + ("gamma" if norm[2] == "weight" else "beta")
    return None


# ---------------------------------------------------------------------------------------------------------------
# Original big_transfer PyTorch: `root.conv`, `body.block{b}.unit{NN}.{gn1,conv1,...,downsample}`, `head.gn`,
# `head.conv` (1x1 conv with bias). The projection is a bare conv there (`downsample.weight`).

def _big_transfer_key(key: str) -> str | None:
    if key == "root.conv.weight":
        return "bit.embedder.convolution.weight"
    if key in ("head.gn.weight", "head.gn.bias"):
        return "bit.norm." + key.rsplit(".", 1)[1]
    if key in ("head.conv.weight", "head.conv.bias"):
        return "classifier.1." + key.rsplit(".", 1)[1]
    match = re.fullmatch(r"body\.block(\d+)\.unit(\d+)\.(gn[123]\.(?:weight|bias)|conv[123]\.weight|downsample\.weight)", key)
    if not match or int(match[1]) < 1 or int(match[2]) < 1:
        return None
    layer = _LAYER.format(stage=int(match[1]) - 1, layer=int(match[2]) - 1)
    parameter = match[3]
    if parameter == "downsample.weight":
        return layer + "downsample.conv.weight"
    return layer + parameter.replace("gn", "norm")


def big_transfer_to_transformers(state: Mapping[str, torch.Tensor]) -> State:
    """Original big_transfer `ResNetV2` state dict -> transformers naming."""
    renamed = _rename(state, _big_transfer_key, "big_transfer")
    if _HEAD_WEIGHT in renamed and renamed[_HEAD_WEIGHT].ndim == 4:
        renamed[_HEAD_WEIGHT] = _squeeze_1x1(renamed[_HEAD_WEIGHT], "head.conv.weight")
    return renamed


def _big_transfer_name_for(key: str) -> str | None:
    if key == "bit.embedder.convolution.weight":
        return "root.conv.weight"
    if key in ("bit.norm.weight", "bit.norm.bias"):
        return "head.gn." + key.rsplit(".", 1)[1]
    if key in (_HEAD_WEIGHT, _HEAD_BIAS):
        return "head.conv." + key.rsplit(".", 1)[1]
    match = re.fullmatch(
        r"bit\.encoder\.stages\.(\d+)\.layers\.(\d+)\.(norm[123]\.(?:weight|bias)|conv[123]\.weight|downsample\.conv\.weight)",
        key,
    )
    if not match:
        return None
    unit = f"body.block{int(match[1]) + 1}.unit{int(match[2]) + 1:02d}."
    parameter = match[3]
    return unit + ("downsample.weight" if parameter.startswith("downsample") else parameter.replace("norm", "gn"))


def transformers_to_big_transfer(state: Mapping[str, torch.Tensor]) -> State:
    """transformers naming -> original big_transfer `ResNetV2` state dict (head as a 1x1 conv)."""
    renamed = _rename(state, _big_transfer_name_for, "transformers")
    if "head.conv.weight" in renamed:
        renamed["head.conv.weight"] = renamed["head.conv.weight"][:, :, None, None]
    return renamed


def source_key(key: str, naming: str) -> str:
    """The name a transformers-named key has in `naming`, for error messages (the key itself if it has none)."""
    if naming == TIMM:
        name = _timm_name_for(key)
    elif naming == GOOGLE:
        name = _google_name_for(key, GOOGLE_PREFIX)
    elif naming == BIG_TRANSFER:
        name = _big_transfer_name_for(key)
    else:
        name = key
    return name or key


_FROM = {TIMM: timm_to_transformers, GOOGLE: google_to_transformers, BIG_TRANSFER: big_transfer_to_transformers}
_TO = {TIMM: transformers_to_timm, GOOGLE: transformers_to_google, BIG_TRANSFER: transformers_to_big_transfer}


def _squeeze_1x1(weight: torch.Tensor, name: str) -> torch.Tensor:
    if weight.shape[2:] != (1, 1):
        raise CheckpointError(f"{name} should be a 1x1 convolution, got shape {tuple(weight.shape)}")
    return weight[:, :, 0, 0]


# ---------------------------------------------------------------------------------------------------------------
# Architecture inference.

def infer_architecture(state: Mapping[str, torch.Tensor]) -> dict:
    """BitConfig arguments read off a transformers-named state: depths, widths, head size, stem and layer type.

    The width factor is recognised when the stem and stage widths are the standard 64 / 256..2048 times an
    integer; other widths become explicit `hidden_sizes`. GroupNorm groups are not stored in the tensors: a
    shape of the variant table gets that variant's (`tiny`: 8), any other BiT's 32 (a bigtransfer writer records
    them in safetensors metadata, and callers can pass `num_groups`). Epsilons keep the source's defaults.
    """
    state = _add_bit_prefix(state)
    stem_key = "bit.embedder.convolution.weight"
    if stem_key not in state:
        raise CheckpointError(f"missing keys ['{stem_key}']: the checkpoint has no stem convolution")
    stem = state[stem_key]
    if stem.ndim != 4:
        raise CheckpointError(f"{stem_key} should be a 4-D convolution kernel, got shape {tuple(stem.shape)}")
    embedding_size, num_channels = int(stem.shape[0]), int(stem.shape[1])

    layers: dict[int, set[int]] = {}
    for key in state:
        match = re.match(r"bit\.encoder\.stages\.(\d+)\.layers\.(\d+)\.", key)
        if match:
            layers.setdefault(int(match[1]), set()).add(int(match[2]))
    if not layers:
        raise CheckpointError("the checkpoint has no residual stages (no bit.encoder.stages.* keys)")
    stages = sorted(layers)
    if stages != list(range(len(stages))):
        raise CheckpointError(f"stages must be numbered 0..{len(stages) - 1}, found {stages}")
    depths = []
    for stage in stages:
        if sorted(layers[stage]) != list(range(len(layers[stage]))):
            raise CheckpointError(f"stage {stage} has gaps in its layer numbers: {sorted(layers[stage])}")
        depths.append(len(layers[stage]))
    widths = []
    for stage in stages:
        key = _LAYER.format(stage=stage, layer=0) + "conv3.weight"
        if key not in state:
            raise CheckpointError(f"missing keys ['{key}']")
        widths.append(int(state[key].shape[0]))

    config: dict = dict(num_channels=num_channels, embedding_size=embedding_size, depths=depths)
    width_factor = embedding_size // 64 if embedding_size % 64 == 0 else 0
    standard = [256, 512, 1024, 2048]
    if width_factor and len(widths) == 4 and widths == [make_divisible(w * width_factor) for w in standard]:
        config.update(hidden_sizes=standard, width_factor=width_factor)
    else:
        config.update(hidden_sizes=widths, width_factor=1)
    config["layer_type"] = "bottleneck" if "bit.embedder.norm.weight" in state else "preactivation"
    config["num_labels"] = int(state[_HEAD_WEIGHT].shape[0]) if _HEAD_WEIGHT in state else 0
    config["num_groups"] = _variant_num_groups(config)
    return config


def _variant_num_groups(fields: Mapping) -> int:
    """The GroupNorm groups of the table variant with this shape, else BiT's 32."""
    def shape(values: Mapping) -> tuple:
        return (tuple(values["depths"]), values["embedding_size"], tuple(values.get("hidden_sizes", (256, 512, 1024, 2048))),
                values.get("width_factor", 1), values.get("layer_type", "preactivation"))

    return next((variant.get("num_groups", 32) for variant in VARIANTS.values() if shape(variant) == shape(fields)), 32)


def architecture_name(fields: Mapping) -> str | None:
    """The paper's name (`R50x1` ... `R152x4`) of a standard BiT shape (BitConfig fields), else None."""
    width_factor = fields.get("width_factor", 1)
    if fields.get("layer_type", "preactivation") != "preactivation":
        return None
    if list(fields["hidden_sizes"]) != [256, 512, 1024, 2048] or fields["embedding_size"] != 64 * width_factor:
        return None
    for name, shape in ARCHITECTURES.items():
        if list(shape["depths"]) == list(fields["depths"]) and shape["width_factor"] == width_factor:
            return name
    return None
