"""The preprocessing kernels every path shares: resize (antialiased, as torchvision and so transformers resize),
center crop, and the fused rescale + normalise, over (C, H, W) uint8 or float32 tensors; and the one
interpolation vocabulary (names, PIL filters, torch modes). `BitImageProcessor`, the training transforms and the
run's own evaluation all preprocess with these, so a run's report and `bigtransfer evaluate` of its saved model
see the same pixels.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import PIL.Image
import torch
import torch.nn.functional as F

Resampling = PIL.Image.Resampling
# PIL filter -> torch.nn.functional.interpolate mode; this is torchvision's mapping, which is what
# transformers' BitImageProcessor resizes with. BOX and HAMMING have no torch kernel: PIL resizes those.
TORCH_MODES = {
    Resampling.NEAREST: "nearest-exact",
    Resampling.BILINEAR: "bilinear",
    Resampling.BICUBIC: "bicubic",
    Resampling.LANCZOS: "lanczos",
}
RESAMPLE_NAMES = {
    "nearest": Resampling.NEAREST,
    "nearest-exact": Resampling.NEAREST,
    "nearest_exact": Resampling.NEAREST,
    "box": Resampling.BOX,
    "bilinear": Resampling.BILINEAR,
    "linear": Resampling.BILINEAR,
    "hamming": Resampling.HAMMING,
    "bicubic": Resampling.BICUBIC,
    "cubic": Resampling.BICUBIC,
    "lanczos": Resampling.LANCZOS,
}
# Resized images larger than this (pixels) are only computed where the center crop keeps them.
FULL_RESIZE_LIMIT = 1 << 24


def as_resample(value: Any) -> Resampling:
    """PIL filter from an int, a PIL enum, a name ("bicubic") or a torchvision InterpolationMode."""
    if isinstance(value, (int, np.integer)) and not isinstance(value, bool):
        try:
            return Resampling(int(value))
        except ValueError:
            pass
    else:
        name = getattr(value, "value", value)  # torchvision InterpolationMode has a str value
        if isinstance(name, str) and name.lower() in RESAMPLE_NAMES:
            return RESAMPLE_NAMES[name.lower()]
    raise ValueError(
        f"resample must be a PIL.Image.Resampling filter or its int (0 NEAREST, 1 LANCZOS, 2 BILINEAR, "
        f"3 BICUBIC, 4 BOX, 5 HAMMING) or name, got {value!r}"
    )


def resized_hw(height: int, width: int, size: dict) -> tuple[int, int]:
    """Output (height, width) exactly as transformers computes it."""
    if "height" in size:
        return size["height"], size["width"]
    shortest = size["shortest_edge"]
    short, long = (width, height) if width <= height else (height, width)
    if "longest_edge" not in size:  # transformers' get_resize_output_image_size
        new_short, new_long = shortest, int(shortest * long / short)
    else:  # transformers' get_size_with_aspect_ratio
        raw = None
        if long / short * shortest > size["longest_edge"]:
            raw = size["longest_edge"] * short / long
            shortest = int(round(raw))
        if short == shortest:
            return height, width
        new_short, new_long = shortest, int((raw if raw is not None else shortest) * long / short)
    new_short, new_long = max(new_short, 1), max(new_long, 1)
    return (new_long, new_short) if width <= height else (new_short, new_long)


def crop_span(length: int, target: int) -> tuple[int, int, int]:
    """(source start, destination start, count) along one axis of a center crop.

    Larger images are cropped at (length - target) // 2; smaller ones are zero padded with
    (target - length) // 2 before them, as torchvision's center_crop and so transformers'
    BitImageProcessor do (its PIL twin puts the odd pixel of padding on the other side).
    """
    if length >= target:
        return (length - target) // 2, 0, target
    return 0, (target - length) // 2, length


def center_crop(image: torch.Tensor, height: int, width: int) -> torch.Tensor:
    """Center crop (C, H, W) to (C, height, width), zero padding where the image is smaller."""
    src_top, dst_top, rows = crop_span(image.shape[-2], height)
    src_left, dst_left, cols = crop_span(image.shape[-1], width)
    window = image[..., src_top : src_top + rows, src_left : src_left + cols]
    if rows == height and cols == width:
        return window
    padded = np.zeros(image.shape[:-2] + (height, width), dtype=window.numpy().dtype)
    padded[..., dst_top : dst_top + rows, dst_left : dst_left + cols] = (
        window.numpy()
    )  # NumPy: see normalize_batch
    return torch.from_numpy(padded)


def resize(image: torch.Tensor, height: int, width: int, resample: Resampling) -> torch.Tensor:
    """Resize (C, H, W) uint8 or float32 with antialiasing, like torchvision's resize."""
    if image.shape[-2:] == (height, width):
        return image
    mode = TORCH_MODES.get(resample)
    if mode is None:  # BOX / HAMMING: PIL, one band at a time (L for uint8, F for float)
        bands = [
            np.array(PIL.Image.fromarray(band).resize((width, height), resample)) for band in image.numpy()
        ]
        return torch.from_numpy(np.stack(bands))
    if mode == "nearest-exact":
        return F.interpolate(image[None], size=(height, width), mode=mode)[0]
    batch = image[None]
    if image.dtype == torch.uint8 and (height, width) == (1, 1):
        # torch's uint8 antialiased kernel fails an internal assert for a 1x1 output from a channels-first
        # input (torch 2.x); channels-last memory, PIL's layout and so the usual case, avoids it.
        batch = batch.contiguous(memory_format=torch.channels_last)
    return F.interpolate(batch, size=(height, width), mode=mode, antialias=True, align_corners=False)[0]


