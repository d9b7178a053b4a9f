"""The package root is the public API: the README's one-line calls work from `import bigtransfer` alone."""

from __future__ import annotations

import pytest
import torch

import bigtransfer
from conftest import TESTER, relative_error


@pytest.mark.parametrize("name", bigtransfer.__all__)
def test_every_public_name_resolves(name):
    assert getattr(bigtransfer, name) is not None


def test_optimize_from_the_package_root(pixel_values):
    torch.manual_seed(0)
    model = bigtransfer.BitForImageClassification(bigtransfer.BitConfig(**TESTER)).eval()
    with torch.no_grad():
        expected = model(pixel_values).logits
        actual = bigtransfer.optimize(model, compile=False)(pixel_values).logits
    assert relative_error(actual, expected) < 1e-4


def test_prepare_for_training_from_the_package_root():
    model = bigtransfer.BitModel(bigtransfer.BitConfig(**TESTER))
    parameters = list(model.parameters())
    assert bigtransfer.prepare_for_training(model) is model
    assert list(model.parameters()) == parameters  # same objects: an optimizer built before keeps working
    assert model.embedder.convolution.weight.is_contiguous(memory_format=torch.channels_last)


def test_export_from_the_package_root(tmp_path):
    torch.manual_seed(0)
    model = bigtransfer.BitForImageClassification(bigtransfer.BitConfig(**TESTER)).eval()
    report = bigtransfer.export(model, tmp_path / "model.pt", format="torchscript", image_size=64)
    assert isinstance(report, bigtransfer.ExportReport)
    assert (tmp_path / "model.pt").is_file()
    assert report.max_abs_difference < 1e-4
