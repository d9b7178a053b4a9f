"""PEFT on BiT: LoRA on every convolution (inside the weight standardization) and on the classifier, trained, saved,
reloaded and merged exactly; the weight-standardized convolution built as nn.Conv2d is; the LoRA example."""

from __future__ import annotations

import runpy
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from bigtransfer import BitConfig, BitForImageClassification
from bigtransfer.layers import StdConv2d
from conftest import TESTER, relative_error

peft = pytest.importorskip("peft")
PIXELS = torch.randn(4, 3, 32, 32, generator=torch.Generator().manual_seed(3))
LABELS = torch.tensor([0, 1, 2, 0])


def _model(seed: int = 0) -> BitForImageClassification:
    torch.manual_seed(seed)
    return BitForImageClassification(BitConfig(**TESTER))


def _lora(model: nn.Module, **options) -> nn.Module:
    convolutions = [name for name, module in model.named_modules() if isinstance(module, StdConv2d)]
    config = peft.LoraConfig(r=4, lora_alpha=8, target_modules=[*convolutions, "classifier.1"], **options)
    return peft.get_peft_model(model, config)


def _train(model: nn.Module, steps: int = 3) -> list[float]:
    optimizer = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.1)
    losses = []
    for _ in range(steps):
        loss = model(pixel_values=PIXELS, labels=LABELS).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        losses.append(loss.item())
    return losses


def _standardized(weight: torch.Tensor, eps: float) -> torch.Tensor:
    mean = weight.mean(dim=(1, 2, 3), keepdim=True)
    variance = ((weight - mean) ** 2).mean(dim=(1, 2, 3), keepdim=True)
    return (weight - mean) / torch.sqrt(variance + eps)


@pytest.mark.parametrize("arguments", [
    dict(kernel_size=(3, 3), stride=(2, 2), padding=(1, 1), dilation=(1, 1)),
    dict(kernel_size=(3, 1), stride=(1, 2), padding=(1, 0), dilation=(2, 1)),
    dict(kernel_size=3, stride=1, padding="same", dilation=2),
    dict(kernel_size=(1, 1), stride=(1, 1)),
])
def test_std_conv2d_is_built_as_nn_conv2d_is(arguments):
    torch.manual_seed(0)
    layer = StdConv2d(6, 4, **arguments)
    reference = nn.Conv2d(6, 4, bias=False, **{"padding": 0, **arguments})
    x = torch.randn(2, 6, 9, 10)
    expected = F.conv2d(x, _standardized(layer.weight, 1e-8), None, reference.stride, reference.padding,
                        reference.dilation)
    assert (layer.kernel_size, layer.stride, layer.dilation) == (reference.kernel_size, reference.stride,
                                                                 reference.dilation)
    assert relative_error(layer(x), expected) < 1e-5
    order = ("kernel_size", "stride", "padding", "dilation")  # PEFT passes them by position, as nn.Conv2d takes them
    positional = StdConv2d(6, 4, *(arguments.get(name, default)
                                   for name, default in zip(order, (1, 1, 0, 1), strict=True)))
    assert [getattr(positional, name) for name in order] == [getattr(layer, name) for name in order]


def test_lora_updates_the_weight_inside_the_standardization():
    model = _lora(_model())
    _train(model, steps=2)
    wrapper = model.base_model.model.bit.encoder.stages[0].layers[0].conv2
    base, a, b = wrapper.base_layer, wrapper.lora_A["default"].weight, wrapper.lora_B["default"].weight
    delta = torch.einsum("or,rikl->oikl", b[:, :, 0, 0], a) * wrapper.scaling["default"]
    x = torch.randn(2, base.in_channels, 8, 8)
    expected = F.conv2d(x, _standardized(base.weight + delta, base.eps), None, base.stride, base.padding,
                        base.dilation)
    with torch.no_grad():
        assert delta.abs().max() > 0 and relative_error(wrapper(x), expected) < 1e-5


