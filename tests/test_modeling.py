"""Model behaviour, re-expressing transformers' BiT test suite, plus what it leaves out (dilation, width,
gradient checkpointing, bad input, strict loading)."""

from __future__ import annotations

import copy
import logging

import pytest
import torch
import torch.nn.functional as F

from bigtransfer import (
    BitBackbone,
    BitConfig,
    BitForImageClassification,
    BitModel,
    CheckpointError,
    UnsafeCheckpointError,
)
from conftest import TESTER, relative_error


def build(model_class, **overrides):
    torch.manual_seed(0)
    return model_class(BitConfig(**{**TESTER, **overrides})).eval()


@pytest.mark.parametrize("layer_type", ["preactivation", "bottleneck"])
def test_model_output_shapes(layer_type, pixel_values):
    model = build(BitModel, layer_type=layer_type)
    with torch.no_grad():
        outputs = model(pixel_values, output_hidden_states=True)
    assert outputs.last_hidden_state.shape == (3, 64, 1, 1)
    assert outputs.pooler_output.shape == (3, 64, 1, 1)
    assert len(outputs.hidden_states) == 5
    assert outputs.hidden_states[0].shape == (3, 8, 8, 8)
    assert [h.shape[1] for h in outputs.hidden_states] == [8, 8, 16, 32, 64]


def test_last_hidden_state_is_the_final_norm_of_the_last_stage(pixel_values):
    model = build(BitModel)
    with torch.no_grad():
        outputs = model(pixel_values, output_hidden_states=True)
    assert torch.allclose(outputs.last_hidden_state, model.norm(outputs.hidden_states[-1]))
    assert torch.allclose(outputs.pooler_output, outputs.last_hidden_state.mean((2, 3), keepdim=True), atol=1e-6)


def test_attribute_tuple_and_key_access_agree(pixel_values):
    model = build(BitForImageClassification)
    labels = torch.tensor([0, 1, 2])
    with torch.no_grad():
        outputs = model(pixel_values, labels=labels, output_hidden_states=True)
        as_tuple = model(pixel_values, labels=labels, output_hidden_states=True, return_dict=False)
    assert outputs[0] is outputs.loss and outputs["logits"] is outputs.logits
    assert list(outputs.keys()) == ["loss", "logits", "hidden_states"]
    assert isinstance(as_tuple, tuple) and len(as_tuple) == 3
    assert torch.equal(as_tuple[1], outputs.logits)
    loss, logits = outputs[:2]
    assert loss.ndim == 0 and logits.shape == (3, 3)


def test_classification_output_and_identity_head(pixel_values):
    model = build(BitForImageClassification)
    with torch.no_grad():
        assert model(pixel_values).logits.shape == (3, 3)
    headless = build(BitForImageClassification, num_labels=0)
    with torch.no_grad():
        features = headless(pixel_values).logits
        pooled = headless.bit(pixel_values).pooler_output
    assert torch.equal(features, pooled.flatten(1))


def test_backbone_returns_only_the_requested_maps(pixel_values):
    model = build(BitBackbone)
    with torch.no_grad():
        outputs = model(pixel_values)
    assert len(outputs.feature_maps) == 3
    assert outputs.feature_maps[0].shape == (3, 16, 4, 4)
    assert model.channels == [16, 32, 64]
    assert outputs.hidden_states is None
    single = build(BitBackbone, out_features=None)
    with torch.no_grad():
        maps = single(pixel_values).feature_maps
    assert len(maps) == 1 and maps[0].shape == (3, 64, 1, 1)
    assert single.channels == [64]


def test_backbone_maps_equal_model_hidden_states(pixel_values):
    backbone = build(BitBackbone, out_features=["stem", "stage2", "stage4"])
    with torch.no_grad():
        hidden = backbone.bit(pixel_values, output_hidden_states=True).hidden_states
        maps = backbone(pixel_values).feature_maps
        with_hidden = backbone(pixel_values, output_hidden_states=True)
    for got, index in zip(maps, [0, 2, 4], strict=True):
        assert torch.equal(got, hidden[index])
    assert len(with_hidden.hidden_states) == 5


