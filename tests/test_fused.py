"""GroupNorm + ReLU as ATen's kernel inside compiled inference graphs (bigtransfer.fused), and the compiled
training step (prepare_for_training(compile=True)): the same numbers as the eager modules."""

import copy

import pytest
import torch
import torch.nn.functional as F

from bigtransfer import BitConfig, BitForImageClassification, prepare_for_training
from bigtransfer.fused import OpaqueGroupNormAct, use_opaque_group_norms
from bigtransfer.layers import GroupNormAct


@pytest.mark.parametrize("channels_last", [False, True])
@pytest.mark.parametrize("act", ["relu", None])
def test_opaque_group_norm_matches_group_norm_act_eager_and_compiled(channels_last, act):
    torch.manual_seed(0)
    reference = GroupNormAct(4, 16, eps=1e-5, act=act).eval()
    with torch.no_grad():
        reference.weight.uniform_(0.5, 1.5)
        reference.bias.uniform_(-0.5, 0.5)
    opaque = use_opaque_group_norms(copy.deepcopy(reference))
    assert type(opaque) is OpaqueGroupNormAct
    x = torch.randn(3, 16, 7, 5)
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    with torch.inference_mode():
        expected = reference(x)
        for output in (opaque(x), torch.compile(opaque, dynamic=False)(x)):
            torch.testing.assert_close(output, expected, rtol=1e-6, atol=1e-6)
            assert output.stride() == x.stride()  # the strides the fake function promised
    if act == "relu":
        assert (expected == 0).any() and (expected > 0).any()


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


@pytest.mark.slow
def test_compiled_training_step_runs_under_bf16_autocast():
    """Under autocast the convolutions run in bf16 and GroupNorm in float32: the graph compiles and computes
    eager's loss to bf16's precision, with float32 gradients for the float32 weights."""
    torch.manual_seed(0)
    eager = BitForImageClassification(BitConfig.from_variant("tiny")).train()
    compiled = prepare_for_training(copy.deepcopy(eager), channels_last=True, compile=True)
    images, labels = torch.randn(4, 3, 32, 32), torch.tensor([0, 1, 2, 3])
    with torch.autocast("cpu", dtype=torch.bfloat16):
        expected, expected_gradients = _loss_and_gradients(eager, images, labels)
        actual, gradients = _loss_and_gradients(compiled, images, labels)
    assert abs(actual - expected) < 2e-2 * abs(expected)
    assert all(gradient.dtype == torch.float32 for gradient in gradients.values())
