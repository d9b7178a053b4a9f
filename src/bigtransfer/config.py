"""BitConfig, compatible with `transformers.BitConfig`, and the table of BiT variants."""

from __future__ import annotations

import copy
import inspect
import json
import os
from pathlib import Path
from typing import Any

from . import hub
from .files import read_json, write_text_atomic
from .hub import CONFIG_NAME
from .precision import DTYPES

LAYER_TYPES = ("preactivation", "bottleneck")
PADDINGS = (None, "SAME", "VALID")
ACTIVATIONS = ("relu", "gelu", "silu", "swish", "tanh", "sigmoid", "leaky_relu", "elu", "identity", "linear")
PROBLEM_TYPES = (None, "regression", "single_label_classification", "multi_label_classification")

# Largest values a config may hold: past these a config.json is damaged or hostile, and building the model would
# take tens of gigabytes or hours before anything could fail. The largest BiT (R152x4 with the ImageNet-21k head)
# has 1.1e9 parameters, 36 layers in a stage, stage widths up to 8,192 and 21,843 classes; the largest class count
# of a public image dataset (Google Landmarks v2) is 203,094.
LIMITS = dict(num_labels=1_000_000, depths=1_000, hidden_sizes=65_536, embedding_size=65_536, width_factor=64,
              num_channels=256, num_groups=65_536, stages=16)
MAX_PARAMETERS = 4_000_000_000  # 16 GB in float32

# Backbone shapes by the paper's names: R{depth}x{width}.
ARCHITECTURES: dict[str, dict[str, Any]] = {
    "R50x1": dict(depths=(3, 4, 6, 3), width_factor=1),
    "R50x3": dict(depths=(3, 4, 6, 3), width_factor=3),
    "R101x1": dict(depths=(3, 4, 23, 3), width_factor=1),
    "R101x3": dict(depths=(3, 4, 23, 3), width_factor=3),
    "R152x2": dict(depths=(3, 8, 36, 3), width_factor=2),
    "R152x4": dict(depths=(3, 8, 36, 3), width_factor=4),
}
# Head size of each upstream: BiT-S was trained on ImageNet-1k, BiT-M on ImageNet-21k.
UPSTREAMS = {"BiT-S": 1000, "BiT-M": 21843}

VARIANTS: dict[str, dict[str, Any]] = {
    f"{upstream}-{arch}": dict(shape, embedding_size=64 * shape["width_factor"], num_labels=num_labels)
    for upstream, num_labels in UPSTREAMS.items()
    for arch, shape in ARCHITECTURES.items()
}
# A few hundred thousand parameters: for tests, CPU demos and the Fashion-MNIST experiment.
VARIANTS["tiny"] = dict(depths=(1, 1, 1, 1), embedding_size=32, hidden_sizes=(64, 128, 256, 512), num_groups=8, num_labels=10)


