"""GroupNorm + ReLU as one ATen kernel inside compiled inference graphs (CPU).

TorchInductor decomposes GroupNorm into reductions and pointwise code. On CPU, ATen's channels_last GroupNorm
kernel ran 2.5 to 9 times faster in inference than the kernel Inductor generates (R50x1 shapes, 2-core AVX-512
CPU). Registered as a custom operator, ATen's kernel stays opaque to the compiler; `optimize()` swaps it in.

`optimize()` swaps it in for float32 only: under bf16 autocast ATen's kernel, on bf16 activations with float32
affine parameters, ran slower than the generated one (`benchmarks/micro_batches.py --dtype bf16`, R50x1 compiled,
batch 16 whole: 64.5 against 84.5 images/s on a 2-core Xeon with AMX).

Training does not use it: inside a compiled R50x1 training step (batch 16 at 128 px, 2-core Xeon) the generated
GroupNorm forward and backward ran faster than ATen's given a backward formula, 24.3 against 19.2 images/s for
the whole step (measured once; that variant was not kept).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from .layers import GroupNormAct


@torch.library.custom_op("bigtransfer::group_norm_act", mutates_args=())
def group_norm_act(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor, num_groups: int, eps: float,
                   relu: bool) -> torch.Tensor:
    """GroupNorm of `x` (N, C, ...), then ReLU (in place) when `relu`; returned with `x`'s strides, as the fake
    function promises whatever layout the compiled graph hands it."""
    output = F.group_norm(x, num_groups, weight, bias, eps)
    if relu:
        output.relu_()
    return output if output.stride() == x.stride() else torch.empty_like(x).copy_(output)


@group_norm_act.register_fake
def _(x, weight, bias, num_groups, eps, relu):
    return torch.empty_like(x)


class OpaqueGroupNormAct(GroupNormAct):
    """GroupNormAct that TorchInductor calls as ATen's kernel instead of generating its own. Inference only (no
    autograd formula is registered); same parameters, state and results. Activations other than ReLU / none
    fall back to GroupNormAct."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        relu = type(self.activation) is nn.ReLU
        if not relu and not isinstance(self.activation, nn.Identity):
            return super().forward(x)
        return group_norm_act(x, self.weight, self.bias, self.num_groups, self.eps, relu)


def use_opaque_group_norms(model: nn.Module) -> nn.Module:
    """Swap (in place) every GroupNormAct of `model` for OpaqueGroupNormAct; returns `model`."""
    for module in model.modules():
        if type(module) is GroupNormAct:
            module.__class__ = OpaqueGroupNormAct  # same parameters and state; only forward differs
    return model
