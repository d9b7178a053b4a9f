"""Running a trained model: `optimize()`, prediction from image files, evaluation and features of data sets, and
precision. One module for everything that runs a model, used by the CLI, the trainer's evaluation and the
Python API alike.

The default model already reuses its standardized weights in inference (see `layers.StdConv2d`). For the last
factor of speed, `optimize()` returns an inference-only model that

- folds Weight Standardization into plain convolution weights (no per-call weight work, no duplicate copy),
- runs in channels_last (oneDNN's fast layout on CPU, tensor cores' on GPU),
- compiles with TorchInductor and frozen weights (constant-folded and prepacked for oneDNN, residual adds fused
  into the convolutions; on CPU GroupNorm runs ATen's kernel, which beats the generated one), with the
  inductor flag set only while the model runs,
- runs large CPU batches in small chunks (cache-resident activations),
- optionally runs under bf16 / fp16 autocast.

`predict_images` decodes files in worker processes (JPEGs at the reduced size the processor's resize allows,
`images.decode_image`) in fixed-size batches; `evaluate` and `extract_features` run a model over a data spec,
shared between torchrun processes. `bigtransfer bench` times these paths.

Example:
    >>> model = BitForImageClassification.from_pretrained("runs/pets/model")
    >>> fast = bigtransfer.optimize(model)            # compiles on the first call for each input shape
    >>> logits = fast(pixel_values).logits            # equal to model(pixel_values).logits to ~1e-5
"""

from __future__ import annotations

import contextlib
import copy
import dataclasses
import json
import logging
import os
import time
import warnings
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, Literal

import numpy as np
import PIL.Image
import torch
import torch.nn.functional as F
from torch import nn

from .checkpoints import keymaps, loader
from .config import DTYPES
from .data import ImageSource, TransformedDataset, collate_skip_bad, describe_split, open_source, whole_split
from .distributed import Context, all_gather, distributed, gather_rows
from .files import atomic_path
from .fused import use_opaque_group_norms
from .images import decode_image
from .layers import StdConv2d, standardize_weight
from .machine import l2_cache_bytes
from .modeling import BitForImageClassification
from .processing import BIT_MEAN, BIT_STD, IMAGE_PROCESSOR_CONFIG_NAME, BitImageProcessor, ProcessorTransform
from .report import EvaluationReport, progress_bar

logger = logging.getLogger("bigtransfer")

BadImagePolicy = Literal["fail", "skip"]

# On CPU, batches run in chunks of a few 224x224 images (scaled by width and image area): their activations stay
# in cache and in malloc's reusable heap (larger blocks are mmapped and page-faulted afresh on every call).
# Measured on 2 cores, R50x1, batch 16. Zen 4 (1 MiB of L2 per core): compiled, chunks of 2 ran 8 % faster than
# the whole batch (4: 6 %); eager, chunks of 4 ran 14 % faster (1 was slower: per-operator overhead). Intel
# Xeon with 2 MiB of L2 (benchmarks/micro_batches.py): compiled, chunks of 4-8 ran 13-18 % faster than chunks
# of 2; eager, 4 was best again.
# So compiled chunks hold 2 images of 224x224 per MiB of L2 (up to 4 MiB), eager ones 4 images.
MICRO_BATCH_PIXELS = {"compiled": 2 * 224 * 224, "eager": 4 * 224 * 224}
_L2_SCALE_MAX = 4

REDUCED_PRECISION = {name: dtype for name, dtype in DTYPES.items() if dtype in (torch.bfloat16, torch.float16)}
PRECISIONS = ("auto", "fp32", "bf16", "fp16")  # what --precision takes


# ---------------------------------------------------------------------------------------------------------------
# Precision.


def autocast_for(device: torch.device, dtype: torch.dtype | None):
    """Autocast to `dtype` on `device`'s type; None runs the model's own dtype (autocast switched off)."""
    if dtype is None:
        return torch.autocast(device.type, enabled=False)
    return torch.autocast(device.type, dtype=dtype)


