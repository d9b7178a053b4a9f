"""Prediction: a model and its preprocessing from any source, and image files -> top-k labels.

`predict_images` decodes files in worker processes (JPEGs at the reduced size the processor's resize allows,
`images.decode_image`) in fixed-size batches, so a compiled model never recompiles.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import time
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np
import PIL.Image
import torch
from torch import nn

from ..checkpoints import keymaps, loader
from ..images import decode_image
from ..modeling import BitForImageClassification
from ..processing import BIT_MEAN, BIT_STD, IMAGE_PROCESSOR_CONFIG_NAME, BitImageProcessor, ProcessorTransform
from ..report import progress_bar
from .speed import module_device, optimize

logger = logging.getLogger("bigtransfer")

# ---------------------------------------------------------------------------------------------------------------
# A model and its preprocessing, from any source.


def load_for_inference(source: str | os.PathLike, device: str | torch.device | None = None):
    """(classifier in eval mode on `device`, its BitImageProcessor) for any source `from_pretrained` takes.

    The processor is the source's own (a directory's preprocessor_config.json; timm's pretrained config; the
    original code's squash to [-1, 1]); a transformers directory without one gets BiT's 128x128 [-1, 1] squash,
    with a warning. Weights are float32 (`--precision` autocasts).
    """
    if isinstance(source, nn.Module):
        raise TypeError("pass the model's directory (or name), so its preprocessing (preprocessor_config.json) is known")
    checkpoint = loader.read(source)
    network = loader.build(BitForImageClassification, checkpoint).float()
    if network.config.num_labels == 0:
        raise ValueError(f"{checkpoint.source} has no classification head (num_labels=0)")
    if checkpoint.naming == keymaps.TRANSFORMERS and checkpoint.preprocessor_config is None:
        logger.warning("%s has no %s; using BiT's 128x128 [-1, 1] evaluation transform", checkpoint.source,
                       IMAGE_PROCESSOR_CONFIG_NAME)
        processor = BitImageProcessor.squash(128, BIT_MEAN, BIT_STD)
    else:
        processor = BitImageProcessor.from_dict(checkpoint.preprocessor_dict())
    return network.to(_device(device)).eval(), processor


def _device(device: str | torch.device | None) -> torch.device:
    return torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))


def maybe_optimized(model: nn.Module, optimized: bool) -> nn.Module:
    """`optimize(model)` in place when `optimized`, else `model` as it is."""
    return optimize(model, inplace=True) if optimized else model


# ---------------------------------------------------------------------------------------------------------------
# Image files -> predictions: reduced-size JPEG decoding, worker processes, fixed-size batches.


def processor_min_size(processor: Any) -> int | tuple[int, int] | None:
    """The least decoded size a BitImageProcessor (or a torchvision-style Resize) needs, for `decode_image`."""
    if processor is None or not getattr(processor, "do_resize", True):
        return None
    size = getattr(processor, "size", None)
    if isinstance(size, dict):
        if "shortest_edge" in size:
            return int(size["shortest_edge"])
        if "height" in size and "width" in size:
            return int(size["height"]), int(size["width"])
        return None
    if isinstance(size, int):
        return size
    if isinstance(size, (tuple, list)) and len(size) == 2:
        return int(size[0]), int(size[1])
    return None


class ImageFiles(torch.utils.data.Dataset):
    """Image files -> (pixel tensor, ok flag): decoded at reduced size and preprocessed, in a worker process.

    `transform` maps a PIL image to a (C, H, W) tensor, e.g. `lambda im: processor(im, return_tensors="pt")
    ["pixel_values"][0]`; with `on_bad_image="skip"` an unreadable file gives a zero tensor and ok=False.
    """

    def __init__(
        self, paths: Sequence[str | os.PathLike], transform: Callable[[PIL.Image.Image], torch.Tensor],
        min_size: int | tuple[int, int] | None = None, on_bad_image: str = "raise", shape: tuple[int, ...] | None = None,
    ):
        if on_bad_image not in ("raise", "skip"):
            raise ValueError(f"on_bad_image must be 'raise' or 'skip', got {on_bad_image!r}")
        self.paths, self.transform, self.min_size = list(paths), transform, min_size
        self.on_bad_image, self.shape = on_bad_image, shape

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, bool]:
        try:
            return self.transform(decode_image(self.paths[index], self.min_size)), True
        except (OSError, ValueError) as error:
            if self.on_bad_image == "raise" or self.shape is None:
                raise
            logger.warning("skipping %s: %s", self.paths[index], error)
            return torch.zeros(self.shape), False


@dataclasses.dataclass
class Predictions:
    """What `predict_images` returns: top-k (label, probability) per image (None for a skipped file), and the
    end-to-end throughput (decode, preprocessing, model) of the call. `seconds` leaves out the time an optimized
    model spent compiling during the call, which is `compile_seconds`."""

    top_k: list[list[tuple[str, float]] | None]
    num_images: int
    seconds: float
    compile_seconds: float = 0.0

    @property
    def images_per_second(self) -> float:
        return self.num_images / self.seconds if self.seconds > 0 else float("inf")


def predict_images(
    model: nn.Module, paths: Sequence[str | os.PathLike], processor: Any, *, batch_size: int = 16,
    num_workers: int | None = None, top_k: int = 5, reduced_decode: bool = True, on_bad_image: str = "raise",
    progress: bool = False,
) -> Predictions:
    """Classify image files in batches: worker processes decode (JPEGs at reduced size) and preprocess while the
    model runs; the last batch is padded to `batch_size` so a compiled model never recompiles.

    Args:
        model: a BitForImageClassification, or `optimize(model)` of one (the fast path).
        paths: image files.
        processor: a BitImageProcessor (its resize target sets the reduced JPEG decode size), or any callable
            from a PIL image to a (C, H, W) tensor.
        batch_size: images per forward pass.
        num_workers: decoding processes (default: the cores the model's threads leave free, up to 4; 0 decodes
            in the main process between batches).
        top_k: how many (label, probability) pairs per image.
        reduced_decode: decode JPEGs at 1/2, 1/4 or 1/8 scale when the processor downsizes anyway.
        on_bad_image: "raise", or "skip" (that entry of `top_k` is None).
        progress: a progress bar over the images (on a terminal).

    Example:
        >>> result = predict_images(optimize(model), paths, BitImageProcessor.from_pretrained(directory))
        >>> result.top_k[0][0], result.images_per_second
    """
    if isinstance(paths, (str, bytes, os.PathLike)):
        raise TypeError(f"paths must be a list of image files, got one {type(paths).__name__}: pass [{paths!r}]")
    if batch_size < 1:
        raise ValueError(f"batch_size must be positive, got {batch_size}")
    if top_k < 1:
        raise ValueError(f"top_k must be positive, got {top_k}")
    dataset = ImageFiles(paths, _processor_transform(processor),
                         processor_min_size(processor) if reduced_decode else None, on_bad_image,
                         _output_shape(processor))
    device = torch.device(getattr(model, "device", None) or module_device(model))
    loader = _file_loader(dataset, batch_size, num_workers, device)
    id2label = getattr(getattr(model, "config", None), "id2label", None) or {}
    model.eval()
    start, compiled_before = time.perf_counter(), getattr(model, "compile_seconds", 0.0)
    results: list[list[tuple[str, float]] | None] = []
    pad = getattr(model, "is_compiled", False)  # a compiled graph per batch shape: keep one shape
    bar = progress_bar(progress, len(dataset), 0, "predict", unit="img")
    for pixels, ok in loader:
        count = pixels.shape[0]
        if pad and count < batch_size:
            pixels = torch.cat([pixels, pixels.new_zeros((batch_size - count,) + tuple(pixels.shape[1:]))])
        with torch.inference_mode():
            logits = model(pixels.to(device, non_blocking=True)).logits[:count].float()
        scores, indices = logits.softmax(-1).topk(min(top_k, logits.shape[-1]), dim=-1)
        results.extend(
            [(id2label.get(int(i), str(int(i))), float(s)) for s, i in zip(scores[row], indices[row], strict=True)]
            if good else None for row, good in enumerate(ok.tolist())
        )
        if bar is not None:
            bar.update(count)
    if bar is not None:
        bar.close()
    compiling = getattr(model, "compile_seconds", 0.0) - compiled_before
    return Predictions(results, len(results), time.perf_counter() - start - compiling, compiling)


def _file_loader(dataset: ImageFiles, batch_size: int, num_workers: int | None, device: torch.device):
    """Batches of decoded files; by default decoded by workers on the cores the model's threads leave free."""
    if num_workers is None:
        # Workers only on spare cores: a decoder sharing a core with the model's threads stalls them all (on a
        # 2-core CPU one worker made the pipeline 15 % slower than decoding in between batches).
        busy = torch.get_num_threads() if device.type == "cpu" else 1
        num_workers = max(0, min(4, (os.cpu_count() or 1) - busy))
    return torch.utils.data.DataLoader(dataset, batch_size=batch_size, num_workers=num_workers, shuffle=False,
                                       persistent_workers=False, prefetch_factor=2 if num_workers else None)


