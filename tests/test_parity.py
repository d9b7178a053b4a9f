"""Numerical parity with transformers (same random weights, outputs to 1e-5 of their scale) and with timm for
the wide variants transformers cannot build; checkpoint round trips in both directions."""

from __future__ import annotations

import pytest
import torch
import transformers

from bigtransfer import BitBackbone, BitConfig, BitForImageClassification, BitModel
from conftest import TESTER, record, relative_error

TOLERANCE = 1e-5


def _measured(actual: torch.Tensor, expected: torch.Tensor) -> float:
    """`relative_error`, recorded for the end-of-run summary (the README's parity figure)."""
    return record("model parity vs transformers / timm, relative to the output's scale", relative_error(actual, expected))

CONFIGURATIONS = {
    "preactivation": dict(),
    "bottleneck": dict(layer_type="bottleneck"),
    "same-padding": dict(global_padding="SAME"),
    "bottleneck-same-dynamic": dict(layer_type="bottleneck", global_padding="SAME", embedding_dynamic_padding=True),
    "dynamic-pool-padding": dict(embedding_dynamic_padding=True),
    "groups-and-depth": dict(num_groups=2, depths=[2, 1, 3, 2], hidden_sizes=[16, 32, 64, 128], embedding_size=16),
    "gelu": dict(hidden_act="gelu"),
}
SIZES = [(32, 32), (225, 193), (61, 47)]


def pair(model_name: str, **overrides):
    """The same random weights in transformers' model and ours."""
    values = {**TESTER, **overrides}
    torch.manual_seed(0)
    theirs = getattr(transformers, model_name)(transformers.BitConfig(**values)).eval()
    ours = globals()[model_name](BitConfig(**values)).eval()
    ours.load_state_dict(theirs.state_dict(), strict=True)
    return theirs, ours


