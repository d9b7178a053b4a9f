"""The numerics of BiT in one place: weight-standardized convolution, GroupNorm + activation, padding, drop path."""

from __future__ import annotations

import contextlib
import functools
import math
import weakref

import torch
import torch.nn.functional as F
from torch import nn

ACTIVATION_FUNCTIONS = {
    "relu": nn.ReLU,
    "gelu": nn.GELU,
    "silu": nn.SiLU,
    "swish": nn.SiLU,
    "tanh": nn.Tanh,
    "sigmoid": nn.Sigmoid,
    "leaky_relu": nn.LeakyReLU,
    "elu": nn.ELU,
    "identity": nn.Identity,
    "linear": nn.Identity,
}


def activation(name: str) -> nn.Module:
    return ACTIVATION_FUNCTIONS[name.lower()]()


def standardize_weight(weight: torch.Tensor, eps: float) -> torch.Tensor:
    """Weight Standardization: per output channel, zero mean and unit (biased) variance over (in, kh, kw).

    Written with var_mean rather than timm's and transformers' training-mode batch_norm, so exported graphs
    hold plain reductions instead of a training-mode BatchNorm that ONNX Runtime's CUDA provider rejects.
    """
    variance, mean = torch.var_mean(weight, dim=(1, 2, 3), keepdim=True, correction=0)
    return (weight - mean) * torch.rsqrt(variance + eps)


def standardize_weight_for_training(weight: torch.Tensor, eps: float) -> torch.Tensor:
    """`standardize_weight` for eager training: the same values, with a faster gradient.

    Per output channel this is exactly a training-mode batch norm over the rows of the weight, and ATen's batch
    norm kernels (forward and backward, vectorised, one pass each) are several times faster on CPU than autograd
    through var_mean / sub / rsqrt / mul (CPU var_mean alone runs at about 0.3 G elements/s). Rows are read in
    the weight's own memory order, so channels_last weights are not copied. Only eager autograd uses this:
    compiled, traced and exported graphs get the plain reductions of `standardize_weight`, so no training-mode
    BatchNorm ever reaches an exported graph.
    """
    channels_last = _is_channels_last(weight)
    rows = _rows(weight, channels_last)
    standardized = F.batch_norm(rows.unsqueeze(0), None, None, training=True, momentum=0.0, eps=eps)
    return _unrows(standardized[0], weight.shape, channels_last)


def _is_channels_last(weight: torch.Tensor) -> bool:
    return not weight.is_contiguous() and weight.is_contiguous(memory_format=torch.channels_last)


def _unrows(rows: torch.Tensor, shape: torch.Size, channels_last: bool) -> torch.Tensor:
    """Inverse of `_rows`: back to (out, in, kh, kw), channels_last strides when the rows came from them."""
    if channels_last:
        out_channels, in_channels, height, width = shape
        return rows.reshape(out_channels, height, width, in_channels).permute(0, 3, 1, 2)
    return rows.reshape(shape)


def _rows(tensor: torch.Tensor, channels_last: bool) -> torch.Tensor:
    """(out, in * kh * kw) rows of a conv weight, flattened in channels_last order when asked."""
    if channels_last:
        tensor = tensor.permute(0, 2, 3, 1)
    return tensor.reshape(tensor.shape[0], -1)


def same_padding(size: int, kernel_size: int, stride: int, dilation: int) -> int:
    """Total TensorFlow 'SAME' padding along one axis."""
    return max((math.ceil(size / stride) - 1) * stride + (kernel_size - 1) * dilation + 1 - size, 0)