def precision_autocast(device: torch.device, precision: str):
    """Autocast for a `precision` setting: "auto" is bf16 (fp16 where unsupported) on GPUs and float32 on CPUs;
    "bf16" runs on CPUs too (fast with AVX512-BF16 or AMX); "fp16" needs a GPU (and its loss scaler)."""
    if precision not in PRECISIONS:
        raise ValueError(f"precision must be one of {', '.join(PRECISIONS)}, got {precision!r}")
    if precision == "auto":
        precision = "fp32" if device.type != "cuda" else "bf16" if torch.cuda.is_bf16_supported() else "fp16"
    if precision == "fp16" and device.type != "cuda":
        raise ValueError("precision fp16 needs a GPU (it trains with loss scaling there); on a CPU use bf16 or fp32")
    return autocast_for(device, REDUCED_PRECISION.get(precision))


def _autocast_dtype(dtype: str | torch.dtype | None) -> torch.dtype | None:
    if dtype is None or dtype in ("fp32", "float32", torch.float32):
        return None
    if isinstance(dtype, str):
        if dtype.lower() not in REDUCED_PRECISION:
            raise ValueError(f"dtype must be fp32, bf16 or fp16, got {dtype!r}")
        return REDUCED_PRECISION[dtype.lower()]
    if dtype not in (torch.bfloat16, torch.float16):
        raise ValueError(f"dtype must be torch.float32, torch.bfloat16 or torch.float16, got {dtype}")
    return dtype


# ---------------------------------------------------------------------------------------------------------------
# Folding Weight Standardization.


class FoldedConv2d(nn.Conv2d):
    """A StdConv2d turned into a plain convolution whose weight is already standardized (inference only)."""

    pad: nn.Module | None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.pad is not None:
            x = self.pad(x)
        return super().forward(x)


def fold_weight_standardization(model: nn.Module) -> nn.Module:
    """Replace every `StdConv2d` of `model` (in place) by a `FoldedConv2d` holding the standardized weight.

    The result computes the same function with plain convolutions: nothing is recomputed per call, there is no
    cached second copy of the weights, and exporters see a plain Conv. It is for inference: training it would
    no longer standardize. Parameter names are unchanged, but the values are the standardized weights (Weight
    Standardization is idempotent up to eps, so loading them back into a BiT model gives the same outputs).

    Returns:
        `model`, for chaining.
    """
    for parent in list(model.modules()):
        for name, child in list(parent.named_children()):
            if isinstance(child, StdConv2d):
                setattr(parent, name, _folded(child))
    return model


def _folded(conv: StdConv2d) -> FoldedConv2d:
    folded = FoldedConv2d(
        conv.in_channels, conv.out_channels, conv.kernel_size, stride=conv.stride, padding=conv.padding,
        dilation=conv.dilation, groups=conv.groups, bias=conv.bias is not None, device="meta",
    )
    with torch.no_grad():
        weight = standardize_weight(conv.weight.detach(), conv.eps)
    folded.weight = nn.Parameter(weight, requires_grad=False)
    folded.bias = None if conv.bias is None else nn.Parameter(conv.bias.detach(), requires_grad=False)
    folded.pad = conv.pad
    return folded


# ---------------------------------------------------------------------------------------------------------------
# optimize()