def test_backbone_skips_stages_after_the_last_requested_one(pixel_values):
    backbone = build(BitBackbone, out_features=["stage1"])
    calls = []
    for index, stage in enumerate(backbone.bit.encoder.stages):
        stage.register_forward_hook(lambda module, args, output, index=index: calls.append(index))
    with torch.no_grad():
        backbone(pixel_values)
    assert calls == [0]


def test_backbone_channels_honour_width_factor():
    backbone = BitBackbone(BitConfig(**{**TESTER, "width_factor": 2, "out_features": ["stem", "stage1", "stage4"]}))
    assert backbone.channels == [8, 16, 128]
    with torch.no_grad():
        maps = backbone(torch.randn(1, 3, 32, 32)).feature_maps
    assert [m.shape[1] for m in maps] == backbone.channels


@pytest.mark.parametrize("width_factor", [2, 3])
def test_wide_models_run_and_size_head_from_the_widened_stage(width_factor, pixel_values):
    model = build(BitForImageClassification, width_factor=width_factor)
    with torch.no_grad():
        outputs = model(pixel_values, output_hidden_states=True)
    width = 64 * width_factor
    assert outputs.hidden_states[-1].shape[1] == width
    assert model.classifier[1].in_features == width and outputs.logits.shape == (3, 3)


@pytest.mark.parametrize("output_stride, spatial", [(32, 2), (16, 4), (8, 8)])
def test_output_stride_dilates_instead_of_striding(output_stride, spatial):
    model = build(BitModel, output_stride=output_stride, depths=[1, 1, 2, 2])
    with torch.no_grad():
        last = model(torch.randn(1, 3, 64, 64)).last_hidden_state
    assert last.shape[-1] == spatial
    dilations = [layer.conv2.dilation[0] for stage in model.encoder.stages for layer in stage.layers]
    assert max(dilations) == 32 // output_stride


def test_eval_is_deterministic_and_batches_are_independent(pixel_values):
    model = build(BitForImageClassification)
    with torch.no_grad():
        first, second = model(pixel_values).logits, model(pixel_values).logits
        one_by_one = torch.cat([model(pixel_values[i : i + 1]).logits for i in range(3)])
    assert torch.equal(first, second)
    assert torch.allclose(first, one_by_one, atol=1e-5)


def test_drop_path_is_random_in_training_only(pixel_values):
    model = build(BitForImageClassification, drop_path_rate=0.5)
    model.train()
    torch.manual_seed(1)
    a = model(pixel_values).logits
    torch.manual_seed(2)
    b = model(pixel_values).logits
    assert not torch.allclose(a, b)
    model.eval()
    with torch.no_grad():
        assert torch.equal(model(pixel_values).logits, model(pixel_values).logits)


def test_gradient_checkpointing_gives_the_same_gradients(pixel_values):
    labels = torch.tensor([0, 1, 2])
    plain = build(BitForImageClassification, num_labels=3).train()
    checkpointed = copy.deepcopy(plain)
    checkpointed.gradient_checkpointing_enable()
    assert checkpointed.is_gradient_checkpointing
    plain(pixel_values, labels=labels).loss.backward()
    checkpointed(pixel_values, labels=labels).loss.backward()
    for (name, p), q in zip(plain.named_parameters(), checkpointed.parameters(), strict=True):
        assert torch.allclose(p.grad, q.grad, atol=1e-6, rtol=1e-5), name


