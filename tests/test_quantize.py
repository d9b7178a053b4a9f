"""int8 export: a statically quantized ONNX file that ONNX Runtime runs at any batch size, whose top-1 agrees with
the float32 model on held-out images, written whole or not at all; the command's refusals."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from bigtransfer.cli import main
from bigtransfer.data import open_source
from bigtransfer.export import onnx_session
from bigtransfer.inference import load_for_inference
from bigtransfer.quantize import quantize
from conftest import CHILD_PEAK_MB

pytest.importorskip("onnxruntime")


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """`tiny` fine-tuned (60 steps) on scikit-learn's digits at 64 px, and preprocessed held-out digits."""
    root = tmp_path_factory.mktemp("int8")
    assert main(["finetune", "--model", "tiny", "--data", "digits", "--output", str(root / "run"), "--max-steps", "60",
                 "--batch-size", "32", "--batch-split", "1", "--resize", "72", "--crop", "64", "--base-lr", "0.01",
                 "--no-progress", "--no-plots"]) == 0
    model, processor = load_for_inference(root / "run" / "model", "cpu")
    test = open_source("digits", "test")
    pixels = processor([test[index][0] for index in range(len(test))], return_tensors="np")["pixel_values"]
    return root, model, pixels


@pytest.mark.slow
def test_int8_agrees_with_float32_on_held_out_images(trained, tmp_path):
    _, model, pixels = trained
    report = quantize(model, tmp_path / "model.onnx", pixels[:32], pixels[32:])
    assert report.operators.get("QLinearConv", 0) >= 10 and "Conv" not in report.operators
    session = onnx_session(tmp_path / "model.onnx")
    name = session.get_inputs()[0].name
    for batch in (1, 7):  # dynamic batch
        assert session.run(None, {name: pixels[:batch]})[0].shape == (batch, 10)
    with torch.no_grad():
        floating = model(torch.from_numpy(pixels[32:])).logits.argmax(1).numpy()
    int8 = session.run(None, {name: pixels[32:]})[0].argmax(1)
    assert (int8 == floating).mean() >= 0.95 and report.top1_agreement >= 0.95
    assert report.checked_images == len(pixels) - 32 and report.calibration_images == 32


@pytest.mark.slow
def test_a_failed_quantization_leaves_the_previous_file(trained, tmp_path, monkeypatch):
    _, model, pixels = trained
    target = tmp_path / "model.onnx"
    target.write_bytes(b"previous")
    from onnxruntime import quantization

    def fail(*args, **kwargs):
        raise RuntimeError("calibration failed")

    monkeypatch.setattr(quantization, "quantize_static", fail)
    with pytest.raises(RuntimeError, match="calibration failed"):
        quantize(model, target, pixels[:8])
    assert target.read_bytes() == b"previous" and [path.name for path in tmp_path.iterdir()] == ["model.onnx"]
    with pytest.raises(ValueError, match=r"calibration must be preprocessed images of shape \(N, C, H, W\)"):
        quantize(model, target, np.zeros((3, 64, 64), np.float32))


@pytest.mark.slow
def test_the_command_quantizes_and_says_what_it_checked(trained, tmp_path, capsys):
    root = trained[0]
    base = ["export", "--model", str(root / "run" / "model"), "--output", str(tmp_path / "m.onnx")]
    assert main([*base, "--int8", "--calibration", "digits", "--calibration-images", "16", "--check-images", "64"]) == 0
    out = capsys.readouterr().out
    assert "int8:" in out and "top-1 agrees with float32 on" in out and "of 64 held-out images" in out
    assert main([*base, "--int8"]) == 2
    assert "--int8 writes ONNX (--format onnx) and needs --calibration SPEC" in capsys.readouterr().err
    assert main([*base, "--int8", "--calibration", "digits", "--check-images", "5000"]) == 2
    assert "need 5064" in capsys.readouterr().err


def test_an_existing_output_is_replaced_without_being_read(trained, tmp_path):
    """A 3 GB file at --output (sparse: no disk used) is replaced; reading it would cost gigabytes of memory."""
    import subprocess
    import sys

    root, _, pixels = trained
    np.save(tmp_path / "pixels.npy", pixels[:8])
    big = tmp_path / "big.onnx"
    with open(big, "wb") as handle:
        handle.truncate(3 << 30)
    script = ("import numpy as np, sys\nfrom bigtransfer import BitForImageClassification\n"
              "from bigtransfer.quantize import quantize\n"
              f"model = BitForImageClassification.from_pretrained({str(root / 'run' / 'model')!r})\n"
              f"quantize(model, {str(big)!r}, np.load({str(tmp_path / 'pixels.npy')!r}))\n"
              f"print({CHILD_PEAK_MB})\n")
    done = subprocess.run([sys.executable, "-c", script], check=True, timeout=300, capture_output=True, text=True)
    peak_mb = float(done.stdout.split()[-1])
    assert peak_mb < 2000, f"the child peaked at {peak_mb:.0f} MB: the old output was read"
    assert big.stat().st_size < 10 << 20  # the int8 model of a tiny network
    assert sorted(path.name for path in tmp_path.iterdir()) == ["big.onnx", "pixels.npy"]  # nothing staged left
