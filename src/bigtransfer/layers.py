"""The numerics of BiT in one place: weight-standardized convolution, GroupNorm + activation, padding, drop path."""

from __future__ import annotations

import math

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


def same_padding(size: int, kernel_size: int, stride: int, dilation: int) -> int:
    """Total TensorFlow 'SAME' padding along one axis."""
    return max((math.ceil(size / stride) - 1) * stride + (kernel_size - 1) * dilation + 1 - size, 0)


class DynamicPad2d(nn.Module):
    """TensorFlow-style 'SAME' padding computed from the input size: half before, the rest after."""

    def __init__(self, kernel_size: int, stride: int, dilation: int = 1, value: float = 0.0):
        super().__init__()
        self.kernel_size, self.stride, self.dilation, self.value = kernel_size, stride, dilation, value

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        pad_h = same_padding(x.shape[-2], self.kernel_size, self.stride, self.dilation)
        pad_w = same_padding(x.shape[-1], self.kernel_size, self.stride, self.dilation)
        if pad_h or pad_w:
            x = F.pad(x, [pad_w // 2, pad_w - pad_w // 2, pad_h // 2, pad_h - pad_h // 2], value=self.value)
        return x


def padding_for(padding: str | None, kernel_size: int, stride: int, dilation: int) -> tuple[int, bool]:
    """(static padding, whether dynamic 'SAME' padding is needed) for a conv, as transformers decides it."""
    symmetric = ((stride - 1) + dilation * (kernel_size - 1)) // 2
    if padding == "SAME":
        if stride == 1 and (dilation * (kernel_size - 1)) % 2 == 0:
            return symmetric, False
        return 0, True
    if padding == "VALID":
        return 0, False
    return symmetric, False


class StdConv2d(nn.Conv2d):
    """Conv2d with Weight Standardization.

    In inference (eval mode, or no gradient needed for the weight) the standardized weight is computed once and
    reused until the weight changes: the cache is keyed on the parameter's version counter, storage, device and
    dtype, so an optimizer step, `load_state_dict` or `.to()` is never missed. Training recomputes it every call.
    """

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        kernel_size: int,
        stride: int = 1,
        dilation: int = 1,
        groups: int = 1,
        bias: bool = False,
        padding: str | None = None,
        eps: float = 1e-8,
    ):
        static_padding, dynamic = padding_for(padding, kernel_size, stride, dilation)
        super().__init__(
            in_channels, out_channels, kernel_size, stride=stride, padding=static_padding,
            dilation=dilation, groups=groups, bias=bias,
        )
        self.pad = DynamicPad2d(kernel_size, stride, dilation) if dynamic else None
        self.eps = eps
        self._cache: tuple[tuple, torch.Tensor] | None = None

    def standardized_weight(self) -> torch.Tensor:
        weight = self.weight
        needs_graph = self.training or (torch.is_grad_enabled() and weight.requires_grad)
        if needs_graph or torch.compiler.is_compiling() or torch.jit.is_tracing() or torch.jit.is_scripting():
            return standardize_weight(weight, self.eps)
        key = (weight._version, weight.data_ptr(), weight.device, weight.dtype, self.eps)
        if self._cache is None or self._cache[0] != key:
            with torch.no_grad():
                self._cache = (key, standardize_weight(weight, self.eps))
        return self._cache[1]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.pad is not None:
            x = self.pad(x)
        return F.conv2d(x, self.standardized_weight(), self.bias, self.stride, self.padding, self.dilation, self.groups)

    def train(self, mode: bool = True) -> StdConv2d:
        self._cache = None  # free the cached copy when going back to training
        return super().train(mode)

    def __getstate__(self):
        state = super().__getstate__()
        state["_cache"] = None
        return state


class GroupNormAct(nn.GroupNorm):
    """GroupNorm followed by an activation (or none); parameters named like nn.GroupNorm (weight, bias)."""

    def __init__(self, num_groups: int, num_channels: int, eps: float = 1e-5, act: str | None = "relu"):
        super().__init__(num_groups, num_channels, eps=eps, affine=True)
        self.activation = activation(act) if act else nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.activation(F.group_norm(x, self.num_groups, self.weight, self.bias, self.eps))


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