def test_problem_types_follow_transformers(pixel_values):
    model = build(BitForImageClassification, num_labels=3)
    with torch.no_grad():
        labels = torch.tensor([2, 0, 1])
        out = model(pixel_values, labels=labels)
        assert model.config.problem_type == "single_label_classification"
        assert torch.allclose(out.loss, F.cross_entropy(out.logits, labels))

        multi = build(BitForImageClassification, num_labels=3)
        targets = torch.tensor([[1.0, 0.0, 1.0], [0.0, 0.0, 0.0], [1.0, 1.0, 1.0]])
        out = multi(pixel_values, labels=targets)
        assert multi.config.problem_type == "multi_label_classification"
        assert torch.allclose(out.loss, F.binary_cross_entropy_with_logits(out.logits, targets))

        regression = build(BitForImageClassification, num_labels=1)
        values = torch.tensor([0.5, -1.0, 2.0])
        out = regression(pixel_values, labels=values)
        assert regression.config.problem_type == "regression"
        assert torch.allclose(out.loss, F.mse_loss(out.logits.squeeze(), values))


def test_labels_out_of_range_are_named(pixel_values):
    model = build(BitForImageClassification, num_labels=3)
    with pytest.raises(ValueError, match=r"labels must be in \[0, 2\].*got values from 0 to 7"):
        model(pixel_values, labels=torch.tensor([0, 7, 1]))


@pytest.mark.parametrize(
    "tensor, error, message",
    [
        (torch.randn(3, 32, 32), ValueError, "must be 4-D"),
        (torch.randn(1, 3, 3, 32, 32), ValueError, "must be 4-D"),
        (torch.randn(2, 4, 32, 32), ValueError, "has 4 channels"),
        (torch.randint(0, 255, (2, 3, 32, 32), dtype=torch.uint8), TypeError, "floating-point"),
        (torch.zeros(0, 3, 32, 32), ValueError, "empty"),
        (torch.full((1, 3, 32, 32), float("nan")), ValueError, "NaN or infinite"),
        (torch.full((1, 3, 32, 32), float("inf")), ValueError, "NaN or infinite"),
    ],
)
@pytest.mark.parametrize("model_class", [BitModel, BitForImageClassification, BitBackbone])
def test_bad_pixel_values_get_clear_errors(model_class, tensor, error, message):
    model = build(model_class)
    with pytest.raises(error, match=message):
        model(tensor)


def test_numpy_input_is_rejected_with_a_type_error():
    with pytest.raises(TypeError, match="must be a torch.Tensor"):
        build(BitModel)(torch.randn(1, 3, 32, 32).numpy())


def test_valid_padding_is_refused_with_an_explanation():
    config = BitConfig(**{**TESTER, "global_padding": "valid"})
    with pytest.raises(ValueError, match="VALID.*shrink the residual branch"):
        BitModel(config)


# -- save / load ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("safe", [True, False])
def test_save_and_load_round_trip(tmp_path, pixel_values, safe):
    model = build(BitForImageClassification)
    model.save_pretrained(tmp_path, safe_serialization=safe)
    assert (tmp_path / ("model.safetensors" if safe else "pytorch_model.bin")).is_file()
    loaded = BitForImageClassification.from_pretrained(tmp_path)
    assert not loaded.training
    with torch.no_grad():
        assert torch.equal(loaded(pixel_values).logits, model(pixel_values).logits)


def test_base_model_and_head_checkpoints_load_into_each_other(tmp_path, pixel_values, caplog):
    classifier = build(BitForImageClassification)
    classifier.save_pretrained(tmp_path / "classifier")
    base = BitModel.from_pretrained(tmp_path / "classifier")
    backbone = BitBackbone.from_pretrained(tmp_path / "classifier")
    with torch.no_grad():
        assert torch.equal(base(pixel_values).pooler_output, classifier.bit(pixel_values).pooler_output)
        assert torch.equal(backbone(pixel_values).feature_maps[-1], classifier.bit(pixel_values, output_hidden_states=True).hidden_states[-1])
    base.save_pretrained(tmp_path / "base")
    with caplog.at_level(logging.WARNING, logger="bigtransfer"):
        fresh = BitForImageClassification.from_pretrained(tmp_path / "base", num_labels=4)
    assert "classifier.1.weight" in caplog.text
    assert torch.count_nonzero(fresh.classifier[1].weight) == 0