def test_lora_on_every_convolution_and_the_head_trains_saves_reloads_and_merges_exactly(tmp_path):
    model = _lora(_model())
    frozen = {name: p.clone() for name, p in model.named_parameters() if not p.requires_grad}
    trainable = [name for name, p in model.named_parameters() if p.requires_grad]
    assert len(trainable) == 2 * (sum(isinstance(m, StdConv2d) for m in _model().modules()) + 1)
    losses = _train(model, steps=4)
    assert losses[-1] < losses[0]
    assert all(torch.equal(p, frozen[name]) for name, p in model.named_parameters() if name in frozen)
    model.eval()
    with torch.no_grad():
        adapted = model(pixel_values=PIXELS).logits
    model.save_pretrained(tmp_path / "adapter")
    reloaded = peft.PeftModel.from_pretrained(_model().eval(), tmp_path / "adapter")
    with torch.no_grad():
        assert relative_error(reloaded(pixel_values=PIXELS).logits, adapted) < 1e-6
    merged = reloaded.merge_and_unload()
    assert type(merged) is BitForImageClassification and not any(
        "lora" in name for name, _ in merged.named_parameters())
    with torch.no_grad():
        assert relative_error(merged(pixel_values=PIXELS).logits, adapted) < 1e-4
    # The merged model is a plain BiT: it saves and loads in transformers with the same outputs.
    transformers = pytest.importorskip("transformers")
    merged.save_pretrained(tmp_path / "merged")
    theirs = transformers.BitForImageClassification.from_pretrained(tmp_path / "merged").eval()
    with torch.no_grad():
        assert relative_error(theirs(PIXELS).logits, adapted) < 1e-4


def test_an_adapted_model_pickles_whole(tmp_path):
    model = _lora(_model()).eval()
    torch.save(model, tmp_path / "model.pt")
    restored = torch.load(tmp_path / "model.pt", weights_only=False)
    with torch.no_grad():
        assert torch.equal(restored(pixel_values=PIXELS).logits, model(pixel_values=PIXELS).logits)


def test_disabling_and_unmerging_adapters_give_the_base_model_back():
    base = _model().eval()
    with torch.no_grad():
        expected = base(PIXELS).logits.clone()
    model = _lora(base)
    _train(model, steps=2)
    model.eval()
    with torch.no_grad(), model.disable_adapter():
        assert relative_error(model(pixel_values=PIXELS).logits, expected) < 1e-5
    model.base_model.merge_adapter()
    model.base_model.unmerge_adapter()
    with torch.no_grad(), model.disable_adapter():
        assert relative_error(model(pixel_values=PIXELS).logits, expected) < 1e-5


def test_settings_with_no_exact_form_inside_the_standardization_are_refused():
    with pytest.raises(ValueError, match="lora_dropout"):
        _lora(_model(), lora_dropout=0.1)
    with pytest.raises(ValueError, match="use_dora"):
        _lora(_model(), use_dora=True)
    with pytest.raises(ValueError, match="only PEFT's additive adapters"):
        peft.get_peft_model(_model(), peft.IA3Config(target_modules=["conv2"], feedforward_modules=[]))


@pytest.mark.parametrize("config_class", ["LoHaConfig", "LoKrConfig"])
def test_lycoris_adapters_on_every_convolution_merge_exactly(config_class, tmp_path):
    convolutions = [name for name, module in _model().named_modules() if isinstance(module, StdConv2d)]
    config = getattr(peft, config_class)(r=2, alpha=4, target_modules=convolutions, rank_dropout=0.1,
                                         module_dropout=0.1, init_weights=False)  # random updates: a real test
    model = peft.get_peft_model(_model(), config)
    assert _train(model, steps=2)[-1] < 10
    model.eval()
    with torch.no_grad():
        adapted = model(pixel_values=PIXELS).logits
        assert relative_error(adapted, _model().eval()(PIXELS).logits) > 1e-3  # the adapters change the function
        assert relative_error(model.merge_and_unload()(pixel_values=PIXELS).logits, adapted) < 1e-4


@pytest.mark.slow
def test_the_lora_example_fine_tunes_merges_and_saves_a_plain_bit(tmp_path):
    pytest.importorskip("sklearn")
    pytest.importorskip("accelerate")
    example = Path(__file__).resolve().parents[1] / "examples" / "lora_fewshot.py"
    result = runpy.run_path(str(example), run_name="example")["main"](
        model="tiny", shots=2, steps=4, image_size=32, output=tmp_path / "run")
    assert len(result["losses"]) == 4 and result["held_out"] == 1797 - 20 and 0.0 <= result["top1"] <= 1.0
    reloaded = BitForImageClassification.from_pretrained(tmp_path / "run" / "model")
    assert reloaded.config.num_labels == 10 and (tmp_path / "run" / "model" / "preprocessor_config.json").is_file()
