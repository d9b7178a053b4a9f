"""transformers' own BiT tests, re-expressed: every check runs on transformers' classes and on these, so an
expectation is transformers' behaviour, generated at test time, and a divergence fails.

Covered, in transformers' names: BitModelTest (test_config, test_model, test_backbone, test_initialization,
test_hidden_states_output, test_for_image_classification), BitBackboneTest / BackboneTesterMixin (test_config,
test_forward_signature, test_channels, test_create_from_modified_config, test_backbone_common_attributes,
test_backbone_outputs), the parts of ModelTesterMixin that concern a vision model (test_save_load,
test_determinism, test_forward_signature, test_training, test_training_gradient_checkpointing,
test_retain_grad_hidden_states_attentions, test_model_outputs_equivalence, test_problem_types,
test_load_with_mismatched_shapes, test_can_use_safetensors, test_model_is_small, test_torch_export) and
BitImageProcessingTest (properties, from_dict_with_kwargs, to_json_file, save_load, call with PIL / numpy /
torch inputs, cast_dtype).

Not applicable, by design (transformers-internal machinery BiT has no part in): `NOT_APPLICABLE` below.
"""

from __future__ import annotations

import copy
import inspect

import numpy as np
import pytest
import torch
from PIL import Image

import bigtransfer

transformers = pytest.importorskip("transformers")

NOT_APPLICABLE = {
    "test_attention_outputs": "BiT has no attention (transformers skips it for BiT too)",
    "test_inputs_embeds / test_model_get_set_embeddings / test_resize_embeddings": "no token embeddings",
    "test_feed_forward_chunking": "no feed-forward chunking (skipped by transformers for BiT)",
    "test_head_pruning* / test_headmasking": "no attention heads",
    "test_torchscript* / test_torch_fx*": "TorchScript and torch.fx tracing of transformers' own wrappers; "
                                          "torch.jit.trace(strict=False) and torch.export are tested instead",
    "test_sdpa* / test_flash_attn* / test_eager_matches_*": "attention kernels",
    "test_generate* / test_past_key_values*": "not a generative model",
    "test_model_parallelism / test_multi_gpu* / test_disk_offload* / test_cpu_offload*": "accelerate's device maps; "
                                                                                         "BiT loads onto one device",
    "test_tie_model_weights / test_tied_weights_keys": "BiT ties no weights",
    "test_mismatched_shapes_have_properly_initialized_weights": "new heads start at zero here (the BiT recipe), "
                                                                "transformers draws them at random: a documented "
                                                                "difference",
    "test_backbone_common_attributes (isinstance BackboneType)": "`backbone_type` is the string 'transformers', "
                                                                 "not transformers' enum, which cannot be imported "
                                                                 "without transformers",
    "test_model_from_pretrained / integration tests": "download google/bit-50 (no network in tests); the "
                                                      "checkpoint tests cover real conversions",
}

# The tester configuration of transformers' BiT tests (its `embeddings_size` is not a BitConfig field: it lands in
# the config's extra keys in both libraries, and the stem keeps the default 64).
TESTER = dict(num_channels=3, embeddings_size=10, hidden_sizes=[8, 16, 32, 64], depths=[1, 1, 2, 1], hidden_act="relu",
              num_labels=3, out_features=["stage2", "stage3", "stage4"], out_indices=[2, 3, 4], num_groups=1)
BATCH, SIZE = 3, 32


@pytest.fixture(params=["transformers", "bigtransfer"])
def library(request):
    return transformers if request.param == "transformers" else bigtransfer


def _classes(library):
    return [library.BitModel, library.BitForImageClassification, library.BitBackbone]


def _inputs():
    generator = torch.Generator().manual_seed(0)
    return torch.rand(BATCH, 3, SIZE, SIZE, generator=generator), torch.randint(0, 3, (BATCH,), generator=generator)


# ---------------------------------------------------------------------------------------------------------------
# BitModelTest


