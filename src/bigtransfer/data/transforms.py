"""BiT transforms with PIL and torch only (no torchvision at run time).

As in the original big_transfer code: training squashes the image to ``(precrop, precrop)`` (no aspect
preservation), takes a random ``crop x crop`` window and flips it horizontally at random; evaluation
squashes to ``(crop, crop)``. Both end with a float tensor normalised per channel, ``(x / 255 - mean) / std``;
BiT's own checkpoints use mean = std = 0.5, i.e. values in [-1, 1].

Random choices come only from the ``generator`` passed in (never torch's global RNG), so a sample's
augmentation is reproducible from its seed.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch
from PIL import Image

from ..processing import BIT_MEAN, BIT_STD  # inputs in [-1, 1], as the original BiT checkpoints expect

_INTERPOLATIONS = {
    "nearest": Image.Resampling.NEAREST,
    "bilinear": Image.Resampling.BILINEAR,
    "bicubic": Image.Resampling.BICUBIC,
}


def to_normalized_tensor(
    image: Image.Image | np.ndarray, mean: Sequence[float], std: Sequence[float]
) -> torch.Tensor:
    """(H, W, 3) uint8 image -> (3, H, W) float32 tensor ``(x / 255 - mean) / std``."""
    array = np.array(image, dtype=np.uint8, order="C")  # a writable, positively strided copy
    tensor = torch.from_numpy(array).permute(2, 0, 1).to(torch.float32).div_(255.0)
    mean_tensor = torch.tensor(mean, dtype=torch.float32).view(-1, 1, 1)
    std_tensor = torch.tensor(std, dtype=torch.float32).view(-1, 1, 1)
    return tensor.sub_(mean_tensor).div_(std_tensor)


def _as_generator(generator: torch.Generator | int | None, name: str) -> torch.Generator:
    if generator is None:
        raise ValueError(f"{name} is random: pass a torch.Generator or an int seed (see TransformedDataset)")
    if isinstance(generator, torch.Generator):
        return generator
    return torch.Generator().manual_seed(int(generator))


def _freeze_normalization(transform) -> None:
    """Store mean/std as float tuples (they often arrive as lists from a preprocessor config)."""
    object.__setattr__(transform, "mean", tuple(float(m) for m in transform.mean))
    object.__setattr__(transform, "std", tuple(float(s) for s in transform.std))
    mean, std = transform.mean, transform.std
    if len(mean) != 3 or len(std) != 3:
        raise ValueError(f"mean and std need 3 values (RGB), got {mean} and {std}")
    if any(s <= 0 for s in std):
        raise ValueError(f"std must be positive, got {std}")


@dataclass(frozen=True)
class TrainTransform:
    """Squash-resize to ``(precrop, precrop)``, random ``crop`` window, random horizontal flip, normalise.

    Call as ``transform(image, generator)`` with a ``torch.Generator`` or an int seed; returns a float32
    tensor of shape ``(3, crop, crop)``.

    Example::

        transform = TrainTransform(*hyperrule.resolution(32, 32))  # precrop 160, crop 128
        tensor = transform(image, torch.Generator().manual_seed(0))
    """

    precrop: int
    crop: int
    mean: tuple[float, ...] = BIT_MEAN
    std: tuple[float, ...] = BIT_STD
    hflip: bool = True
    interpolation: str = "bilinear"

    def __post_init__(self):
        if not 0 < self.crop <= self.precrop:
            raise ValueError(f"need 0 < crop <= precrop, got crop {self.crop}, precrop {self.precrop}")
        if self.interpolation not in _INTERPOLATIONS:
            raise ValueError(
                f"interpolation must be one of {sorted(_INTERPOLATIONS)}, got {self.interpolation!r}"
            )
        _freeze_normalization(self)

    def __call__(self, image: Image.Image, generator: torch.Generator | int | None = None) -> torch.Tensor:
        generator = _as_generator(generator, "TrainTransform")
        resized = image.convert("RGB").resize(
            (self.precrop, self.precrop), _INTERPOLATIONS[self.interpolation]
        )
        array = np.asarray(resized)
        span = self.precrop - self.crop + 1
        top = int(torch.randint(0, span, (1,), generator=generator))
        left = int(torch.randint(0, span, (1,), generator=generator))
        array = array[top : top + self.crop, left : left + self.crop]
        if self.hflip and bool(torch.rand(1, generator=generator) < 0.5):
            array = array[:, ::-1]
        return to_normalized_tensor(array, self.mean, self.std)


@dataclass(frozen=True)
class EvalTransform:
    """Squash-resize to ``(crop, crop)`` and normalise; deterministic (a generator argument is ignored).

    Returns a float32 tensor of shape ``(3, crop, crop)``.
    """

    crop: int
    mean: tuple[float, ...] = BIT_MEAN
    std: tuple[float, ...] = BIT_STD
    interpolation: str = "bilinear"

    def __post_init__(self):
        if self.crop <= 0:
            raise ValueError(f"crop must be positive, got {self.crop}")
        if self.interpolation not in _INTERPOLATIONS:
            raise ValueError(
                f"interpolation must be one of {sorted(_INTERPOLATIONS)}, got {self.interpolation!r}"
            )
        _freeze_normalization(self)

    def __call__(self, image: Image.Image, generator: torch.Generator | int | None = None) -> torch.Tensor:
        resized = image.convert("RGB").resize((self.crop, self.crop), _INTERPOLATIONS[self.interpolation])
        return to_normalized_tensor(resized, self.mean, self.std)