class BitConfig:
    """Configuration of a BiT model, with the arguments, defaults and validation of `transformers.BitConfig`.

    Extra fields: `ws_eps` (weight-standardization epsilon: 1e-8 as in transformers and timm, 1e-10 in the
    original big_transfer code) and `gn_eps` (GroupNorm epsilon). Unknown keyword arguments (hub configs carry
    keys such as `conv_layer`) are kept and written back by `to_dict`.

    Example:
        >>> config = BitConfig.from_variant("BiT-M-R50x1", num_labels=10)
        >>> config.depths
        [3, 4, 6, 3]
    """

    model_type = "bit"
    layer_types = list(LAYER_TYPES)
    supported_padding = list(PADDINGS)

    def __init__(
        self,
        num_channels: int = 3,
        embedding_size: int = 64,
        hidden_sizes: list[int] | tuple[int, ...] = (256, 512, 1024, 2048),
        depths: list[int] | tuple[int, ...] = (3, 4, 6, 3),
        layer_type: str = "preactivation",
        hidden_act: str = "relu",
        global_padding: str | None = None,
        num_groups: int = 32,
        drop_path_rate: float = 0.0,
        embedding_dynamic_padding: bool = False,
        output_stride: int = 32,
        width_factor: int = 1,
        out_features: list[str] | None = None,
        out_indices: list[int] | None = None,
        ws_eps: float = 1e-8,  # transformers and timm; the original big_transfer code uses 1e-10
        gn_eps: float = 1e-5,
        num_labels: int | None = None,
        id2label: dict[int, str] | None = None,
        label2id: dict[str, int] | None = None,
        problem_type: str | None = None,
        output_hidden_states: bool = False,
        return_dict: bool = True,
        **kwargs: Any,
    ):
        self.num_channels = _positive_int("num_channels", num_channels)
        self.embedding_size = _positive_int("embedding_size", embedding_size)
        self.hidden_sizes = [_positive_int("hidden_sizes", size) for size in _sequence("hidden_sizes", hidden_sizes)]
        self.depths = [_positive_int("depths", depth) for depth in _sequence("depths", depths)]
        if len(self.depths) > LIMITS["stages"]:
            raise ValueError(f"depths has {len(self.depths)} stages, more than {LIMITS['stages']}")
        if len(self.hidden_sizes) != len(self.depths):
            raise ValueError(
                f"hidden_sizes and depths must have one entry per stage, got {len(self.hidden_sizes)} "
                f"hidden_sizes and {len(self.depths)} depths"
            )
        self._set_layers(layer_type, hidden_act, global_padding, num_groups)
        self._set_numerics(drop_path_rate, output_stride, width_factor, ws_eps, gn_eps)
        self.embedding_dynamic_padding = bool(embedding_dynamic_padding)
        self._check_group_divisibility()
        self.stage_names = ["stem"] + [f"stage{index}" for index in range(1, len(self.depths) + 1)]
        kwargs.pop("stage_names", None)  # always derived from depths, as in transformers
        self.set_output_features_output_indices(out_features=out_features, out_indices=out_indices)
        self._set_labels(num_labels, id2label, label2id)
        self._check_size()
        if problem_type not in PROBLEM_TYPES:
            raise ValueError(f"problem_type={problem_type!r} is not one of {PROBLEM_TYPES[1:]}")
        self.problem_type = problem_type
        self.output_hidden_states = bool(output_hidden_states)
        self.return_dict = bool(return_dict)
        kwargs.pop("model_type", None)
        kwargs.pop("transformers_version", None)
        self.extra = kwargs  # unknown keys (conv_layer, architectures, dtype, ...) round-trip untouched

    def _set_layers(self, layer_type: str, hidden_act: str, global_padding: str | None, num_groups: int) -> None:
        if layer_type not in LAYER_TYPES:
            raise ValueError(f"layer_type={layer_type} is not one of {','.join(LAYER_TYPES)}")
        if not isinstance(hidden_act, str) or hidden_act.lower() not in ACTIVATIONS:
            raise ValueError(f"hidden_act={hidden_act!r} is not one of {', '.join(ACTIVATIONS)}")
        if global_padding is not None:
            if not isinstance(global_padding, str) or global_padding.upper() not in PADDINGS:
                raise ValueError(f"Padding strategy {global_padding} not supported")
            global_padding = global_padding.upper()
        self.layer_type, self.hidden_act, self.global_padding = layer_type, hidden_act, global_padding
        self.num_groups = _positive_int("num_groups", num_groups)

    def _set_numerics(self, drop_path_rate: float, output_stride: int, width_factor: int, ws_eps: float,
                      gn_eps: float) -> None:
        if isinstance(drop_path_rate, bool) or not isinstance(drop_path_rate, (int, float)) or not 0 <= drop_path_rate < 1:
            raise ValueError(f"drop_path_rate must be a number in [0, 1), got {drop_path_rate!r}")
        output_stride = _positive_int("output_stride", output_stride)
        if output_stride < 4 or output_stride & (output_stride - 1):
            raise ValueError(f"output_stride must be a power of two >= 4 (8, 16, 32), got {output_stride}")
        for name, eps in (("ws_eps", ws_eps), ("gn_eps", gn_eps)):
            if isinstance(eps, bool) or not isinstance(eps, (int, float)) or not 0 < eps < 1:
                raise ValueError(f"{name} must be a small positive number, got {eps!r}")
        self.drop_path_rate, self.output_stride = float(drop_path_rate), output_stride
        self.width_factor = _positive_int("width_factor", width_factor)
        self.ws_eps, self.gn_eps = float(ws_eps), float(gn_eps)

    # -- derived shapes ------------------------------------------------------------------------------------------
    @property
    def stage_widths(self) -> list[int]:
        """Output channels of each stage, with `width_factor` applied (transformers forgets it in places)."""
        return [make_divisible(size * self.width_factor) for size in self.hidden_sizes]

    @property
    def num_features(self) -> int:
        """Channels of the pooled features, the input size of the classifier."""
        return self.stage_widths[-1]

    @property
    def num_labels(self) -> int:
        return len(self.id2label)

    @num_labels.setter
    def num_labels(self, value: int) -> None:
        self._set_labels(value, None, None)

    def _set_labels(self, num_labels, id2label, label2id) -> None:
        if id2label is not None:
            if not isinstance(id2label, dict):
                raise ValueError(f"id2label must be a dict of index -> name, got {type(id2label).__name__}")
            _within_limit("num_labels", len(id2label))
            try:
                id2label = {int(key): str(value) for key, value in id2label.items()}
            except (TypeError, ValueError, OverflowError):
                raise ValueError(f"id2label keys must be class indices (integers), got {_shown(list(id2label))}") from None
            if sorted(id2label) != list(range(len(id2label))):
                raise ValueError(f"id2label keys must be 0..{len(id2label) - 1}, got {_shown(sorted(id2label))}")
            if num_labels is not None and num_labels != len(id2label):
                num_labels_given = _positive_int("num_labels", num_labels, low=0)
                id2label = {index: f"LABEL_{index}" for index in range(num_labels_given)}
        else:
            count = 2 if num_labels is None else _positive_int("num_labels", num_labels, low=0)
            id2label = {index: f"LABEL_{index}" for index in range(count)}
        self.id2label = dict(sorted(id2label.items()))
        if label2id is not None and not isinstance(label2id, dict):
            raise ValueError(f"label2id must be a dict of name -> index, got {type(label2id).__name__}")
        if label2id is not None and not all(_is_index(index) for index in label2id.values()):
            raise ValueError(f"label2id values must be class indices (integers), got {_shown(list(label2id.values()))}")
        # Always the inverse of id2label: a label2id kept from before a rename would name the old classes.
        self.label2id = {name: index for index, name in self.id2label.items()}

    def estimated_parameters(self, num_labels: int | None = None) -> int:
        """Parameters of the network this config builds (convolutions, norms, head), without building it."""
        total = self.num_channels * self.embedding_size * 49
        in_channels = self.embedding_size
        for depth, out_channels in zip(self.depths, self.stage_widths, strict=True):
            mid = make_divisible(out_channels * 0.25)
            total += in_channels * out_channels  # the first layer's projection
            for index in range(depth):
                width = in_channels if index == 0 else out_channels
                total += width * mid + 9 * mid * mid + mid * out_channels + 2 * (width + 2 * mid)
            in_channels = out_channels
        labels = self.num_labels if num_labels is None else num_labels
        return total + 2 * self.num_features + (self.num_features + 1) * labels

    def _check_size(self) -> None:
        parameters = self.estimated_parameters()
        if parameters > MAX_PARAMETERS:
            raise ValueError(
                f"this config describes a network of {parameters:,} parameters (num_labels {self.num_labels}, depths "
                f"{self.depths}, stage widths {self.stage_widths}), more than the {MAX_PARAMETERS:,} any BiT needs; "
                "check these fields"
            )

    def _check_group_divisibility(self) -> None:
        widths = {"embedding_size": self.embedding_size}
        for index, width in enumerate(self.stage_widths, start=1):
            widths[f"stage{index} width"] = width
            widths[f"stage{index} bottleneck width"] = make_divisible(width * 0.25)
        for name, channels in widths.items():
            if name == "embedding_size" and self.layer_type == "preactivation":
                continue  # the pre-activation stem has no GroupNorm
            if channels % self.num_groups:
                raise ValueError(f"num_groups={self.num_groups} does not divide {name}={channels}")

    # -- backbone outputs (same rules and messages as transformers' BackboneConfigMixin) ----------------------
    @property
    def out_features(self) -> list[str]:
        return self._out_features

    @out_features.setter
    def out_features(self, out_features: list[str] | None) -> None:
        self.set_output_features_output_indices(out_features=out_features, out_indices=None)

    @property
    def out_indices(self) -> list[int]:
        return self._out_indices

    @out_indices.setter
    def out_indices(self, out_indices: list[int] | None) -> None:
        self.set_output_features_output_indices(out_features=None, out_indices=out_indices)

    def set_output_features_output_indices(self, out_features, out_indices) -> None:
        """Set the backbone outputs; either may be None and is then derived from the other."""
        if isinstance(out_indices, tuple):
            out_indices = list(out_indices)
        _verify_out_features_out_indices(out_features, out_indices, self.stage_names)
        if out_features is None and out_indices is None:
            out_features, out_indices = [self.stage_names[-1]], [len(self.stage_names) - 1]
        elif out_indices is None:
            out_indices = [self.stage_names.index(name) for name in out_features]
        elif out_features is None:
            out_features = [self.stage_names[index] for index in out_indices]
        _verify_out_features_out_indices(out_features, out_indices, self.stage_names)
        self._out_features, self._out_indices = list(out_features), list(out_indices)

    # -- serialisation -------------------------------------------------------------------------------------------
    def to_dict(self) -> dict[str, Any]:
        """All fields as a JSON-ready dict, in the key layout of transformers' config.json."""
        output = copy.deepcopy(self.extra)
        output.update(
            num_channels=self.num_channels,
            embedding_size=self.embedding_size,
            hidden_sizes=list(self.hidden_sizes),
            depths=list(self.depths),
            layer_type=self.layer_type,
            hidden_act=self.hidden_act,
            global_padding=self.global_padding,
            num_groups=self.num_groups,
            drop_path_rate=self.drop_path_rate,
            embedding_dynamic_padding=self.embedding_dynamic_padding,
            output_stride=self.output_stride,
            width_factor=self.width_factor,
            out_features=list(self.out_features),
            out_indices=list(self.out_indices),
            stage_names=list(self.stage_names),
            ws_eps=self.ws_eps,
            gn_eps=self.gn_eps,
            id2label={str(index): name for index, name in self.id2label.items()},
            label2id=dict(self.label2id),
            model_type=self.model_type,
        )
        if self.problem_type is not None:
            output["problem_type"] = self.problem_type
        if self.output_hidden_states:
            output["output_hidden_states"] = True
        if not self.return_dict:
            output["return_dict"] = False
        return dict(sorted(output.items()))

    def to_json_string(self) -> str:
        return json.dumps(self.to_dict(), indent=2, sort_keys=True) + "\n"

    def to_json_file(self, path: str | os.PathLike) -> None:
        """Write `to_json_string()` to `path`, atomically."""
        write_text_atomic(path, self.to_json_string())

    def update(self, values: dict[str, Any]) -> None:
        """Set several fields at once, validated as the constructor validates them (derived fields follow)."""
        self.__dict__.update(type(self).from_dict(self.to_dict(), **values).__dict__)

    @property
    def use_return_dict(self) -> bool:
        """transformers' name for `return_dict`."""
        return self.return_dict

    @property
    def dtype(self) -> Any:
        """The weights' dtype a saved config records (a torch dtype), None on a fresh config (as in transformers)."""
        recorded = self.extra.get("dtype") or self.extra.get("torch_dtype")
        return DTYPES.get(str(recorded).removeprefix("torch."), recorded) if recorded is not None else None

    def __getattr__(self, name: str) -> Any:
        # Keys of config.json this class has no field for (architectures, dtype, ...) read as attributes, as
        # in transformers; anything else is still an AttributeError, so typos are not hidden.
        extra = self.__dict__.get("extra", {})
        if name in extra:
            return extra[name]
        raise AttributeError(f"{type(self).__name__} has no attribute {name!r}")

    @classmethod
    def from_dict(cls, config_dict: dict[str, Any], **overrides: Any) -> BitConfig:
        """Build from a dict (a parsed config.json); `overrides` win over its values."""
        values = dict(config_dict)
        model_type = values.get("model_type", cls.model_type)
        if model_type != cls.model_type:
            raise ValueError(f"config has model_type={model_type!r}, expected {cls.model_type!r}")
        for key in ("_out_features", "_out_indices"):
            if key in values:
                values[key[1:]] = values.pop(key)
        if "num_labels" in overrides and "id2label" not in overrides:
            values.pop("id2label", None)
            values.pop("label2id", None)
        values.update(overrides)
        if values.get("out_features") is not None and values.get("out_indices") is not None and (
            "out_features" in overrides or "out_indices" in overrides
        ):
            values.pop("out_indices" if "out_features" in overrides else "out_features")
        return cls(**values)

    def save_pretrained(self, save_directory: str | os.PathLike) -> Path:
        """Write `config.json` into `save_directory` (created if needed) atomically; returns the file path."""
        directory = Path(save_directory)
        if directory.exists() and not directory.is_dir():
            raise NotADirectoryError(f"cannot save config: {directory} is a file, not a directory")
        directory.mkdir(parents=True, exist_ok=True)
        path = directory / CONFIG_NAME
        write_text_atomic(path, self.to_json_string())
        return path

    @classmethod
    def from_pretrained(cls, path: str | os.PathLike, *, return_unused_kwargs: bool = False, **overrides: Any):
        """Read a config.json file, the one in a directory (or its `subfolder`), or a Hugging Face Hub repository's,
        resolved as models are (`hub.locate`: `revision`, `cache_dir`, `token`, `local_files_only`,
        `force_download`, `subfolder`); `overrides` replace its values. With `return_unused_kwargs=True` (as in
        transformers), overrides that are not config fields are left out and returned: `(config, unused)`."""
        options = hub.hub_options(overrides)
        located = hub.locate(path, CONFIG_NAME, options)
        unused = {key: overrides.pop(key) for key in list(overrides) if key not in _FIELDS} if return_unused_kwargs else {}
        config = cls.from_dict(read_json(located), **overrides)
        return (config, unused) if return_unused_kwargs else config

    @classmethod
    def from_json_file(cls, path: str | os.PathLike) -> BitConfig:
        """Read a config JSON file (transformers' `from_json_file`)."""
        return cls.from_dict(read_json(path))

    def push_to_hub(self, repo_id: str, **options: Any):
        """Upload config.json to the Hugging Face Hub repository `repo_id` (created if missing)."""
        return hub.push_folder(repo_id, self.save_pretrained, **options)

    @classmethod
    def from_variant(cls, name: str, **overrides: Any) -> BitConfig:
        """Build a BiT architecture by its paper name: `BiT-S-R50x1` ... `BiT-M-R152x4`, or `tiny`.

        `BiT-S` heads have 1000 classes, `BiT-M` 21843; a `-ILSVRC2012` suffix gives the 1000-class head of
        the ImageNet fine-tuned checkpoints. The bare shape (`R101x3`) is accepted too and has a 1000-class head.
        """
        key, fine_tuned = _variant_key(name)
        values = dict(VARIANTS[key], num_labels=1000) if fine_tuned else VARIANTS[key]
        return cls(**{**values, **overrides})

    def __eq__(self, other: object) -> bool:
        return isinstance(other, BitConfig) and self.to_dict() == other.to_dict()

    def __repr__(self) -> str:
        return f"BitConfig {self.to_json_string()}"