def resize_and_crop(
    image: torch.Tensor, height: int, width: int, crop_height: int, crop_width: int, resample: Resampling
) -> torch.Tensor:
    """Resize (C, H, W) to (height, width), then center crop to (crop_height, crop_width).

    When the resized image would exceed `FULL_RESIZE_LIMIT` pixels (an extreme aspect ratio such as
    1x20000 resized to a 224 shortest edge: 224x4480000), only the part the crop keeps is computed, by
    PIL's resize of that box of the source. Float images come out identical to a full resize; uint8 ones
    within one level on natural images and 2.1 at worst seen (a 1-6 pixel side upsampled bicubic: PIL and torch
    round and clip uint8 ringing at different points; emulating torch's passes in float was no closer); nearest
    and box may, where upsampling puts a pixel exactly halfway, pick the other source pixel.
    """
    if height * width <= FULL_RESIZE_LIMIT:
        return center_crop(resize(image, height, width, resample), crop_height, crop_width)
    src_top, dst_top, rows = crop_span(height, crop_height)
    src_left, dst_left, cols = crop_span(width, crop_width)
    if resample == Resampling.NEAREST:  # PIL rounds nearest differently: pick torch's source pixels directly
        row_index = nearest_exact(src_top, rows, image.shape[-2], height)
        col_index = nearest_exact(src_left, cols, image.shape[-1], width)
        window = image.numpy()[:, row_index][:, :, col_index]
    else:
        row_scale, col_scale = image.shape[-2] / height, image.shape[-1] / width
        box = (
            src_left * col_scale,
            src_top * row_scale,
            (src_left + cols) * col_scale,
            (src_top + rows) * row_scale,
        )
        window = np.stack(
            [
                np.array(PIL.Image.fromarray(band).resize((cols, rows), resample, box=box))
                for band in image.numpy()
            ]
        )
    padded = np.zeros(image.shape[:-2] + (crop_height, crop_width), dtype=window.dtype)
    padded[..., dst_top : dst_top + rows, dst_left : dst_left + cols] = window
    return torch.from_numpy(padded)


def nearest_exact(start: int, count: int, length: int, resized: int) -> np.ndarray:
    """Source indices of resized positions start..start+count-1 as torch's "nearest-exact" computes them:
    `floorf((index + 0.5) * scale)` with a float32 scale and the product rounded to float32."""
    scale = np.float64(np.float32(length) / np.float32(resized))
    positions = np.arange(start, start + count, dtype=np.float64)
    return np.minimum(np.floor(((positions + 0.5) * scale).astype(np.float32)).astype(np.int64), length - 1)


def affine(
    channels: int,
    do_rescale: bool,
    rescale_factor: float,
    do_normalize: bool,
    mean: list[float],
    std: list[float],
) -> tuple[np.ndarray, np.ndarray]:
    """Per-channel (scale, offset) with `x * scale + offset == ((x * rescale) - mean) / std`."""
    scale = np.full(channels, rescale_factor if do_rescale else 1.0)
    offset = np.zeros(channels)
    if do_normalize:
        for name, values in (("image_mean", mean), ("image_std", std)):
            if len(values) not in (1, channels):
                raise ValueError(f"{name} has {len(values)} values but the images have {channels} channels")
        scale = scale / np.asarray(std)
        offset = -np.asarray(mean) / np.asarray(std)
    scale = np.broadcast_to(scale, channels).astype(np.float32).reshape(-1, 1, 1)
    offset = np.broadcast_to(offset, channels).astype(np.float32).reshape(-1, 1, 1)
    return scale, offset


def normalize_batch(
    images: list[torch.Tensor],
    channels: int,
    height: int,
    width: int,
    scale: np.ndarray,
    offset: np.ndarray,
    layout: str,
) -> np.ndarray:
    """Stack (C, H, W) uint8/float images into one float32 batch, applying `x * scale + offset`.

    NumPy, not torch: torch's multi-threaded elementwise kernels stall for tens of milliseconds
    when the CPU is oversubscribed (measured: p90 44 ms for a 224x224 multiply-add with 2 threads
    on a loaded 2-core machine), while this single-threaded pass costs the same 0.04 ms either way.
    """
    if layout == "first":
        batch = np.empty((len(images), channels, height, width), dtype=np.float32)
        targets = batch
    else:
        batch = np.empty((len(images), height, width, channels), dtype=np.float32)
        targets = batch.transpose(0, 3, 1, 2)
    for image, target in zip(images, targets, strict=True):
        np.multiply(image.numpy(), scale, out=target)  # uint8 * float32 -> float32; 1 channel broadcasts
        target += offset
    return batch