class DynamicPad2d(nn.Module):
    """TensorFlow-style 'SAME' padding computed from the input size: half before, the rest after."""

    def __init__(self, kernel_size: int | tuple[int, int], stride: int | tuple[int, int],
                 dilation: int | tuple[int, int] = 1, value: float = 0.0):
        super().__init__()
        self.kernel_size, self.stride, self.dilation = _pair(kernel_size), _pair(stride), _pair(dilation)
        self.value = value

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        pad_h, pad_w = (same_padding(x.shape[axis - 2], self.kernel_size[axis], self.stride[axis], self.dilation[axis])
                        for axis in range(2))
        if pad_h or pad_w:
            x = F.pad(x, [pad_w // 2, pad_w - pad_w // 2, pad_h // 2, pad_h - pad_h // 2], value=self.value)
        return x


def padding_for(padding: str | int | tuple[int, int] | None, kernel_size: int | tuple[int, int],
                stride: int | tuple[int, int], dilation: int | tuple[int, int]) -> tuple[tuple[int, int], bool]:
    """(static padding per axis, whether dynamic 'SAME' padding is needed) for a conv.

    None is transformers' default (symmetric: the output keeps the size, divided by the stride), "SAME" its
    TensorFlow padding (static where it can be, else computed from the input), "VALID" none; an int or a pair is
    nn.Conv2d's explicit padding, and "same" / "valid" are nn.Conv2d's names.
    """
    kernel_size, stride, dilation = _pair(kernel_size), _pair(stride), _pair(dilation)
    symmetric = tuple(((s - 1) + d * (k - 1)) // 2 for k, s, d in zip(kernel_size, stride, dilation, strict=True))
    if padding is None:
        return symmetric, False
    if isinstance(padding, str):
        if padding == "SAME" or padding == "same":
            if all(s == 1 and (d * (k - 1)) % 2 == 0 for k, s, d in zip(kernel_size, stride, dilation, strict=True)):
                return symmetric, False
            if padding == "same":
                raise ValueError("padding='same' needs stride 1 and an even dilation * (kernel_size - 1), as in "
                                 "nn.Conv2d; 'SAME' pads TensorFlow's way for strided convolutions")
            return (0, 0), True
        if padding in ("VALID", "valid"):
            return (0, 0), False
        raise ValueError(f"padding must be None, 'SAME', 'VALID', 'same', 'valid', an int or a pair, got {padding!r}")
    return _pair(padding), False


def _pair(value: int | tuple[int, ...]) -> tuple[int, int]:
    """nn.Conv2d's reading of a size: one int for both axes, or a pair."""
    pair = tuple(value) if isinstance(value, (tuple, list)) else (value, value)
    if len(pair) != 2 or not all(isinstance(item, int) and not isinstance(item, bool) for item in pair):
        raise ValueError(f"expected an int or a pair of ints, got {value!r}")
    return pair


def _traced() -> bool:
    """Inside torch.compile, torch.jit tracing or scripting: plain ops only (compilers fuse them, exporters see
    reductions rather than a training-mode BatchNorm)."""
    return torch.compiler.is_compiling() or torch.jit.is_tracing() or torch.jit.is_scripting()


@functools.lru_cache(maxsize=256)
def _probe_positions(count: int) -> torch.Tensor:
    """64 positions spread evenly over a weight of `count` values (all of them for smaller weights)."""
    samples = min(count, 64)
    return torch.tensor(sorted({index * (count - 1) // max(samples - 1, 1) for index in range(samples)}))


class StdConv2d(nn.Conv2d):
    """Conv2d with Weight Standardization.

    In inference on a CPU (eval mode with no gradient needed for the weight) the standardized weight is computed
    once and reused until the weight changes: the cache is keyed on the parameter object, its version counter,
    storage, shape, device and dtype, so an optimizer step, `load_state_dict`, `.to()` or assigning a new
    parameter is never missed, and on 64 of the weight's values spread over it, compared on every call, which
    catches writes through `weight.data` (a hand-rolled EMA), which skip the version counter. A forward that
    builds a gradient, and `train()` / `eval()`, drop the cache. On GPUs, where standardizing costs microseconds
    and a comparison would stall the stream, nothing is cached. Training recomputes it every call (in eager mode
    through ATen's batch-norm kernels, see `standardize_weight_for_training`).
    """

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        kernel_size: int | tuple[int, int],
        stride: int | tuple[int, int] = 1,
        padding: str | int | tuple[int, int] | None = None,
        dilation: int | tuple[int, int] = 1,
        groups: int = 1,
        bias: bool = False,
        padding_mode: str = "zeros",
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
        *,
        eps: float = 1e-8,
    ):
        """nn.Conv2d's arguments, in its order (ints or pairs), with BiT's defaults (no bias; `padding=None`:
        transformers' symmetric padding) and `eps`, the standardization's (1e-8 as transformers and timm,
        1e-10 for the original code's checkpoints). `padding` also takes "SAME" (TensorFlow) and "VALID"."""
        static_padding, dynamic = padding_for(padding, kernel_size, stride, dilation)
        super().__init__(
            in_channels, out_channels, kernel_size, stride=stride, padding=static_padding, dilation=dilation,
            groups=groups, bias=bias, padding_mode=padding_mode, device=device, dtype=dtype,
        )
        self.pad = DynamicPad2d(kernel_size, stride, dilation) if dynamic else None
        self.eps = eps
        self._cache: tuple[weakref.ref, tuple, torch.Tensor] | None = None
        self._shared: torch.Tensor | None = None  # set by SharedStandardization for the passes of one step

    def standardized_weight(self) -> torch.Tensor:
        if self._shared is not None:
            return self._shared
        weight = self.weight
        if _traced():
            return standardize_weight(weight, self.eps)  # plain ops: compilers fuse them, exporters see reductions
        builds_graph = torch.is_grad_enabled() and weight.requires_grad
        if self.training or builds_graph or weight.device.type != "cpu":
            self._cache = None  # the weight is being trained: a cached copy would go stale and waste memory
            if builds_graph:
                return standardize_weight_for_training(weight, self.eps)
            return standardize_weight(weight, self.eps)
        key = (weight._version, weight.data_ptr(), weight.shape, weight.device, weight.dtype, self.eps)
        cache = self._cache
        with torch.no_grad(), torch.inference_mode(False):
            # A normal tensor even when first built under inference_mode: a later forward outside it may need
            # the weight saved for backward (input gradients through a frozen model), which inference tensors refuse.
            probe = weight.detach().reshape(-1)[_probe_positions(weight.numel())]
            if cache is None or cache[0]() is not weight or cache[1] != key or not torch.equal(cache[3], probe):
                cache = self._cache = (weakref.ref(weight), key, standardize_weight(weight, self.eps), probe.clone())
        return cache[2]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self._convolve(x, self.standardized_weight())

    def forward_with_weight(self, x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
        """This layer's convolution with `weight` standardized in place of its own (an adapter's updated weight,
        with gradients to it); nothing is cached."""
        if torch.is_grad_enabled() and weight.requires_grad and not _traced():
            return self._convolve(x, standardize_weight_for_training(weight, self.eps))
        return self._convolve(x, standardize_weight(weight, self.eps))

    def _convolve(self, x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
        if self.pad is not None:
            x = self.pad(x)
        return self._conv_forward(x, weight, self.bias)

    def train(self, mode: bool = True) -> StdConv2d:
        self._cache = None  # free the cached copy; eval() also rebuilds it, a safe point after `.data` writes
        return super().train(mode)

    def __getstate__(self):
        state = super().__getstate__()
        state["_cache"] = state["_shared"] = None
        return state


class SharedStandardization:
    """Weight Standardization once per optimizer step for all its micro-batches, instead of once per pass.

    Standardizing costs the same per pass whatever the batch, so with small micro-batches it is a large share of
    each (R50x1 on a 2-core Xeon, batch 32 at 128 px in micro-batches of 4: each step 1.24x faster standardized
    once, `benchmarks/shared_standardization.py`). Inside `step()` every StdConv2d of the model whose weight
    trains convolves with one detached copy of its standardized weight, a leaf that gathers the gradients of the
    passes; `last_pass()` switches them back to the standardized weight itself (its graph attached) and returns
    a term to add to the last pass's loss, whose backward carries the gathered gradients through the
    standardization once, with the last pass's own. Weight gradients therefore appear in one backward, as DDP
    expects; they equal per-pass standardization's up to rounding. For eager training (compiled steps fuse the
    standardization already).
    """

    def __init__(self, model: nn.Module):
        self.convolutions = [m for m in model.modules() if isinstance(m, StdConv2d) and m.weight.requires_grad]
        self._standardized: list[torch.Tensor] = []

    @contextlib.contextmanager
    def step(self):
        self._standardized = [standardize_weight_for_training(m.weight, m.eps) for m in self.convolutions]
        for module, standardized in zip(self.convolutions, self._standardized, strict=True):
            module._shared = standardized.detach().requires_grad_()
        try:
            yield self
        finally:
            for module in self.convolutions:
                module._shared = None
            self._standardized = []

    def gathered_bytes(self) -> int:
        """Memory the gathered gradients take during a step (one more copy of the standardized weights)."""
        return sum(m.weight.numel() * m.weight.element_size() for m in self.convolutions)

    def last_pass(self) -> torch.Tensor | float:
        """Switch to the attached standardized weights; returns the gathered-gradient term for the loss."""
        carried: torch.Tensor | float = 0.0
        for module, standardized in zip(self.convolutions, self._standardized, strict=True):
            gathered = module._shared.grad
            module._shared = standardized
            if gathered is not None:
                carried = carried + (standardized * gathered).sum()
        return carried


class GroupNormAct(nn.GroupNorm):
    """GroupNorm followed by an activation (or none); parameters named like nn.GroupNorm (weight, bias)."""

    def __init__(self, num_groups: int, num_channels: int, eps: float = 1e-5, act: str | None = "relu"):
        super().__init__(num_groups, num_channels, eps=eps, affine=True)
        self.activation = activation(act) if act else nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.group_norm(x, self.num_groups, self.weight, self.bias, self.eps)
        if type(self.activation) is nn.ReLU:
            # In place: the normalised tensor is fresh and GroupNorm's backward does not need it, so this saves
            # an allocation (first-touch page faults cost as much as the ReLU itself on CPU) and its memory.
            return torch.relu_(x)
        return self.activation(x)


class MaxPool2dSame(nn.Module):
    """3x3 stride-2 max pool of the stem; with dynamic padding it pads with zeros first, as transformers does."""

    def __init__(self, kernel_size: int = 3, stride: int = 2, dynamic_padding: bool = False):
        super().__init__()
        self.kernel_size, self.stride = kernel_size, stride
        self.pad = DynamicPad2d(kernel_size, stride) if dynamic_padding else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.pad is not None:
            x = self.pad(x)
        return F.max_pool2d(x, self.kernel_size, self.stride)


class DropPath(nn.Module):
    """Stochastic depth: drop whole residual branches per sample in training, rescaling the kept ones."""

    def __init__(self, drop_prob: float = 0.0):
        super().__init__()
        self.drop_prob = drop_prob

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.drop_prob == 0.0 or not self.training:
            return x
        keep_prob = 1.0 - self.drop_prob
        mask = x.new_empty((x.shape[0],) + (1,) * (x.ndim - 1)).bernoulli_(keep_prob)
        return x * mask.div_(keep_prob)

    def extra_repr(self) -> str:
        return f"p={self.drop_prob}"