def test_config(library, tmp_path):
    config = library.BitConfig(**TESTER)
    assert config.num_channels == 3 and config.to_dict()["num_channels"] == 3
    again = library.BitConfig.from_dict(config.to_dict())
    assert again.to_dict()["hidden_sizes"] == config.to_dict()["hidden_sizes"]
    config.to_json_file(tmp_path / "config.json")
    assert library.BitConfig.from_json_file(tmp_path / "config.json").depths == config.depths
    config.save_pretrained(tmp_path)
    assert library.BitConfig.from_pretrained(tmp_path).out_features == config.out_features
    assert library.BitConfig().num_labels == 2 and library.BitConfig(num_labels=5).num_labels == 5
    assert len(library.BitConfig(num_labels=5).id2label) == 5


def test_model(library):
    pixels, _ = _inputs()
    model = library.BitModel(library.BitConfig(**TESTER)).eval()
    assert model(pixels).last_hidden_state.shape == (BATCH, TESTER["hidden_sizes"][-1], SIZE // 32, SIZE // 32)


def test_backbone(library):
    pixels, _ = _inputs()
    config = library.BitConfig(**TESTER)
    result = library.BitBackbone(config).eval()(pixels)
    assert len(result.feature_maps) == 3 and list(result.feature_maps[0].shape) == [BATCH, 16, 4, 4]
    assert library.BitBackbone(config).channels == TESTER["hidden_sizes"][1:]
    config.out_features = None
    model = library.BitBackbone(config).eval()
    assert [list(m.shape) for m in model(pixels).feature_maps] == [[BATCH, 64, 1, 1]] and model.channels == [64]


def test_initialization(library):
    for model_class in _classes(library):
        model = model_class(library.BitConfig(**TESTER))
        for module in model.modules():
            if isinstance(module, (torch.nn.BatchNorm2d, torch.nn.GroupNorm)):
                assert torch.all(module.weight == 1) and torch.all(module.bias == 0)


@pytest.mark.parametrize("layer_type", ["preactivation", "bottleneck"])
def test_hidden_states_output(library, layer_type):
    pixels, _ = _inputs()
    for model_class in _classes(library):
        config = library.BitConfig(**TESTER)
        config.layer_type = layer_type
        for by_config in (False, True):
            config.output_hidden_states = by_config
            model = model_class(config).eval()
            with torch.no_grad():
                output = model(pixels, **({} if by_config else {"output_hidden_states": True}))
            assert len(output.hidden_states) == len(TESTER["depths"]) + 1
            assert list(output.hidden_states[0].shape[-2:]) == [SIZE // 4, SIZE // 4]


def test_for_image_classification(library):
    pixels, labels = _inputs()
    result = library.BitForImageClassification(library.BitConfig(**TESTER)).eval()(pixels, labels=labels)
    assert result.logits.shape == (BATCH, 3) and result.loss.ndim == 0


# ---------------------------------------------------------------------------------------------------------------
# BackboneTesterMixin


def test_backbone_config(library):
    BitConfig = library.BitConfig
    config = BitConfig()
    assert config.stage_names == ["stem", "stage1", "stage2", "stage3", "stage4"]
    both_none = BitConfig(out_features=None, out_indices=None)
    assert (both_none.out_features, both_none.out_indices) == (["stage4"], [4])
    assert BitConfig(out_features=["stem", "stage1"], out_indices=[0, 1]).out_indices == [0, 1]
    assert BitConfig(out_features=["stage1", "stage3"]).out_indices == [1, 3]
    assert BitConfig(out_indices=[0, 2]).out_features == ["stem", "stage2"]
    with pytest.raises(ValueError):
        BitConfig(out_features=["stage1", "stage2"], out_indices=[0, 2])


def test_forward_signature(library):
    for model_class in _classes(library):
        assert list(inspect.signature(model_class(library.BitConfig(**TESTER)).forward).parameters)[:1] == ["pixel_values"]


@pytest.mark.slow
def test_channels_and_modified_configs(library):
    pixels, _ = _inputs()
    config = library.BitConfig(**TESTER)
    model = library.BitBackbone(config)
    assert model.channels == [model.num_features[config.stage_names.index(name)] for name in config.out_features]
    for field in ("out_features", "out_indices"):
        modified = copy.deepcopy(config)
        setattr(modified, field, None)
        model = library.BitBackbone(modified).eval()
        assert model.channels == [model.num_features[-1]] and len(model(pixels).feature_maps) == 1


@pytest.mark.slow
def test_backbone_common_attributes_and_outputs(library):
    pixels, _ = _inputs()
    backbone = library.BitBackbone(library.BitConfig(**TESTER)).eval()
    assert str(getattr(backbone.backbone_type, "value", backbone.backbone_type)) == "transformers"
    assert len(backbone.channels) == len(backbone.out_indices) and len(backbone.stage_names) == len(backbone.num_features)
    assert len(backbone.out_feature_channels) == len(backbone.stage_names)
    outputs = backbone(pixels)
    assert isinstance(outputs.feature_maps, tuple) and outputs.hidden_states is None and outputs.attentions is None
    assert len(backbone(pixels, output_hidden_states=True).hidden_states) == len(backbone.stage_names)


# ---------------------------------------------------------------------------------------------------------------
# ModelTesterMixin, the parts that concern a vision model.


@pytest.mark.slow
def test_save_load_determinism_and_safetensors(library, tmp_path):
    pixels, _ = _inputs()
    for index, model_class in enumerate(_classes(library)):
        model = model_class(library.BitConfig(**TESTER)).eval()
        with torch.no_grad():
            first, second = model(pixels)[0], model(pixels)[0]
        first = first[0] if isinstance(first, tuple) else first
        second = second[0] if isinstance(second, tuple) else second
        assert torch.equal(first, second)
        model.save_pretrained(tmp_path / str(index))
        assert (tmp_path / str(index) / "model.safetensors").is_file()
        loaded = model_class.from_pretrained(tmp_path / str(index)).eval()
        with torch.no_grad():
            again = loaded(pixels)[0]
        assert torch.allclose(again[0] if isinstance(again, tuple) else again, first, atol=1e-6)


@pytest.mark.slow
def test_training(library):
    pixels, labels = _inputs()
    model = library.BitForImageClassification(library.BitConfig(**TESTER)).train()
    model(pixels, labels=labels).loss.backward()
    assert all(parameter.grad is not None for parameter in model.parameters())


@pytest.mark.slow
def test_training_gradient_checkpointing():
    """transformers' BiT does not support checkpointing (its test skips); here it must give transformers' gradients."""
    pixels, labels = _inputs()
    theirs = transformers.BitForImageClassification(transformers.BitConfig(**TESTER)).train()
    assert not theirs.supports_gradient_checkpointing
    ours = bigtransfer.BitForImageClassification(bigtransfer.BitConfig(**TESTER)).train()
    ours.load_state_dict(theirs.state_dict())
    ours.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    assert ours.is_gradient_checkpointing
    theirs(pixels, labels=labels).loss.backward()
    ours(pixels, labels=labels).loss.backward()
    for (name, mine), their in zip(ours.named_parameters(), theirs.parameters(), strict=True):
        assert torch.allclose(mine.grad, their.grad, rtol=1e-4, atol=1e-6), name


def test_retain_grad_hidden_states(library):
    pixels, _ = _inputs()
    config = library.BitConfig(**TESTER, output_hidden_states=True)
    output = library.BitModel(config).train()(pixels)
    hidden = output.hidden_states[0]
    hidden.retain_grad()
    output.last_hidden_state.flatten()[0].backward(retain_graph=True)
    assert hidden.grad is not None


def test_model_outputs_equivalence(library):
    pixels, labels = _inputs()
    for model_class in _classes(library):
        model = model_class(library.BitConfig(**TESTER)).eval()
        kwargs = {"labels": labels} if model_class is library.BitForImageClassification else {}
        with torch.no_grad():
            as_dict = model(pixels, return_dict=True, output_hidden_states=True, **kwargs)
            as_tuple = model(pixels, return_dict=False, output_hidden_states=True, **kwargs)
        flat_dict = torch.utils._pytree.tree_leaves(as_dict.to_tuple())
        flat_tuple = torch.utils._pytree.tree_leaves(as_tuple)
        assert len(flat_dict) == len(flat_tuple) and all(torch.equal(a, b) for a, b in zip(flat_dict, flat_tuple, strict=True))


@pytest.mark.parametrize("problem, labels", [
    ("regression", lambda: torch.rand(BATCH, 3)),
    ("single_label_classification", lambda: torch.tensor([0, 1, 2])),
    ("multi_label_classification", lambda: torch.tensor([[1.0, 0, 1], [0, 1, 0], [1, 1, 0]])),
])
def test_problem_types(library, problem, labels):
    pixels, _ = _inputs()
    model = library.BitForImageClassification(library.BitConfig(**TESTER, problem_type=problem)).train()
    loss = model(pixels, labels=labels()).loss
    assert loss.ndim == 0 and torch.isfinite(loss)


def test_load_with_mismatched_shapes(library, tmp_path):
    pixels, _ = _inputs()
    library.BitForImageClassification(library.BitConfig(**TESTER)).save_pretrained(tmp_path)
    with pytest.raises(RuntimeError):  # transformers raises RuntimeError; ours is also a CheckpointError
        library.BitForImageClassification.from_pretrained(tmp_path, num_labels=42)
    model = library.BitForImageClassification.from_pretrained(tmp_path, num_labels=42, ignore_mismatched_sizes=True)
    assert model(pixels).logits.shape == (BATCH, 42)
    assert library.BitModel.from_pretrained(tmp_path, num_labels=42, ignore_mismatched_sizes=True) is not None


@pytest.mark.slow
def test_model_is_small_and_exports(library):
    pixels, _ = _inputs()
    for model_class in _classes(library):
        model = model_class(library.BitConfig(**TESTER)).eval()
        assert model.num_parameters() < 1_000_000
        with torch.no_grad():
            program = torch.export.export(model, (pixels,))
            expected = torch.utils._pytree.tree_leaves(model(pixels))
            exported = torch.utils._pytree.tree_leaves(program.module()(pixels))
        assert all(torch.allclose(a, b, atol=1e-5) for a, b in zip(exported, expected, strict=True))


# ---------------------------------------------------------------------------------------------------------------
# BitImageProcessingTest


def _photos(kind: str):
    generator = np.random.default_rng(0)
    arrays = [generator.integers(0, 256, (30 + 7 * index, 40 - 3 * index, 3), dtype=np.uint8) for index in range(3)]
    if kind == "pil":
        return [Image.fromarray(array) for array in arrays]
    if kind == "numpy":
        return arrays
    return [torch.from_numpy(array).permute(2, 0, 1) for array in arrays]


PROCESSOR = dict(size={"shortest_edge": 20}, crop_size={"height": 18, "width": 18}, do_normalize=True,
                 image_mean=[0.5, 0.5, 0.5], image_std=[0.5, 0.5, 0.5], do_convert_rgb=True)


def test_image_processor_properties_and_configs(library, tmp_path):
    processor = library.BitImageProcessor(**PROCESSOR)
    for name in ("do_resize", "size", "do_center_crop", "center_crop", "do_normalize", "image_mean", "image_std",
                 "do_convert_rgb"):
        assert hasattr(processor, name), name
    again = library.BitImageProcessor.from_dict(processor.to_dict(), size=42, crop_size=84)
    assert again.size == {"shortest_edge": 42} and again.crop_size == {"height": 84, "width": 84}
    processor.to_json_file(tmp_path / "p.json")
    assert library.BitImageProcessor.from_json_file(tmp_path / "p.json").to_dict()["crop_size"] == PROCESSOR["crop_size"]
    processor.save_pretrained(tmp_path)
    assert library.BitImageProcessor.from_pretrained(tmp_path).to_dict()["size"] == PROCESSOR["size"]


@pytest.mark.parametrize("kind", ["pil", "numpy", "torch"])
def test_image_processor_call_equals_transformers(kind):
    images = _photos(kind)
    theirs = transformers.BitImageProcessor(**PROCESSOR)(images, return_tensors="pt").pixel_values
    ours = bigtransfer.BitImageProcessor(**PROCESSOR)(images, return_tensors="pt").pixel_values
    assert ours.shape == theirs.shape == (3, 3, 18, 18) and (ours - theirs).abs().max() < 0.1
    single = bigtransfer.BitImageProcessor(**PROCESSOR)(images[0], return_tensors="pt").pixel_values
    assert single.shape == (1, 3, 18, 18)


def test_image_processor_cast_dtype(library):
    batch = library.BitImageProcessor(**PROCESSOR)(_photos("pil"), return_tensors="pt")
    assert batch.to(torch.float16).pixel_values.dtype == torch.float16
    assert batch.to("cpu").pixel_values.device.type == "cpu"