def test_mismatched_head_needs_the_flag(tmp_path, pixel_values, caplog):
    build(BitForImageClassification).save_pretrained(tmp_path)
    with pytest.raises(CheckpointError, match=r"classifier.1.weight has shape \(3, 64\).*\(10, 64\)"):
        BitForImageClassification.from_pretrained(tmp_path, num_labels=10)
    with caplog.at_level(logging.WARNING, logger="bigtransfer"):
        model = BitForImageClassification.from_pretrained(tmp_path, num_labels=10, ignore_mismatched_sizes=True)
    assert "newly initialised" in caplog.text and "classifier.1.weight" in caplog.text
    assert model.config.num_labels == 10
    with torch.no_grad():
        assert model(pixel_values).logits.shape == (3, 10)


def test_backbone_shape_mismatch_is_never_ignored(tmp_path):
    build(BitModel).save_pretrained(tmp_path)
    with pytest.raises(CheckpointError, match="embedder.convolution.weight has shape"):
        BitModel.from_pretrained(tmp_path, embedding_size=16, ignore_mismatched_sizes=True)


def test_missing_and_unexpected_keys_are_listed(tmp_path):
    from safetensors.torch import load_file, save_file

    build(BitModel).save_pretrained(tmp_path)
    state = load_file(tmp_path / "model.safetensors")
    state.pop("norm.weight")
    state["encoder.extra.weight"] = torch.zeros(1)
    save_file(state, tmp_path / "model.safetensors")
    with pytest.raises(CheckpointError, match=r"missing keys \['norm.weight'\].*unexpected keys \['encoder.extra.weight'\]"):
        BitModel.from_pretrained(tmp_path)


def test_directory_without_weights(tmp_path):
    BitConfig(**TESTER).save_pretrained(tmp_path)
    with pytest.raises(CheckpointError, match="no weights in"):
        BitModel.from_pretrained(tmp_path)


def test_missing_directory_raises_os_error(tmp_path):
    with pytest.raises(OSError, match="does-not-exist"):
        BitModel.from_pretrained(tmp_path / "does-not-exist")


def test_truncated_safetensors_is_reported(tmp_path):
    build(BitModel).save_pretrained(tmp_path)
    weights = tmp_path / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])
    with pytest.raises(CheckpointError, match="model.safetensors is not a readable safetensors file"):
        BitModel.from_pretrained(tmp_path)


def test_corrupt_pytorch_bin_is_reported(tmp_path):
    BitConfig(**TESTER).save_pretrained(tmp_path)
    (tmp_path / "pytorch_model.bin").write_bytes(b"PK\x03\x04 definitely not a zip")
    with pytest.raises(CheckpointError, match="pytorch_model.bin is not a readable PyTorch checkpoint"):
        BitModel.from_pretrained(tmp_path)


class _Payload:
    def __reduce__(self):
        import pathlib

        return (pathlib.Path.touch, (pathlib.Path(self.marker),))


def test_pickle_that_runs_code_is_refused_without_running_it(tmp_path):
    BitConfig(**TESTER).save_pretrained(tmp_path)
    marker = tmp_path / "payload-ran"
    payload = _Payload()
    payload.marker = str(marker)
    torch.save({"embedder.convolution.weight": torch.zeros(1), "evil": payload}, tmp_path / "pytorch_model.bin")
    with pytest.raises(UnsafeCheckpointError, match="refused to load"):
        BitModel.from_pretrained(tmp_path)
    assert not marker.exists()


def test_save_into_a_file_path_is_refused(tmp_path):
    target = tmp_path / "file"
    target.write_text("user data")
    with pytest.raises(NotADirectoryError):
        build(BitModel).save_pretrained(target)
    assert target.read_text() == "user data"


# -- cached weight standardization ---------------------------------------------------------------------------------


