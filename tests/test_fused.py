"""GroupNorm + ReLU as ATen's kernels inside compiled graphs (bigtransfer.fused), and the compiled training step
(prepare_for_training(compile=True)): the same numbers as the eager modules."""

import copy

import pytest
import torch
import torch.nn.functional as F

from bigtransfer import BitConfig, BitForImageClassification
from bigtransfer.fused import OpaqueGroupNormAct, use_opaque_group_norms
from bigtransfer.layers import GroupNormAct
from bigtransfer.train import prepare_for_training


@pytest.mark.parametrize("channels_last", [False, True])
@pytest.mark.parametrize("act", ["relu", None])
def test_opaque_group_norm_matches_forward_and_gradients(channels_last, act):
    torch.manual_seed(0)
    reference = GroupNormAct(4, 16, eps=1e-5, act=act)
    with torch.no_grad():
        reference.weight.uniform_(0.5, 1.5)
        reference.bias.uniform_(-0.5, 0.5)
    opaque = use_opaque_group_norms(copy.deepcopy(reference))
    assert type(opaque) is OpaqueGroupNormAct
    x = torch.randn(3, 16, 7, 5)
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    grad = torch.randn(3, 16, 7, 5)
    outputs = []
    for module in (reference, opaque):
        leaf = x.clone().requires_grad_(True)
        output = module(leaf)
        output.backward(grad)
        outputs.append((output, leaf.grad, module.weight.grad, module.bias.grad))
        assert output.is_contiguous(memory_format=torch.channels_last) == channels_last
    for expected, actual in zip(*outputs, strict=True):
        torch.testing.assert_close(actual, expected, rtol=1e-5, atol=1e-5)
    if act == "relu":
        assert (outputs[1][0] == 0).any()  # the ReLU ran, so its mask reached the gradient


def _loss_and_gradients(model, images, labels):
    model.zero_grad(set_to_none=True)
    loss = F.cross_entropy(model(images).logits, labels)
    loss.backward()
    return loss.item(), {name: parameter.grad.clone() for name, parameter in model.named_parameters()}


@pytest.mark.slow
def test_compiled_training_step_computes_the_eager_step():
    """Each compiled step's loss and gradients equal eager's from the same weights. (Whole curves are compared
    in the README: on a model this small, a difference of 1e-5 in one gradient can flip a discrete choice a few
    steps later, and the curves part, for eager runs that differ only in rounding too.)"""
    torch.manual_seed(0)
    eager = BitForImageClassification(BitConfig.from_variant("tiny")).train()
    compiled = prepare_for_training(copy.deepcopy(eager), channels_last=True, compile=True)
    keys = set(eager.state_dict())
    generator = torch.Generator().manual_seed(1)
    optimizer = torch.optim.SGD(compiled.parameters(), lr=0.02, momentum=0.9)
    losses = []
    for _ in range(3):
        images, labels = torch.randn(8, 3, 32, 32, generator=generator), torch.randint(0, 10, (8,), generator=generator)
        with torch.no_grad():
            for name, parameter in eager.named_parameters():
                parameter.copy_(compiled.get_parameter(name))
        expected, expected_gradients = _loss_and_gradients(eager, images, labels)
        actual, gradients = _loss_and_gradients(compiled, images, labels)
        assert abs(actual - expected) < 1e-5
        for name, gradient in gradients.items():
            scale = expected_gradients[name].abs().max().item()
            assert (gradient - expected_gradients[name]).abs().max().item() <= 1e-4 * scale + 1e-9, name
        optimizer.step()
        losses.append(actual)
    assert len(set(losses)) == 3  # the weights moved between the steps compared
    assert set(compiled.state_dict()) == keys  # compiled in place: saving and loading see the same keys
    assert any(isinstance(module, OpaqueGroupNormAct) for module in compiled.modules())
