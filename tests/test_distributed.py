"""DistributedDataParallel on CPU (gloo): `torchrun --nproc_per_node 2` reproduces one process's run."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from bigtransfer.cli import main
from bigtransfer.train import CHECKPOINT_NAME, load_run_state
from conftest import make_image_folder, torchrun_cli

pytestmark = pytest.mark.skipif(not torch.distributed.is_available(), reason="torch.distributed is not built in")

FINETUNE = ["finetune", "--model", "tiny", "--max-steps", "6", "--base-lr", "0.01", "--batch-size", "8",
            "--resize", "20", "--crop", "16", "--seed", "3", "--no-progress", "--no-plots", "--device", "cpu"]


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    return make_image_folder(tmp_path_factory.mktemp("ddp") / "images", per_class=12)


@pytest.mark.slow
def test_two_processes_match_one_process_with_the_same_global_batch(folder, tmp_path):
    features = ["features", "--model", str(tmp_path / "one" / "model"), "--data", str(folder), "--device", "cpu"]
    assert main([*FINETUNE, "--data", str(folder), "--output", str(tmp_path / "one")]) == 0
    assert main([*features, "--output", str(tmp_path / "f1.npy")]) == 0
    # Each process also splits its half of the batch in two micro-batches (weights standardized once per step,
    # their gradients reduced by DDP with the last one's).
    torchrun_cli(
        [[*FINETUNE, "--data", str(folder), "--output", str(tmp_path / "two"), "--batch-split", "2"],
         [*features, "--output", str(tmp_path / "f2.npy")]],
        tmp_path,
    )
    one, _ = load_run_state(tmp_path / "one" / CHECKPOINT_NAME)
    two, state = load_run_state(tmp_path / "two" / CHECKPOINT_NAME)
    assert state["step"] == 6
    keys = [key for key in one if key.startswith("model/")]
    assert keys
    for key in keys:
        torch.testing.assert_close(two[key], one[key], rtol=0, atol=1e-5, msg=key)
    assert json.loads((tmp_path / "two" / "run.json").read_text())["world_size"] == 2
    # Evaluation is shared between the two processes and gathered: the same report.
    report_one = json.loads((tmp_path / "one" / "report.json").read_text())
    report_two = json.loads((tmp_path / "two" / "report.json").read_text())
    assert report_two["num_images"] == report_one["num_images"] == 6  # 20 % of each class held out
    assert report_two["confusion_matrix"] == report_one["confusion_matrix"]
    # Features under torchrun come back in the data set's order.
    np.testing.assert_allclose(np.load(tmp_path / "f2.npy"), np.load(tmp_path / "f1.npy"), atol=1e-5)
    np.testing.assert_array_equal(np.load(tmp_path / "f2.labels.npy"), np.load(tmp_path / "f1.labels.npy"))