def test_cached_standardization_follows_weight_updates(pixel_values):
    model = build(BitForImageClassification)
    reference = copy.deepcopy(model)
    with torch.no_grad():
        model(pixel_values)  # fills the caches
        for p, q in zip(model.parameters(), reference.parameters(), strict=True):
            p.add_(0.01)
            q.add_(0.01)
        torch.manual_seed(3)
        model.load_state_dict({k: v + 0.001 for k, v in model.state_dict().items()})
        reference.load_state_dict(model.state_dict())
        for module in reference.modules():
            if hasattr(module, "_cache"):
                module._cache = None
        assert relative_error(model(pixel_values).logits, reference(pixel_values).logits) < 1e-6


# ---------------------------------------------------------------------------------------------------------------
# from_pretrained's transformers arguments: dtype / torch_dtype, device_map, and no silently ignored keywords.


@pytest.fixture
def saved_bf16(tmp_path):
    torch.manual_seed(0)
    model = BitForImageClassification(BitConfig(**TESTER)).to(torch.bfloat16).eval()
    model.save_pretrained(tmp_path / "bf16")
    return model, tmp_path / "bf16"


def test_dtype_auto_is_the_saved_dtype_as_in_transformers(saved_bf16, pixel_values):
    import transformers

    model, directory = saved_bf16
    loaded = BitForImageClassification.from_pretrained(directory)
    assert loaded.name_or_path == str(directory) and loaded.supports_gradient_checkpointing
    assert loaded.dtype == torch.bfloat16
    assert transformers.BitForImageClassification.from_pretrained(directory).dtype == torch.bfloat16
    with torch.no_grad():  # the processor's float32 pixels are taken by a bf16 model
        assert torch.equal(loaded(pixel_values).logits, model(pixel_values.to(torch.bfloat16)).logits)


@pytest.mark.parametrize("kwargs, expected", [
    (dict(dtype=torch.float32), torch.float32),
    (dict(dtype="float16"), torch.float16),
    (dict(torch_dtype=torch.float32), torch.float32),
    (dict(torch_dtype="torch.float64"), torch.float64),
    (dict(dtype="auto", device_map="cpu"), torch.bfloat16),
    (dict(device_map="auto"), torch.bfloat16),
])
def test_dtype_and_device_map(saved_bf16, kwargs, expected):
    loaded = BitForImageClassification.from_pretrained(saved_bf16[1], **kwargs)
    assert loaded.dtype == expected and not loaded.training
    assert {parameter.dtype for parameter in loaded.parameters()} == {expected}


@pytest.mark.parametrize("kwargs, error, match", [
    (dict(dtype="int8"), ValueError, "dtype must be a floating torch dtype.*got 'int8'"),
    (dict(dtype=torch.float16, torch_dtype=torch.float16), TypeError, "not both"),
    (dict(device_map={"bit": 0, "classifier": 1}), ValueError, "fits one device"),
    (dict(device_map="gpu-please"), ValueError, "device_map must be a device"),
    (dict(num_lables=5), TypeError, r"unexpected keyword arguments \['num_lables'\]"),
    (dict(proxies={"https": "proxy:3128"}), ValueError, r"from_pretrained\(proxies=.*set HTTPS_PROXY"),
])
def test_from_pretrained_refuses_what_it_would_ignore(saved_bf16, kwargs, error, match):
    with pytest.raises(error, match=match):
        BitForImageClassification.from_pretrained(saved_bf16[1], **kwargs)


def test_pixel_values_on_another_device_are_named(pixel_values):
    model = BitModel(BitConfig(**TESTER)).eval()
    with pytest.raises(ValueError, match="pixel_values is on meta but the model is on cpu"):
        model(pixel_values.to("meta"))


@pytest.mark.parametrize("name, error, match", [
    ("", ValueError, "model name or path is empty"),
    ("BiT-M-R50x2", OSError, r"BiT-M-R50x2 does not exist: .*Google released BiT-S-R50x1, .*BiT-M-R152x4, each also -ILSVRC2012"),
])
def test_names_that_cannot_load_say_why(name, error, match, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(error, match=match):
        BitForImageClassification.from_pretrained(name)