class OptimizedModel(nn.Module):
    """An inference-only BiT model returned by `optimize()`; call it like the original model.

    Inputs are moved to the model's device and layout; every call runs under `torch.inference_mode()` (and
    autocast when a reduced precision was asked for, with floating outputs returned in float32). `config`,
    `device` and `model` (the folded module that runs) are exposed.
    """

    def __init__(
        self, model: nn.Module, device: torch.device, memory_format: torch.memory_format,
        autocast_dtype: torch.dtype | None, compiled: Callable[..., Any] | None, strict_compile: bool,
        micro_batch: int | str | None = None,
    ):
        super().__init__()
        self.model = model
        self.config = getattr(model, "config", None)
        self.device = device
        self.memory_format = memory_format
        self.autocast_dtype = autocast_dtype
        self.micro_batch = micro_batch
        # Kept out of the module tree: the compiled wrapper shares `model`'s parameters (no duplicate state_dict).
        object.__setattr__(self, "_compiled", compiled)
        self._strict_compile = strict_compile
        self._compiled_inputs: set[tuple] = set()
        self.compile_seconds = 0.0  # spent compiling so far (each new input shape compiles once)
        self._l2_scale = min(_L2_SCALE_MAX, max(1, (l2_cache_bytes() or 0) // 2**20))  # MiB of L2 per core

    @property
    def is_compiled(self) -> bool:
        return self._compiled is not None

    def forward(self, pixel_values: torch.Tensor, *args: Any, **kwargs: Any) -> Any:
        if isinstance(pixel_values, torch.Tensor):
            pixel_values = pixel_values.to(self.device, non_blocking=True)
            if pixel_values.ndim == 4:
                pixel_values = pixel_values.contiguous(memory_format=self.memory_format)
        chunk = self.micro_batch_size(pixel_values)
        with torch.inference_mode(), autocast_for(self.device, self.autocast_dtype):
            if chunk and not args and "labels" not in kwargs and pixel_values.shape[0] > chunk:
                output = _concatenate([self._run(part, **kwargs) for part in pixel_values.split(chunk)])
            else:
                output = self._run(pixel_values, *args, **kwargs)
        return _float_outputs(output) if self.autocast_dtype is not None else output

    def micro_batch_size(self, pixel_values: Any) -> int | None:
        """Images per forward pass for this input (None: the whole batch at once)."""
        if self.micro_batch != "auto":
            return self.micro_batch
        if self.device.type != "cpu" or not isinstance(pixel_values, torch.Tensor) or pixel_values.ndim != 4:
            return None
        width = getattr(self.config, "width_factor", 1) or 1
        budget = MICRO_BATCH_PIXELS["compiled" if self._compiled is not None else "eager"]
        if self._compiled is not None:
            budget *= self._l2_scale
        return max(1, budget // (pixel_values.shape[2] * pixel_values.shape[3] * width))

    def _run(self, *args: Any, **kwargs: Any) -> Any:
        return self.model(*args, **kwargs) if self._compiled is None else self._call_compiled(*args, **kwargs)

    def _call_compiled(self, *args: Any, **kwargs: Any) -> Any:
        import torch._inductor.config as inductor_config

        try:
            # Freezing turns the weights into constants: prepacked for oneDNN, constant-folded. The flag is read
            # when a graph compiles, which happens inside a call, so it is set for the call and restored after.
            with inductor_config.patch(freezing=True):
                key = tuple((tuple(value.shape), value.dtype) for value in args if isinstance(value, torch.Tensor))
                if key in self._compiled_inputs:
                    return self._compiled(*args, **kwargs)
                logger.info("optimize(): compiling for input %s (once per shape; tens of seconds on a small CPU)",
                            "x".join(map(str, key[0][0])) if key else "")
                started = time.perf_counter()
                output = self._compiled(*args, **kwargs)
                self.compile_seconds += time.perf_counter() - started
                self._compiled_inputs.add(key)
                logger.info("optimize(): compiled in %.1f s", time.perf_counter() - started)
                return output
        except (ValueError, TypeError):
            raise
        except Exception as error:  # a missing C++ compiler / Triton shows up only here, on the first call
            if self._strict_compile:
                raise
            warnings.warn(f"torch.compile failed ({type(error).__name__}: {error}); running eager", stacklevel=3)
            object.__setattr__(self, "_compiled", None)
            return self.model(*args, **kwargs)


def optimize(
    model: nn.Module,
    *,
    device: str | torch.device | None = None,
    dtype: str | torch.dtype | None = None,
    channels_last: bool = True,
    compile: bool | str = "auto",
    micro_batch: int | str | None = "auto",
    inplace: bool = False,
) -> OptimizedModel:
    """The fastest inference path for a BiT model: folded Weight Standardization, channels_last, compiled.

    Args:
        model: a BitModel / BitForImageClassification / BitBackbone (or any module using `StdConv2d`).
        device: where to run (default: where the model is).
        dtype: None to run in the model's own dtype (float32 unless loaded otherwise), or "bf16" / "fp16" (a
            torch dtype works too) to run under autocast, with GroupNorm and the reductions kept in float32 by
            autocast; outputs are then returned as float32. Expect logits within 5e-2 of float32 for bf16 and
            5e-3 for fp16 (relative to the largest logit). bf16 pays on GPUs and on CPUs with AVX512-BF16 or
            AMX (1.6-2.4x float32 on a Zen 4; elsewhere it is slower).
        channels_last: keep activations in NHWC (the fast layout of oneDNN and of tensor cores).
        compile: True, False or "auto" (compile when TorchInductor can: a C++ compiler on CPU, Triton on GPU;
            if compiling fails on the first call "auto" warns and runs eager, True raises). Each new input shape
            compiles once, taking tens of seconds on a small CPU: use a fixed batch size (`predict_images` pads
            the last batch) for the compiled graph to be reused (after 8 shapes torch.compile runs eager).
        micro_batch: run large batches as chunks of this many images, outputs concatenated ("auto": on CPU,
            when compiled 2 images of 224x224 per MiB of the core's L2 cache, up to 8, and 4 when eager, fewer
            for larger images or wider models; None: never). Results are the same; activation memory is
            smaller. A compiled model compiles once per chunk shape.
        inplace: modify `model` itself instead of a copy (saves the memory of a second set of weights).

    Returns:
        An `OptimizedModel`: call it like `model`; it runs under `torch.inference_mode()`.

    Fp32 outputs equal the eager model's to about 1e-5 relative (oneDNN sums in a different order).

    Example:
        >>> fast = optimize(BitForImageClassification(BitConfig.from_variant("tiny")), compile=False)
        >>> fast(torch.randn(2, 3, 64, 64)).logits.shape
        torch.Size([2, 10])
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    if isinstance(model, OptimizedModel):
        raise TypeError("model is already optimized; pass the original model")
    device = torch.device(device) if device is not None else _module_device(model)
    autocast_dtype = _autocast_dtype(dtype)
    if compile not in (True, False, "auto"):
        raise ValueError(f"compile must be True, False or 'auto', got {compile!r}")
    if not inplace:
        model = copy.deepcopy(model)
    model = fold_weight_standardization(model.eval().requires_grad_(False))
    memory_format = torch.channels_last if channels_last else torch.contiguous_format
    model = model.to(device=device, memory_format=memory_format)
    compiled = None
    if compile is True or (compile == "auto" and _can_compile(device)):
        if device.type == "cpu":
            use_opaque_group_norms(model)
        # dynamic=False: a graph per input shape, so oneDNN gets fixed shapes to prepack the weights for.
        compiled = torch.compile(model, dynamic=False)
    if micro_batch not in (None, "auto") and (not isinstance(micro_batch, int) or micro_batch < 1):
        raise ValueError(f"micro_batch must be a positive int, 'auto' or None, got {micro_batch!r}")
    return OptimizedModel(
        model, device, memory_format, autocast_dtype, compiled, strict_compile=compile is True, micro_batch=micro_batch
    )


def _module_device(model: nn.Module) -> torch.device:
    for tensor in model.parameters():
        return tensor.device
    return torch.device("cpu")


def _can_compile(device: torch.device) -> bool:
    if device.type == "cuda":
        try:
            import triton  # noqa: F401
        except ImportError:
            return False
        return True
    if device.type != "cpu":
        return False
    from torch._inductor import cpp_builder

    try:
        return bool(cpp_builder.get_cpp_compiler())
    except Exception:
        return False


def _concatenate(outputs: list[Any]) -> Any:
    """Per-chunk outputs (dataclasses, tuples, tensors) joined along the batch dimension."""
    first = outputs[0]
    if isinstance(first, torch.Tensor):
        return torch.cat(outputs)
    if first is None:
        return None
    if isinstance(first, tuple):
        return type(first)(_concatenate([output[index] for output in outputs]) for index in range(len(first)))
    if dataclasses.is_dataclass(first):
        return dataclasses.replace(first, **{
            field.name: _concatenate([getattr(output, field.name) for output in outputs])
            for field in dataclasses.fields(first)
        })
    return first


def _float_outputs(output: Any) -> Any:
    """Reduced-precision floating tensors in an output (dataclass, tuple, tensor) cast to float32."""
    if isinstance(output, torch.Tensor):
        return output.float() if output.is_floating_point() else output
    if isinstance(output, tuple):
        return type(output)(_float_outputs(value) for value in output)
    if dataclasses.is_dataclass(output):
        return dataclasses.replace(
            output, **{field.name: _float_outputs(getattr(output, field.name)) for field in dataclasses.fields(output)}
        )
    return output




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
        processor = squash_processor(128, BIT_MEAN, BIT_STD)
    else:
        processor = BitImageProcessor.from_dict(checkpoint.preprocessor_dict())
    return network.to(_device(device)).eval(), processor


def squash_processor(crop: int, mean: Sequence[float], std: Sequence[float]) -> BitImageProcessor:
    """The BitImageProcessor of BiT's evaluation transform: squash to crop x crop (bilinear), normalise."""
    return BitImageProcessor(
        size={"height": crop, "width": crop}, crop_size={"height": crop, "width": crop}, resample=2,
        image_mean=list(mean), image_std=list(std),
    )


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
    model: nn.Module,
    paths: Sequence[str | os.PathLike],
    processor: Any,
    *,
    batch_size: int = 16,
    num_workers: int | None = None,
    top_k: int = 5,
    reduced_decode: bool = True,
    on_bad_image: str = "raise",
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
    transform = _processor_transform(processor)
    min_size = processor_min_size(processor) if reduced_decode else None
    shape = _output_shape(processor)
    dataset = ImageFiles(paths, transform, min_size, on_bad_image, shape)
    device = torch.device(getattr(model, "device", None) or _module_device(model))
    if num_workers is None:
        # Workers only on spare cores: a decoder sharing a core with the model's threads stalls them all (on a
        # 2-core CPU one worker made the pipeline 15 % slower than decoding in between batches).
        busy = torch.get_num_threads() if device.type == "cpu" else 1
        num_workers = max(0, min(4, (os.cpu_count() or 1) - busy))
    loader = torch.utils.data.DataLoader(
        dataset, batch_size=batch_size, num_workers=num_workers, shuffle=False,
        persistent_workers=False, prefetch_factor=2 if num_workers else None,
    )
    config = getattr(model, "config", None)
    id2label = getattr(config, "id2label", None) or {}
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
        probabilities = logits.softmax(-1)
        scores, indices = probabilities.topk(min(top_k, probabilities.shape[-1]), dim=-1)
        for row, good in enumerate(ok.tolist()):
            if not good:
                results.append(None)
                continue
            results.append(
                [(id2label.get(int(i), str(int(i))), float(s)) for s, i in zip(scores[row], indices[row], strict=True)]
            )
        if bar is not None:
            bar.update(count)
    if bar is not None:
        bar.close()
    compiling = getattr(model, "compile_seconds", 0.0) - compiled_before
    return Predictions(results, len(results), time.perf_counter() - start - compiling, compiling)


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
    optimized: bool = False, reduced_decode: bool = True, on_bad_image: BadImagePolicy = "fail", progress: bool = False,
) -> list[list[tuple[str, float]] | None]:
    """Top-k (label, probability) for each image file, best first (`predict_images` with the model's own
    processor; `optimized` runs `optimize()` first, which pays for many images, not for a few)."""
    network, processor = load_for_inference(model, device)
    return predict_images(maybe_optimized(network, optimized), images, processor, top_k=top_k, reduced_decode=reduced_decode,
                          on_bad_image=bad_image_policy(on_bad_image), progress=progress).top_k


# ---------------------------------------------------------------------------------------------------------------
# Data sets -> evaluation reports and features.


def evaluate(
    model: str | os.PathLike,
    data: str | ImageSource,
    *,
    split: str | None = None,
    val_fraction: float = 0.2,
    classes: Sequence[int | str] | None = None,
    batch_size: int = 128,
    device: str | None = None,
    on_bad_image: BadImagePolicy = "fail",
    progress: bool = False,
    optimized: bool = False,
    reduced_decode: bool = True,
) -> EvaluationReport:
    """Top-1, top-5, loss, per-class accuracy and confusion matrix of a classifier on a data set.

    `model` is any source `from_pretrained` takes; images are preprocessed as its preprocessor_config.json says
    (JPEGs decoded at the reduced size its resize allows unless `reduced_decode=False`). Under torchrun the images
    are shared between the processes. Data labels are matched to the model's labels by class name when every data
    class is one of them, else by index.

    `split` None evaluates the whole data set: every image of a folder or CSV file (or digits), the published
    test split of Fashion-MNIST and CIFAR. "test" / "train" on a folder or CSV file take the held-out
    `val_fraction` of each class (split seed 0, as `finetune` holds it out without `eval_data`) or the rest.
    The report's `data` says which images were used.

    Example: ``evaluate("runs/ft/model", "fashion-mnist", classes=[5, 6, 7, 8, 9]).top1``.
    """
    with distributed(device) as context:
        network, processor = load_for_inference(model, context.device)
        split = split or whole_split(data, "test")
        source = open_source(data, split, val_fraction=val_fraction, classes=classes)
        classes_out = [network.config.id2label[index] for index in range(network.config.num_labels)]
        dataset = processed_dataset(source, processor, on_bad_image, reduced_decode)
        report = evaluate_dataset(maybe_optimized(network, optimized), dataset, batch_size, context,
                                  label_map=label_map(source.classes, classes_out), class_names=classes_out,
                                  progress=progress)
        report.data = dict(data=str(data), split=describe_split(data, split, val_fraction), images=len(source))
        return report


def extract_features(
    model: str | os.PathLike,
    data: str | ImageSource,
    *,
    split: str | None = None,
    val_fraction: float = 0.2,
    classes: Sequence[int | str] | None = None,
    batch_size: int = 128,
    device: str | None = None,
    on_bad_image: BadImagePolicy = "fail",
    progress: bool = False,
    optimized: bool = False,
    reduced_decode: bool = True,
    return_paths: bool = False,
) -> tuple[np.ndarray, np.ndarray] | tuple[np.ndarray, np.ndarray, list[str], list[str]]:
    """Pre-logits features (the pooled, normalised backbone output, (N, C) float32) and int labels (N,); with
    `return_paths`, also the image path of every row and the class name of every label.

    Unreadable images are dropped with `on_bad_image="skip"`, so N can be below the data set's size. `split`
    None takes the whole data set (every image of a folder or CSV file, the published train split of
    Fashion-MNIST and CIFAR); see `evaluate` for the others.
    """
    with distributed(device) as context:
        network, processor = load_for_inference(model, context.device)
        backbone = maybe_optimized(network.bit, optimized)
        source = open_source(data, split or whole_split(data, "train"), val_fraction=val_fraction, classes=classes)
        dataset = processed_dataset(source, processor, on_bad_image, reduced_decode)
        features, labels, skipped = dataset_features(backbone, dataset, batch_size, context, progress, gather=False)
        if not return_paths:
            return gather_rows(context, features, labels)
        mine, unread = [source.path(i) for i in range(context.rank, len(source), context.world_size)], set(skipped)
        paths = np.array([path for path in mine if path not in unread], dtype=object)
        features, labels, paths = gather_rows(context, features, labels, paths)
        return features, labels, [str(path) for path in paths], [str(name) for name in source.classes]


def dataset_features(
    backbone: nn.Module, dataset: TransformedDataset, batch_size: int, context: Context, progress: bool = False,
    gather: bool = True, description: str = "features",
) -> tuple[np.ndarray, np.ndarray, list[str]]:
    """Pre-logits features (N, C) float32, labels (N,) and the skipped images' paths of a (preprocessed) data set,
    run through a `BitModel` in eval mode; with `gather`, every rank's rows back in the data set's order (what
    `extract_features`, the few-shot evaluator and the trainer's few-shot evaluation use)."""
    was_training = backbone.training
    backbone.eval()
    features, labels, skipped = [], [], []
    try:
        for images, batch_labels, bad in inference_batches(dataset, batch_size, context, progress, description):
            skipped.extend(sample.path for sample in bad)
            with torch.no_grad(), precision_autocast(context.device, "auto"):
                pooled = backbone(images.to(context.device)).pooler_output
            features.append(pooled.flatten(1).float().cpu().numpy())
            labels.append(batch_labels.numpy())
    finally:
        backbone.train(was_training)
    features_array = (np.concatenate(features) if features
                      else np.zeros((0, backbone.config.num_features), np.float32))
    labels_array = np.concatenate(labels) if labels else np.zeros(0, np.int64)
    if not gather:
        return features_array, labels_array, skipped
    features_array, labels_array = gather_rows(context, features_array, labels_array)
    if context.world_size > 1:
        skipped = [path for part in all_gather(context, skipped) for path in part]
    return features_array, labels_array, skipped


def processed_dataset(source: ImageSource, processor: BitImageProcessor, on_bad_image: str, reduced_decode: bool):
    """`source` preprocessed as `processor` says (JPEGs decoded at reduced size unless not `reduced_decode`)."""
    return TransformedDataset(source, ProcessorTransform(processor), on_bad_image=bad_image_policy(on_bad_image),
                              min_size=processor_min_size(processor) if reduced_decode else None)


def bad_image_policy(on_bad_image: str) -> str:
    """The CLI's "fail" / "skip" in the data sets' "raise" / "skip"."""
    if on_bad_image not in ("fail", "skip", "raise"):
        raise ValueError(f"on_bad_image must be 'fail' or 'skip', got {on_bad_image!r}")
    return "skip" if on_bad_image == "skip" else "raise"


def evaluate_dataset(
    model: nn.Module, dataset: TransformedDataset, batch_size: int, context: Context, *, precision: str = "auto",
    label_map: np.ndarray | None = None, class_names: Sequence[str] | None = None, progress: bool = False,
) -> EvaluationReport:
    """The EvaluationReport of a classifier over a whole (preprocessed) data set, gathered from all ranks;
    `label_map` turns data labels into the model's. The trainer's evaluation and `evaluate` both run this."""
    was_training = model.training
    model.eval()
    topk, labels, losses, skipped = [], [], [], []
    num_labels = model.config.num_labels
    k = min(5, num_labels)
    autocast = precision_autocast(context.device, precision)
    with torch.no_grad():
        for images, batch_labels, bad in inference_batches(dataset, batch_size, context, progress):
            skipped.extend(sample.path for sample in bad)
            if len(batch_labels) == 0:
                continue
            if label_map is not None:
                batch_labels = torch.from_numpy(label_map[batch_labels.numpy()])
            if int(batch_labels.max()) >= num_labels:
                raise ValueError(f"the data has labels up to {int(batch_labels.max())} but the model has {num_labels} classes")
            with autocast:
                logits = model(images.to(context.device)).logits
            logits = logits.float()
            topk.append(logits.topk(k, dim=-1).indices.cpu().numpy())
            losses.append(F.cross_entropy(logits, batch_labels.to(context.device), reduction="none").cpu().numpy())
            labels.append(batch_labels.numpy())
    model.train(was_training)
    topk_array = np.concatenate(topk) if topk else np.zeros((0, k), np.int64)
    labels_array = np.concatenate(labels) if labels else np.zeros(0, np.int64)
    losses_array = np.concatenate(losses) if losses else np.zeros(0, np.float32)
    if context.world_size > 1:
        gathered = all_gather(context, (topk_array, labels_array, losses_array, skipped))
        topk_array = np.concatenate([part[0] for part in gathered])
        labels_array = np.concatenate([part[1] for part in gathered])
        losses_array = np.concatenate([part[2] for part in gathered])
        skipped = [path for part in gathered for path in part[3]]
    names = list(class_names) if class_names is not None else list(dataset.classes)
    if len(labels_array) == 0:
        raise ValueError(f"nothing to evaluate: the evaluation data has no readable image ({len(skipped)} skipped, "
                         f"of {len(dataset)})")
    if not np.isfinite(losses_array).all():
        bad = int((~np.isfinite(losses_array)).sum())
        raise ValueError(f"the model's outputs are NaN or infinite on {bad} of {len(losses_array)} evaluation images "
                         "(non-finite weights or inputs?); no report was made")
    return EvaluationReport.from_predictions(topk_array, labels_array, losses_array, names, skipped)


def inference_batches(dataset: TransformedDataset, batch_size: int, context: Context, progress: bool,
                      description: str = "evaluate"):
    """This rank's share (every world_size-th image) of a data set, in batches of (images, labels, skipped)."""
    positions = list(range(context.rank, len(dataset), context.world_size))
    batches = [positions[index : index + batch_size] for index in range(0, len(positions), batch_size)]
    loader_ = torch.utils.data.DataLoader(dataset, batch_sampler=batches, collate_fn=collate_skip_bad)
    bar = progress_bar(progress and context.is_main, len(positions), 0, description, unit="img", leave=False)
    for batch in loader_:
        yield batch
        if bar is not None:
            bar.update(len(batch[1]) + len(batch[2]))  # labels of the good images, and the skipped ones
    if bar is not None:
        bar.close()


def label_map(data_classes: Sequence[str], model_classes: Sequence[str]) -> np.ndarray | None:
    """Data label -> model label by class name when every data class is a model class; else None (by index)."""
    if list(data_classes) == list(model_classes):
        return None
    position = {name: index for index, name in enumerate(model_classes)}
    if all(name in position for name in data_classes):
        return np.array([position[name] for name in data_classes], dtype=np.int64)
    if len(data_classes) > len(model_classes):
        raise ValueError(f"the data has {len(data_classes)} classes but the model only {len(model_classes)}")
    if any(name != f"LABEL_{index}" for index, name in enumerate(model_classes)):
        unknown = [name for name in data_classes if name not in position]
        pairs = ", ".join(f"{data} -> {model}" for data, model in zip(data_classes[:5], model_classes[:5], strict=False))
        logger.warning(
            "data classes %s are not among the model's class names: matching classes by index (%s, ...)",
            unknown[:5], pairs,
        )
    return None


def write_features(path: str | os.PathLike, features: np.ndarray, labels: np.ndarray,
                   paths: Sequence[str] | None = None, classes: Sequence[str] | None = None) -> list[Path]:
    """Save features to `path` (.npy), labels beside it (`<stem>.labels.npy`) and, given `paths` / `classes`,
    `<stem>.index.json` ({"classes": [...], "paths": [...]}: row i is the image paths[i], label j the class
    classes[j]). All are written before any replaces an old one."""
    path = Path(path)
    if path.suffix != ".npy":
        path = path.with_name(path.name + ".npy")
    path.parent.mkdir(parents=True, exist_ok=True)
    stem = path.name[: -len(".npy")]
    labels_path, index_path = path.with_name(stem + ".labels.npy"), path.with_name(stem + ".index.json")
    written = [path, labels_path] + ([index_path] if paths is not None or classes is not None else [])
    with contextlib.ExitStack() as renames:
        for target, array in ((path, features), (labels_path, labels)):
            with open(renames.enter_context(atomic_path(target)), "wb") as handle:
                np.save(handle, array)
        if len(written) == 3:
            index = {"classes": list(classes or []), "paths": list(paths or [])}
            renames.enter_context(atomic_path(index_path)).write_text(json.dumps(index) + "\n", encoding="utf-8")
    return written
