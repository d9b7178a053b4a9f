"""BiT's training and evaluation transforms, on the preprocessing kernels every path shares (`processing.ops`).

As in the original big_transfer code: training squashes the image to ``(precrop, precrop)`` (no aspect
preservation), takes a random ``crop x crop`` window and flips it horizontally at random; evaluation
squashes to ``(crop, crop)``. Both end with a float tensor normalised per channel, ``(x / 255 - mean) / std``;
BiT's own checkpoints use mean = std = 0.5, i.e. values in [-1, 1]. Evaluation is `BitImageProcessor.squash`
itself, the processor a training run saves beside its model, so a run's report and `bigtransfer evaluate` of the
saved model see the same pixels.

Random choices come only from the ``generator`` passed in (never torch's global RNG), so a sample's
augmentation is reproducible from its seed.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch
from PIL import Image

from ..images import image_to_tensor
from ..processing import (  # inputs in [-1, 1], as the BiT checkpoints expect
    BIT_MEAN,
    BIT_STD,
    BitImageProcessor,
)
from ..processing.ops import RESAMPLE_NAMES, affine, as_resample, normalize_batch, resize


def normalized(pixels: torch.Tensor, mean: Sequence[float], std: Sequence[float]) -> torch.Tensor:
    """(C, H, W) uint8 pixels (C = 1 is broadcast to RGB) -> (3, H, W) float32 ``(x / 255 - mean) / std``, with
    the processor's own rescale-and-normalise kernel."""
    scale, offset = affine(3, True, 1 / 255, True, list(mean), list(std))
    return torch.from_numpy(normalize_batch([pixels], 3, *pixels.shape[-2:], scale, offset, "first")[0])


def to_normalized_tensor(image: Image.Image | np.ndarray, mean: Sequence[float], std: Sequence[float]) -> torch.Tensor:
    """(H, W, 3) uint8 image -> (3, H, W) float32 tensor ``(x / 255 - mean) / std``."""
    array = np.array(image, dtype=np.uint8, order="C")
    return normalized(torch.from_numpy(array).permute(2, 0, 1), mean, std)


def _as_generator(generator: torch.Generator | int | None, name: str) -> torch.Generator:
    if generator is None:
        raise ValueError(f"{name} is random: pass a torch.Generator or an int seed (see TransformedDataset)")
    if isinstance(generator, torch.Generator):
        return generator
    return torch.Generator().manual_seed(int(generator))


def _check(transform) -> None:
    """Store mean/std as float tuples (they often arrive as lists from a preprocessor config); check them and
    the interpolation."""
    object.__setattr__(transform, "mean", tuple(float(m) for m in transform.mean))
    object.__setattr__(transform, "std", tuple(float(s) for s in transform.std))
    mean, std = transform.mean, transform.std
    if len(mean) != 3 or len(std) != 3:
        raise ValueError(f"mean and std need 3 values (RGB), got {mean} and {std}")
    if any(s <= 0 for s in std):
        raise ValueError(f"std must be positive, got {std}")
    if transform.interpolation not in RESAMPLE_NAMES:
        raise ValueError(f"interpolation must be one of {sorted(RESAMPLE_NAMES)}, got {transform.interpolation!r}")


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
        _check(self)

    def __call__(self, image: Image.Image, generator: torch.Generator | int | None = None) -> torch.Tensor:
        generator = _as_generator(generator, "TrainTransform")
        pixels = image_to_tensor(image, "last", do_convert_rgb=True, do_rescale=True)
        pixels = resize(pixels, self.precrop, self.precrop, as_resample(self.interpolation))
        span = self.precrop - self.crop + 1
        top = int(torch.randint(0, span, (1,), generator=generator))
        left = int(torch.randint(0, span, (1,), generator=generator))
        window = pixels[:, top : top + self.crop, left : left + self.crop]
        if self.hflip and bool(torch.rand(1, generator=generator) < 0.5):
            window = window.flip(-1)
        return normalized(window, self.mean, self.std)


@dataclass(frozen=True)
class InceptionCropTransform:
    """Inception crop (a random window of 5-100 % of the image's area and aspect ratio 3/4-4/3, resized to
    ``size x size``), random horizontal flip, normalise: the training view of big_vision's distillation
    (`inception_crop`), the window drawn as torchvision's RandomResizedCrop draws it (10 tries, then the whole
    image). Call as ``transform(image, generator)``; returns a float32 tensor of shape ``(3, size, size)``.
    """

    size: int
    mean: tuple[float, ...] = BIT_MEAN
    std: tuple[float, ...] = BIT_STD
    area: tuple[float, float] = (0.05, 1.0)
    ratio: tuple[float, float] = (3 / 4, 4 / 3)
    hflip: bool = True
    interpolation: str = "bilinear"

    def __post_init__(self):
        if self.size <= 0:
            raise ValueError(f"size must be positive, got {self.size}")
        if not 0 < self.area[0] <= self.area[1] <= 1 or not 0 < self.ratio[0] <= self.ratio[1]:
            raise ValueError(f"need 0 < area <= 1 and 0 < ratio, ordered; got area {self.area}, ratio {self.ratio}")
        _check(self)

    def __call__(self, image: Image.Image, generator: torch.Generator | int | None = None) -> torch.Tensor:
        generator = _as_generator(generator, "InceptionCropTransform")
        pixels = image_to_tensor(image, "last", do_convert_rgb=True, do_rescale=True)
        top, left, height, width = self.window(*pixels.shape[-2:], generator)
        window = resize(pixels[:, top : top + height, left : left + width], self.size, self.size,
                        as_resample(self.interpolation))
        if self.hflip and bool(torch.rand(1, generator=generator) < 0.5):
            window = window.flip(-1)
        return normalized(window, self.mean, self.std)

    def window(self, height: int, width: int, generator: torch.Generator) -> tuple[int, int, int, int]:
        """(top, left, height, width) of a random window of an image of that size."""
        log_ratio = torch.log(torch.tensor(self.ratio, dtype=torch.float64))
        for _ in range(10):
            area = height * width * float(torch.empty(1, dtype=torch.float64).uniform_(*self.area, generator=generator))
            aspect = float(torch.exp(torch.empty(1, dtype=torch.float64).uniform_(*log_ratio.tolist(),
                                                                                   generator=generator)))
            crop_width, crop_height = round((area * aspect) ** 0.5), round((area / aspect) ** 0.5)
            if 0 < crop_width <= width and 0 < crop_height <= height:
                top = int(torch.randint(0, height - crop_height + 1, (1,), generator=generator))
                left = int(torch.randint(0, width - crop_width + 1, (1,), generator=generator))
                return top, left, crop_height, crop_width
        return 0, 0, height, width


@dataclass(frozen=True)
class EvalTransform:
    """Squash-resize to ``(crop, crop)`` and normalise, exactly as `BitImageProcessor.squash(crop, mean, std)`;
    deterministic (a generator argument is ignored). Returns a float32 tensor of shape ``(3, crop, crop)``.
    """

    crop: int
    mean: tuple[float, ...] = BIT_MEAN
    std: tuple[float, ...] = BIT_STD
    interpolation: str = "bilinear"

    def __post_init__(self):
        if self.crop <= 0:
            raise ValueError(f"crop must be positive, got {self.crop}")
        _check(self)
        processor = BitImageProcessor.squash(self.crop, self.mean, self.std, as_resample(self.interpolation))
        object.__setattr__(self, "processor", processor)

    def __call__(self, image: Image.Image, generator: torch.Generator | int | None = None) -> torch.Tensor:
        return self.processor(image, return_tensors="pt")["pixel_values"][0]