@pytest.mark.parametrize("size", SIZES, ids=lambda s: f"{s[0]}x{s[1]}")
@pytest.mark.parametrize("name", CONFIGURATIONS)
def test_classifier_and_hidden_states_match_transformers(name, size):
    theirs, ours = pair("BitForImageClassification", **CONFIGURATIONS[name])
    pixels = torch.randn(2, 3, *size, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        expected = theirs(pixels, output_hidden_states=True)
        actual = ours(pixels, output_hidden_states=True)
    assert _measured(actual.logits, expected.logits) < TOLERANCE
    assert len(actual.hidden_states) == len(expected.hidden_states)
    for got, want in zip(actual.hidden_states, expected.hidden_states, strict=True):
        assert got.shape == want.shape
        assert _measured(got, want) < TOLERANCE


@pytest.mark.parametrize("name", ["preactivation", "bottleneck", "same-padding"])
def test_base_model_outputs_match_transformers(name):
    theirs, ours = pair("BitModel", **CONFIGURATIONS[name])
    pixels = torch.randn(3, 3, 64, 64, generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        expected, actual = theirs(pixels), ours(pixels)
    assert actual.pooler_output.shape == expected.pooler_output.shape == (3, 64, 1, 1)
    assert _measured(actual.last_hidden_state, expected.last_hidden_state) < TOLERANCE
    assert _measured(actual.pooler_output, expected.pooler_output) < TOLERANCE


@pytest.mark.parametrize("out_features", [["stage2", "stage3", "stage4"], ["stem", "stage1"], None])
def test_backbone_feature_maps_match_transformers(out_features):
    theirs, ours = pair("BitBackbone", out_features=out_features)
    pixels = torch.randn(2, 3, 48, 40, generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        expected, actual = theirs(pixels).feature_maps, ours(pixels).feature_maps
    assert len(actual) == len(expected)
    for got, want in zip(actual, expected, strict=True):
        assert _measured(got, want) < TOLERANCE
    assert ours.channels == theirs.channels


def test_training_loss_and_gradients_match_transformers():
    theirs, ours = pair("BitForImageClassification")
    theirs.train(), ours.train()
    pixels = torch.randn(3, 3, 32, 32, generator=torch.Generator().manual_seed(4))
    labels = torch.tensor([0, 2, 1])
    expected, actual = theirs(pixels, labels=labels).loss, ours(pixels, labels=labels).loss
    expected.backward(), actual.backward()
    assert abs(expected.item() - actual.item()) < 1e-5
    for (name, p), q in zip(theirs.named_parameters(), ours.parameters(), strict=True):
        assert _measured(q.grad, p.grad) < 1e-4, name


@pytest.mark.parametrize("safe", [True, False])
def test_directories_load_both_ways(tmp_path, safe):
    theirs, ours = pair("BitForImageClassification", num_labels=4, id2label={0: "a", 1: "b", 2: "c", 3: "d"})
    pixels = torch.randn(2, 3, 40, 40, generator=torch.Generator().manual_seed(5))
    theirs.save_pretrained(tmp_path / "from-transformers", safe_serialization=safe)
    ours.save_pretrained(tmp_path / "from-bigtransfer", safe_serialization=safe)
    loaded_here = BitForImageClassification.from_pretrained(tmp_path / "from-transformers")
    loaded_there = transformers.BitForImageClassification.from_pretrained(tmp_path / "from-bigtransfer").eval()
    assert loaded_here.config.id2label == {0: "a", 1: "b", 2: "c", 3: "d"}
    assert loaded_there.config.id2label == {0: "a", 1: "b", 2: "c", 3: "d"}
    with torch.no_grad():
        reference = theirs(pixels).logits
        assert _measured(loaded_here(pixels).logits, reference) < TOLERANCE
        assert _measured(loaded_there(pixels).logits, reference) < TOLERANCE


def test_backbone_directory_loads_in_transformers(tmp_path):
    torch.manual_seed(0)
    ours = BitBackbone(BitConfig(**TESTER)).eval()
    ours.save_pretrained(tmp_path)
    theirs = transformers.BitBackbone.from_pretrained(tmp_path).eval()
    pixels = torch.randn(1, 3, 32, 32)
    with torch.no_grad():
        for got, want in zip(ours(pixels).feature_maps, theirs(pixels).feature_maps, strict=True):
            assert _measured(got, want) < TOLERANCE


def test_base_model_directory_from_transformers_has_no_prefix(tmp_path):
    torch.manual_seed(0)
    theirs = transformers.BitModel(transformers.BitConfig(**TESTER)).eval()
    theirs.save_pretrained(tmp_path)
    ours = BitModel.from_pretrained(tmp_path)
    classifier = BitForImageClassification.from_pretrained(tmp_path, num_labels=3)  # fresh zero head
    pixels = torch.randn(1, 3, 32, 32)
    with torch.no_grad():
        assert _measured(ours(pixels).pooler_output, theirs(pixels).pooler_output) < TOLERANCE
        assert torch.count_nonzero(classifier(pixels).logits) == 0


@pytest.mark.slow
def test_r50x1_matches_transformers_at_full_size():
    """The real google/bit-50 architecture, random weights, one 224x224 image."""
    config = BitConfig.from_variant("BiT-S-R50x1")
    torch.manual_seed(0)
    theirs = transformers.BitForImageClassification(transformers.BitConfig(**{
        key: value for key, value in config.to_dict().items() if key not in ("ws_eps", "gn_eps")
    })).eval()
    ours = BitForImageClassification(config).eval()
    ours.load_state_dict(theirs.state_dict())
    pixels = torch.randn(1, 3, 224, 224, generator=torch.Generator().manual_seed(6))
    with torch.no_grad():
        assert _measured(ours(pixels).logits, theirs(pixels).logits) < TOLERANCE


# -- timm: the wide and dilated BiTs transformers cannot run -------------------------------------------------------


def timm_pair(depths=(1, 1, 2, 1), width_factor=1, output_stride=32, num_labels=7):
    """A real timm ResNetV2 built as timm builds its `resnetv2_*_bit` models, and ours with its weights."""
    from functools import partial

    from timm.layers import StdConv2d
    from timm.models.resnetv2 import ResNetV2

    from bigtransfer.checkpoints.keymaps import to_transformers

    torch.manual_seed(0)
    theirs = ResNetV2(
        layers=list(depths), width_factor=width_factor, output_stride=output_stride, num_classes=num_labels,
        stem_type="fixed", conv_layer=partial(StdConv2d, eps=1e-8),
    ).eval()
    with torch.no_grad():  # timm zero-initialises its head; make it count
        theirs.head.fc.weight.normal_()
        theirs.head.fc.bias.normal_()
    config = BitConfig(
        depths=list(depths), width_factor=width_factor, embedding_size=64 * width_factor,
        output_stride=output_stride, num_labels=num_labels,
    )
    ours = BitForImageClassification(config).eval()
    ours.load_state_dict(to_transformers(theirs.state_dict(), "timm"), strict=True)
    return theirs, ours


@pytest.mark.slow
@pytest.mark.parametrize("width_factor", [2, 3])
def test_wide_bit_matches_timm(width_factor):
    theirs, ours = timm_pair(width_factor=width_factor)
    pixels = torch.randn(2, 3, 64, 64, generator=torch.Generator().manual_seed(7))
    with torch.no_grad():
        assert _measured(ours(pixels).logits, theirs(pixels)) < TOLERANCE
        assert _measured(ours.bit(pixels).last_hidden_state, theirs.forward_features(pixels)) < TOLERANCE


@pytest.mark.slow
@pytest.mark.parametrize("output_stride", [16, 8])
def test_dilated_bit_matches_timm(output_stride):
    theirs, ours = timm_pair(depths=(1, 2, 2, 2), output_stride=output_stride)
    pixels = torch.randn(1, 3, 64, 64, generator=torch.Generator().manual_seed(8))
    with torch.no_grad():
        expected = theirs.forward_features(pixels)
        actual = ours.bit(pixels).last_hidden_state
    assert actual.shape == expected.shape and actual.shape[-1] == 64 // output_stride
    assert _measured(actual, expected) < TOLERANCE


@pytest.mark.slow
def test_r50x3_matches_timm_resnetv2_50x3_bit():
    import timm

    from bigtransfer.checkpoints.keymaps import to_transformers

    torch.manual_seed(0)
    theirs = timm.create_model("resnetv2_50x3_bit", pretrained=False, num_classes=10).eval()
    with torch.no_grad():
        theirs.head.fc.weight.normal_(std=0.01)
    ours = BitForImageClassification(BitConfig.from_variant("BiT-M-R50x3", num_labels=10)).eval()
    ours.load_state_dict(to_transformers(theirs.state_dict(), "timm"), strict=True)
    pixels = torch.randn(1, 3, 64, 64, generator=torch.Generator().manual_seed(9))
    with torch.no_grad():
        assert _measured(ours(pixels).logits, theirs(pixels)) < TOLERANCE


@pytest.mark.slow
def test_from_pretrained_takes_a_single_timm_weights_file(tmp_path):
    from safetensors.torch import save_file

    theirs, _ = timm_pair()
    save_file(theirs.state_dict(), tmp_path / "timm.safetensors")
    ours = BitForImageClassification.from_pretrained(tmp_path / "timm.safetensors")
    base = BitModel.from_pretrained(tmp_path / "timm.safetensors")
    pixels = torch.randn(1, 3, 48, 48, generator=torch.Generator().manual_seed(10))
    with torch.no_grad():
        assert _measured(ours(pixels).logits, theirs(pixels)) < TOLERANCE
        assert _measured(base(pixels).last_hidden_state, theirs.forward_features(pixels)) < TOLERANCE
