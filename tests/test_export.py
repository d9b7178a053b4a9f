"""Exports hold no training-mode BatchNorm, take any batch and image size, and match PyTorch (ONNX Runtime)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from bigtransfer import BitBackbone, BitConfig, BitForImageClassification, BitModel
from bigtransfer.export import export, onnx_operators, onnx_session
from conftest import TESTER, relative_error

onnxruntime = pytest.importorskip("onnxruntime")
pytest.importorskip("onnxscript")


def build(model_class=BitForImageClassification, **overrides):
    torch.manual_seed(0)
    return model_class(BitConfig(**{**TESTER, "num_groups": 2, **overrides})).eval()


@pytest.fixture(scope="module")
def classifier_export(tmp_path_factory):
    model = build()
    path = tmp_path_factory.mktemp("onnx") / "model.onnx"
    return model, path, export(model, path, image_size=64)


@pytest.mark.slow
def test_onnx_has_no_batchnorm_and_matches_onnxruntime_with_dynamic_batch_and_size(classifier_export):
    model, path, report = classifier_export
    assert "BatchNormalization" not in report.operators
    assert "BatchNormalization(training)" not in report.operators
    assert report.operators["Conv"] == sum(isinstance(m, torch.nn.Conv2d) for m in model.modules())
    assert report.max_relative_difference < 1e-4 and len(report.checked_shapes) == 2
    session = onnx_session(path)
    (input_,) = session.get_inputs()
    assert input_.name == "pixel_values" and input_.shape[1] == 3
    assert all(isinstance(dim, str) for dim in (input_.shape[0], input_.shape[2], input_.shape[3]))
    for batch, height, width in [(1, 64, 64), (4, 96, 128), (7, 130, 77)]:
        pixels = torch.randn(batch, 3, height, width, generator=torch.Generator().manual_seed(batch))
        (logits,) = session.run(None, {"pixel_values": pixels.numpy()})
        with torch.no_grad():
            expected = model(pixels).logits
        assert logits.shape == (batch, 3)
        assert relative_error(torch.from_numpy(logits), expected) < 1e-4


@pytest.mark.slow
def test_unfolded_onnx_has_no_batchnorm_either(tmp_path):
    model = build()
    report = export(model, tmp_path / "unfolded.onnx", fold=False, image_size=64)
    assert not any(name.startswith("BatchNormalization") for name in report.operators)
    assert report.max_relative_difference < 1e-4


@pytest.mark.slow
def test_export_leaves_the_model_untouched(classifier_export):
    model, _, _ = classifier_export
    from bigtransfer.layers import StdConv2d

    assert any(isinstance(m, StdConv2d) for m in model.modules())


def test_check_raises_when_outputs_differ(tmp_path):
    with pytest.raises(ValueError, match="tolerance"):
        export(build(), tmp_path / "strict.onnx", image_size=64, tolerance=0.0)


@pytest.mark.slow
@pytest.mark.parametrize("model_class", [BitModel, BitBackbone])
def test_onnx_base_model_and_backbone_outputs(tmp_path, model_class):
    model = build(model_class)
    report = export(model, tmp_path / "m.onnx", image_size=64)
    expected_names = (["last_hidden_state", "pooler_output"] if model_class is BitModel
                      else ["feature_map_stage2", "feature_map_stage3", "feature_map_stage4"])
    assert report.output_names == expected_names
    assert report.max_relative_difference < 1e-4


@pytest.mark.slow
@pytest.mark.parametrize("format", ["torchscript", "exported-program"])
def test_torchscript_and_torch_export_match(tmp_path, format):
    model = build()
    path = tmp_path / ("model.pt" if format == "torchscript" else "model.pt2")
    report = export(model, path, format, image_size=64)
    assert report.max_relative_difference < 1e-4
    loaded = torch.jit.load(str(path)) if format == "torchscript" else torch.export.load(str(path)).module()
    pixels = torch.randn(3, 3, 80, 96)
    with torch.no_grad():
        (logits,) = loaded(pixels)
        assert relative_error(logits, model(pixels).logits) < 1e-4


def test_export_rejects_bad_arguments(tmp_path):
    with pytest.raises(ValueError, match="format"):
        export(build(), tmp_path / "x", "tflite")
    with pytest.raises(ValueError, match="image_size"):
        export(build(), tmp_path / "x.onnx", image_size=32)
    with pytest.raises(ValueError, match="tolerance must be a finite number > 0, got nan"):
        export(build(), tmp_path / "x.onnx", tolerance=float("nan"))  # would let any difference pass
    assert not (tmp_path / "x.onnx").exists()
    with pytest.raises(TypeError, match="BitModel"):
        export(torch.nn.Conv2d(3, 3, 1), tmp_path / "x.onnx")


@pytest.mark.slow
def test_export_cli(tmp_path, capsys):
    from bigtransfer.cli import main

    model = build()
    model.save_pretrained(tmp_path / "model")
    output = tmp_path / "out" / "model.onnx"
    code = main(["export", "--model", str(tmp_path / "model"), "--format", "onnx", "--output", str(output),
                 "--image-size", "64", "--time", "1"])
    printed = capsys.readouterr().out
    assert code == 0, printed
    assert output.is_file() and "BatchNormalization" not in onnx_operators(output)
    assert "matches PyTorch" in printed and "onnxruntime" in printed
    session = onnx_session(output)
    pixels = np.random.default_rng(0).standard_normal((2, 3, 64, 64)).astype(np.float32)
    with torch.no_grad():
        expected = model(torch.from_numpy(pixels)).logits
    assert relative_error(torch.from_numpy(session.run(None, {"pixel_values": pixels})[0]), expected) < 1e-4


@pytest.mark.slow
def test_a_bf16_model_exports_a_float32_graph(tmp_path):
    torch.manual_seed(0)
    model = BitForImageClassification(BitConfig(**TESTER)).to(torch.bfloat16).train()
    report = export(model, tmp_path / "model.pt", format="torchscript", image_size=64)
    assert report.max_relative_difference < 1e-4  # against the float32 version of the same weights
    assert model.training and next(model.parameters()).dtype == torch.bfloat16  # the user's model is untouched
    traced = torch.jit.load(str(tmp_path / "model.pt"))
    assert traced(torch.randn(1, 3, 64, 64))[0].dtype == torch.float32
