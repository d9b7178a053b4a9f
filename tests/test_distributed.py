"""DistributedDataParallel on CPU (gloo): `torchrun --nproc_per_node 2` reproduces one process's run."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys

import numpy as np
import pytest
import torch

from bigtransfer.cli import main
from bigtransfer.train import CHECKPOINT_NAME, load_run_state
from test_train import make_image_folder

pytestmark = pytest.mark.skipif(not torch.distributed.is_available(), reason="torch.distributed is not built in")

FINETUNE = ["finetune", "--model", "tiny", "--max-steps", "6", "--base-lr", "0.01", "--batch-size", "8",
            "--resize", "20", "--crop", "16", "--seed", "3", "--no-progress", "--no-plots", "--device", "cpu"]


def _torchrun_cli(commands: list[list[str]], script_dir) -> None:
    """Run CLI commands one after another in 2 processes launched by torchrun (one launch, to save start-up time)."""
    script = script_dir / "run_cli.py"
    script.write_text(
        "import sys\nfrom bigtransfer.cli import main\n"
        f"for arguments in {commands!r}:\n"
        "    code = main(arguments)\n"
        "    if code:\n"
        "        sys.exit(code)\n"
    )
    environment = {key: value for key, value in os.environ.items() if key not in ("WORLD_SIZE", "RANK", "LOCAL_RANK")}
    environment["OMP_NUM_THREADS"] = "1"
    launcher = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", str(script)]
    # Its own session, so a hang kills the launcher *and* its workers instead of leaving them behind.
    process = subprocess.Popen(
        launcher, env=environment, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True
    )
    try:
        _, stderr = process.communicate(timeout=300)
    except subprocess.TimeoutExpired:
        os.killpg(process.pid, signal.SIGKILL)
        _, stderr = process.communicate()
        pytest.fail(f"torchrun did not finish in 300 s: {stderr[-3000:]}")
    assert process.returncode == 0, stderr[-3000:]


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    return make_image_folder(tmp_path_factory.mktemp("ddp") / "images", per_class=12)


def test_two_processes_match_one_process_with_the_same_global_batch(folder, tmp_path):
    features = ["features", "--model", str(tmp_path / "one" / "model"), "--data", str(folder), "--device", "cpu"]
    assert main([*FINETUNE, "--data", str(folder), "--output", str(tmp_path / "one")]) == 0
    assert main([*features, "--output", str(tmp_path / "f1.npy")]) == 0
    _torchrun_cli(
        [[*FINETUNE, "--data", str(folder), "--output", str(tmp_path / "two")], [*features, "--output", str(tmp_path / "f2.npy")]],
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