def _processor_transform(processor: Any) -> Callable[[PIL.Image.Image], torch.Tensor]:
    if hasattr(processor, "preprocess"):
        return ProcessorTransform(processor)
    if callable(processor):
        return processor
    raise TypeError(f"processor must be a BitImageProcessor or a callable, got {type(processor).__name__}")


def _output_shape(processor: Any) -> tuple[int, ...] | None:
    """(3, H, W) the processor produces, for zero placeholders of skipped files, when it can be told."""
    crop = getattr(processor, "crop_size", None)
    if getattr(processor, "do_center_crop", False) and isinstance(crop, dict) and "height" in crop:
        return (3, int(crop["height"]), int(crop["width"]))
    size = getattr(processor, "size", None)
    if isinstance(size, dict) and "height" in size:
        return (3, int(size["height"]), int(size["width"]))
    if hasattr(processor, "preprocess"):
        blank = PIL.Image.fromarray(np.zeros((64, 64, 3), np.uint8))
        return tuple(ProcessorTransform(processor)(blank).shape)
    return None


def predict(
    model: str | os.PathLike, images: Sequence[str | os.PathLike], top_k: int = 5, device: str | None = None, *,
    optimized: bool = False, reduced_decode: bool = True, on_bad_image: str = "fail", progress: bool = False,
) -> list[list[tuple[str, float]] | None]:
    """Top-k (label, probability) for each image file, best first (`predict_images` with the model's own
    processor; `optimized` runs `optimize()` first, which pays for many images, not for a few)."""
    network, processor = load_for_inference(model, device)
    return predict_images(maybe_optimized(network, optimized), images, processor, top_k=top_k, reduced_decode=reduced_decode,
                          on_bad_image=bad_image_policy(on_bad_image), progress=progress).top_k


# ---------------------------------------------------------------------------------------------------------------


def bad_image_policy(on_bad_image: str) -> str:
    """The CLI's "fail" / "skip" in the data sets' "raise" / "skip"."""
    if on_bad_image not in ("fail", "skip", "raise"):
        raise ValueError(f"on_bad_image must be 'fail' or 'skip', got {on_bad_image!r}")
    return "skip" if on_bad_image == "skip" else "raise"
