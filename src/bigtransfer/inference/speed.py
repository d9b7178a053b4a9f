"""Speed: `optimize()` (the fastest inference form of a BiT model) and `prepare_for_training()` (the fastest
training form).

The default model already reuses its standardized weights in inference (see `layers.StdConv2d`). For the last
factor of speed, `optimize()` returns an inference-only model that

- folds Weight Standardization into plain convolution weights (no per-call weight work, no duplicate copy),
- runs in channels_last (oneDNN's fast layout on CPU, tensor cores' on GPU),
- compiles with TorchInductor and frozen weights (constant-folded and prepacked for oneDNN, residual adds fused
  into the convolutions; on CPU in float32 GroupNorm runs ATen's kernel, which beats the generated one), with
  the inductor flag set only while the model runs,
- runs large float32 CPU batches in small chunks (cache-resident activations),
- optionally runs under bf16 / fp16 autocast.

Example:
    >>> model = BitForImageClassification.from_pretrained("runs/pets/model")
    >>> fast = bigtransfer.optimize(model)            # compiles on the first call for each input shape
    >>> logits = fast(pixel_values).logits            # equal to model(pixel_values).logits to ~1e-5
"""

from __future__ import annotations

import copy
import dataclasses
import logging
import time
import warnings
from collections.abc import Callable
from typing import Any

import torch
from torch import nn

from ..fused import use_opaque_group_norms
from ..layers import StdConv2d, standardize_weight
from ..machine import l2_cache_bytes
from ..precision import autocast_dtype, autocast_for

logger = logging.getLogger("bigtransfer")

# On CPU, batches run in chunks of a few 224x224 images (scaled by width and image area): their activations stay
# in cache and in malloc's reusable heap (larger blocks are mmapped and page-faulted afresh on every call).
# Measured on 2 cores, R50x1, batch 16. Zen 4 (1 MiB of L2 per core): compiled, chunks of 2 ran 8 % faster than
# the whole batch (4: 6 %); eager, chunks of 4 ran 14 % faster (1 was slower: per-operator overhead). Intel
# Xeon with 2 MiB of L2 (benchmarks/micro_batches.py): compiled, chunks of 4-8 ran 13-18 % faster than chunks
# of 2; eager, 4 was best again.
# So compiled chunks hold 2 images of 224x224 per MiB of L2 (up to 4 MiB), eager ones 4 images.
# Under bf16 autocast chunks stop paying (Xeon, compiled, benchmarks/micro_batches.py --dtype bf16: chunks of 4,
# 8 and the whole 16 ran 81.4, 89.8 and 84.5 images/s, 8 and 16 within noise of each other, the other way round
# in a timing in separate processes): reduced-precision batches are not chunked.
MICRO_BATCH_PIXELS = {"compiled": 2 * 224 * 224, "eager": 4 * 224 * 224}
_L2_SCALE_MAX = 4


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
        if (self.device.type != "cpu" or self.autocast_dtype is not None  # reduced precision: the whole batch
                or not isinstance(pixel_values, torch.Tensor) or pixel_values.ndim != 4):
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
            AMX (1.6-2.4x float32 on a Zen 4, 2.4x / 2.8x at batch 1 / 16 on a Xeon with AMX; elsewhere it is
            slower).
        channels_last: keep activations in NHWC (the fast layout of oneDNN and of tensor cores).
        compile: True, False or "auto" (compile when TorchInductor can: a C++ compiler on CPU, Triton on GPU;
            if compiling fails on the first call "auto" warns and runs eager, True raises). Each new input shape
            compiles once, taking tens of seconds on a small CPU: use a fixed batch size (`predict_images` pads
            the last batch) for the compiled graph to be reused (after 8 shapes torch.compile runs eager).
        micro_batch: run large batches as chunks of this many images, outputs concatenated ("auto": on CPU
            in float32, when compiled 2 images of 224x224 per MiB of the core's L2 cache, up to 8, and 4 when
            eager, fewer for larger images or wider models; None: never). Results are the same; activation
            memory is smaller. A compiled model compiles once per chunk shape.
        inplace: modify `model` itself instead of a copy (saves the memory of a second set of weights).

    Returns:
        An `OptimizedModel`: call it like `model`; it runs under `torch.inference_mode()`.

    Fp32 outputs equal the eager model's to about 1e-5 relative (oneDNN sums in a different order).

    Example:
        >>> fast = optimize(BitForImageClassification(BitConfig.from_variant("tiny")), compile=False)
        >>> fast(torch.randn(2, 3, 64, 64)).logits.shape
        torch.Size([2, 10])
    """
    _check_arguments(model, compile, micro_batch)
    device = torch.device(device) if device is not None else module_device(model)
    reduced = autocast_dtype(dtype)
    if not inplace:
        model = copy.deepcopy(model)
    model = fold_weight_standardization(model.eval().requires_grad_(False))
    memory_format = torch.channels_last if channels_last else torch.contiguous_format
    model = model.to(device=device, memory_format=memory_format)
    compiled = None
    if compile is True or (compile == "auto" and _can_compile(device)):
        if device.type == "cpu" and reduced is None:
            use_opaque_group_norms(model)  # float32 only: under bf16 autocast the generated GroupNorm is faster
        # dynamic=False: a graph per input shape, so oneDNN gets fixed shapes to prepack the weights for.
        compiled = torch.compile(model, dynamic=False)
    return OptimizedModel(
        model, device, memory_format, reduced, compiled, strict_compile=compile is True, micro_batch=micro_batch
    )


def _check_arguments(model: nn.Module, compile: bool | str, micro_batch: int | str | None) -> None:
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    if isinstance(model, OptimizedModel):
        raise TypeError("model is already optimized; pass the original model")
    if compile not in (True, False, "auto"):
        raise ValueError(f"compile must be True, False or 'auto', got {compile!r}")
    if micro_batch not in (None, "auto") and (not isinstance(micro_batch, int) or micro_batch < 1):
        raise ValueError(f"micro_batch must be a positive int, 'auto' or None, got {micro_batch!r}")


def module_device(model: nn.Module) -> torch.device:
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


def prepare_for_training(model: nn.Module, channels_last: bool = True, compile: bool = False) -> nn.Module:
    """Put `model` (in place) in the form that trains fastest: channels_last weights, so every convolution and
    GroupNorm runs NHWC whatever the input layout, and with `compile` its forward and backward compiled by
    TorchInductor (`nn.Module.compile`: the module itself, so its parameters, state_dict and saving are
    unchanged). Parameters keep their identity (create the optimizer before or after) and values; losses and
    gradients equal the default form's up to rounding. A compiled model compiles on its first step (about a
    minute for R50x1 on two CPU cores), again for a new batch shape, and for evaluation; whether it pays depends
    on the machine (`bigtransfer bench` times both).

    Returns:
        `model`, for chaining.
    """
    if channels_last:
        model.to(memory_format=torch.channels_last)
    if compile:
        model.compile()
    return model