def variant_names() -> list[str]:
    """Every name `BitConfig.from_variant` accepts as it is (suffixes aside)."""
    return list(VARIANTS)


def is_variant(name: str) -> bool:
    """Whether `BitConfig.from_variant` knows `name` (an architecture, not a checkpoint)."""
    try:
        _variant_key(name)
    except ValueError:
        return False
    return True


def _variant_key(name: str) -> tuple[str, bool]:
    """The VARIANTS key for a name (any case, `BiT-S-` implied), and whether it has the -ILSVRC2012 suffix."""
    if not isinstance(name, str):
        raise ValueError(f"variant name must be a string, got {type(name).__name__}")
    base, suffix = name.strip().lower(), "-ilsvrc2012"
    fine_tuned = base.endswith(suffix)
    base = base.removesuffix(suffix)
    lowered = {key.lower(): key for key in VARIANTS}
    key = lowered.get(base) or lowered.get(f"bit-s-{base}")
    if key is None or (fine_tuned and key == "tiny"):
        raise ValueError(f"unknown BiT variant {name!r}; known: {', '.join(VARIANTS)} (optionally with -ILSVRC2012)")
    return key, fine_tuned


def make_divisible(value: float, divisor: int = 8) -> int:
    """Round a channel count to a multiple of `divisor`, never below 90 % of it (timm and transformers' rule)."""
    rounded = max(divisor, int(value + divisor / 2) // divisor * divisor)
    if rounded < 0.9 * value:
        rounded += divisor
    return rounded


def _verify_out_features_out_indices(out_features, out_indices, stage_names) -> None:
    if out_features is not None:
        if not isinstance(out_features, list):
            raise ValueError(f"out_features must be a list got {type(out_features)}")
        if any(name not in stage_names for name in out_features):
            raise ValueError(f"out_features must be a subset of stage_names: {stage_names} got {out_features}")
        if len(out_features) != len(set(out_features)):
            raise ValueError(f"out_features must not contain any duplicates, got {out_features}")
        expected = [name for name in stage_names if name in out_features]
        if out_features != expected:
            raise ValueError(
                f"out_features must be in the same order as stage_names, expected {expected} got {out_features}"
            )
    if out_indices is not None:
        if not isinstance(out_indices, list):
            raise ValueError(f"out_indices must be a list, got {type(out_indices)}")
        count = len(stage_names)
        if any(isinstance(index, bool) or not isinstance(index, int) for index in out_indices):
            raise ValueError(f"out_indices must be integers, got {out_indices}")
        positive = tuple(index % count if index < 0 else index for index in out_indices)
        if any(index not in range(count) for index in positive) or any(index < -count for index in out_indices):
            raise ValueError(f"out_indices must be valid indices for stage_names {stage_names}, got {out_indices}")
        if len(positive) != len(set(positive)):
            # Same wording as transformers, so code matching on it keeps working.
            raise ValueError(f"out_indices must not contain any duplicates, got {out_indices}(equivalent to {positive}))")
        if positive != tuple(sorted(positive)):
            expected = [index for _, index in sorted(zip(positive, out_indices, strict=True))]
            raise ValueError(
                f"out_indices must be in the same order as stage_names, expected {expected} got {out_indices}"
            )
    if out_features is not None and out_indices is not None:
        if len(out_features) != len(out_indices):
            raise ValueError("out_features and out_indices should have the same length if both are set")
        if out_features != [stage_names[index] for index in out_indices]:
            raise ValueError("out_features and out_indices should correspond to the same stages if both are set")


def _sequence(name: str, value: Any) -> list:
    if isinstance(value, (str, bytes)) or not hasattr(value, "__iter__"):
        raise ValueError(f"{name} must be a list of integers, got {value!r}")
    value = list(value)
    if not value:
        raise ValueError(f"{name} must not be empty")
    return value


def _positive_int(name: str, value: Any, low: int = 1) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < low:
        raise ValueError(f"{name} must be a {'positive' if low else 'non-negative'} integer, got {_shown(value)}")
    return _within_limit(name, value)


def _is_index(value: Any) -> bool:
    try:
        int(value)
    except (TypeError, ValueError, OverflowError):
        return False
    return True


def _within_limit(name: str, value: int) -> int:
    limit = LIMITS.get(name)
    if limit is not None and value > limit:
        raise ValueError(f"{name} must be at most {limit:,}, got {_shown(value)}")
    return value


def _shown(value: Any) -> str:
    """A value for an error message, shortened (a config may hold a 4,000-digit number or a megabyte string)."""
    text = repr(value) if not isinstance(value, int) or abs(value) < 10**30 else f"a {len(str(abs(value)))}-digit integer"
    return text if len(text) <= 80 else text[:77] + "..."


_FIELDS = frozenset(inspect.signature(BitConfig.__init__).parameters) - {"self", "kwargs"}
