"""What `BitImageProcessor` takes as arguments, checked and put in one form: sizes (`{"shortest_edge"}` or
`{"height", "width"}` from ints, pairs or transformers' SizeDict), resampling, channel layouts, mean / std, and the
resolved settings of one `preprocess` call (`CallOptions`). Errors name the argument and what it accepts."""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from typing import Any

import numpy as np
import torch

from .ops import Resampling

SIZE_KEY_SETS = ({"height", "width"}, {"shortest_edge"}, {"shortest_edge", "longest_edge"})
CHANNELS_FIRST = {"channels_first", "first", "chw", "nchw"}
CHANNELS_LAST = {"channels_last", "last", "hwc", "nhwc"}


def as_bool(value: Any, name: str) -> bool:
    if isinstance(value, (bool, np.bool_)) or (isinstance(value, int) and value in (0, 1)):
        return bool(value)
    raise TypeError(f"{name} must be a bool, got {value!r}")


def as_size_dict(size: Any, name: str, default_to_square: bool, allowed: tuple[set[str], ...]) -> dict:
    """transformers' `get_size_dict` rules: int -> square or shortest edge, (h, w) -> height/width."""
    if isinstance(size, (int, np.integer)) and not isinstance(size, bool):
        size = (
            {"height": int(size), "width": int(size)} if default_to_square else {"shortest_edge": int(size)}
        )
    elif isinstance(size, (list, tuple)):
        if len(size) != 2:
            raise ValueError(f"{name} as a sequence must be (height, width), got {size!r}")
        size = {"height": size[0], "width": size[1]}
    elif not isinstance(size, Mapping):
        try:  # e.g. transformers' SizeDict, which iterates as (key, value) pairs
            size = dict(size)
        except (TypeError, ValueError):
            raise TypeError(
                f"{name} must be an int, a (height, width) pair or a dict, got {size!r}"
            ) from None
    size = {key: value for key, value in size.items() if value is not None}
    if set(size) not in allowed:
        forms = " or ".join(str(sorted(keys)) for keys in allowed)
        raise ValueError(f"{name} must have the keys {forms}, got {sorted(size)} in {size!r}")
    for key, value in size.items():
        if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value <= 0:
            raise ValueError(f"{name}[{key!r}] must be a positive int, got {value!r}")
    return {key: int(value) for key, value in size.items()}


def as_floats(value: Any, name: str) -> list[float]:
    values = [value] if isinstance(value, (int, float, np.number)) else value
    try:
        floats = [float(v) for v in values]
    except (TypeError, ValueError):
        raise TypeError(f"{name} must be a float or a sequence of floats, got {value!r}") from None
    if not floats or not all(np.isfinite(floats)):
        raise ValueError(f"{name} must be finite and non-empty, got {value!r}")
    return floats


def as_layout(value: Any) -> str | None:
    """'first' / 'last' from "channels_first", "channels_last", ChannelDimension, "CHW", "HWC"."""
    if value is None:
        return None
    name = getattr(value, "value", value)
    if isinstance(name, str):
        if name.lower() in CHANNELS_FIRST:
            return "first"
        if name.lower() in CHANNELS_LAST:
            return "last"
    raise ValueError(
        f"input_data_format/data_format must be 'channels_first' or 'channels_last', got {value!r}"
    )


def as_return_tensors(value: Any) -> str | None:
    name = getattr(value, "value", value)  # transformers' TensorType
    if name is None or name in ("pt", "np"):
        return name
    raise ValueError(f"return_tensors must be 'pt', 'np' or None, got {value!r}")


@dataclasses.dataclass(frozen=True)
class CallOptions:
    """The settings of one `preprocess` call, resolved and validated."""

    do_resize: bool
    size: dict
    resample: Resampling
    do_center_crop: bool
    crop: dict
    do_rescale: bool
    rescale_factor: float
    do_normalize: bool
    mean: list[float]
    std: list[float]
    do_convert_rgb: bool
    return_tensors: str | None
    out_layout: str
    in_layout: str | None
    device: Any


def size_mapping(size: Any) -> Any:
    """A dict from transformers' SizeDict (attributes height, width, shortest_edge, longest_edge)."""
    if isinstance(size, Mapping) or isinstance(size, (int, list, tuple)):
        return size
    names = ("height", "width", "shortest_edge", "longest_edge")
    return {name: getattr(size, name) for name in names if getattr(size, name, None) is not None}


def one_image(image: Any):
    """(the image as a (C, H, W) tensor, a function giving results back as the input's type)."""
    if isinstance(image, torch.Tensor):
        if image.ndim != 3:
            raise ValueError(f"expected one (C, H, W) image, got shape {tuple(image.shape)}")
        return image, lambda result: result.to(image.device)
    if isinstance(image, np.ndarray):
        if image.ndim != 3:
            raise ValueError(f"expected one (C, H, W) image, got shape {image.shape}")
        return torch.from_numpy(np.ascontiguousarray(image)), lambda result: result.numpy()
    raise TypeError(f"expected a (C, H, W) torch tensor or numpy array, got {type(image).__name__}")
