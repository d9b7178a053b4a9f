"""The training commands end to end: finetune / pretrain / evaluate / predict / features, and a real SIGTERM."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from bigtransfer import demo
from bigtransfer.cli import main
from bigtransfer.data import FASHION_MNIST_DIR
from bigtransfer.train import CHECKPOINT_NAME, LOCK_NAME, Callback, FinetuneConfig, finetune, load_run_state
from conftest import CLASSES

TRAIN = ["--batch-size", "8", "--resize", "20", "--crop", "16", "--no-progress", "--no-plots"]


@pytest.mark.slow
def test_finetune_evaluate_predict_features(folder, tmp_path, capsys):
    up = tmp_path / "up"
    assert main(["pretrain", "--model", "tiny", "--data", str(folder), "--output", str(up), "--max-steps", "4",
                 *TRAIN]) == 0
    run = tmp_path / "ft"
    assert main(["finetune", "--model", str(up / "model"), "--data", str(folder), "--output", str(run),
                 "--max-steps", "6", "--base-lr", "0.01", "--shots", "4", "--classes", "circle,stripes", *TRAIN]) == 0
    out = capsys.readouterr().out
    assert "top-1" in out and str(run / "model") in out
    report = json.loads((run / "report.json").read_text())
    assert list(report["per_class_accuracy"]) == ["circle", "stripes"]

    # The images finetune held out (no --eval-data), named the same way; the default is the whole folder.
    assert main(["evaluate", "--model", str(run / "model"), "--data", str(folder), "--classes", "circle,stripes",
                 "--split", "test", "--json"]) == 0
    evaluated = json.loads(capsys.readouterr().out)
    assert evaluated["top1"] == pytest.approx(report["top1"])
    assert evaluated["confusion_matrix"] == report["confusion_matrix"]
    assert evaluated["data"] == report["data"] and "held out: 20% of each class" in report["data"]["split"]
    assert main(["evaluate", "--model", str(run / "model"), "--data", str(folder), "--classes", "circle,stripes",
                 "--json"]) == 0
    whole = json.loads(capsys.readouterr().out)
    on_disk = len(list((folder / "circle").iterdir())) + len(list((folder / "stripes").iterdir()))
    assert whole["num_images"] == whole["data"]["images"] == on_disk and whole["data"]["split"] == "all of it"

    images = [str(folder / "circle" / "0.png"), str(folder / "square" / "3.png")]
    assert main(["predict", "--model", str(run / "model"), *images, "--top-k", "2", "--json"]) == 0
    lines = capsys.readouterr().out.strip().splitlines()
    assert len(lines) == 2
    for line, image in zip(lines, images, strict=True):
        record = json.loads(line)
        assert record["image"] == image
        scores = [p["score"] for p in record["predictions"]]
        assert scores == sorted(scores, reverse=True) and sum(scores) == pytest.approx(1.0, abs=1e-5)
        assert {p["label"] for p in record["predictions"]} == {"circle", "stripes"}

    features = tmp_path / "features.npy"
    assert main(["features", "--model", str(run / "model"), "--data", str(folder), "--output", str(features)]) == 0
    array, labels = np.load(features), np.load(tmp_path / "features.labels.npy")
    index = json.loads((tmp_path / "features.index.json").read_text())
    assert array.shape == (30, 512) and labels.shape == (30,) and set(labels.tolist()) == {0, 1, 2}  # all 30 images
    assert index["classes"] == list(CLASSES) and len(index["paths"]) == 30
    assert all(Path(path).parent.name == index["classes"][label] for path, label in zip(index["paths"], labels, strict=True))


def test_errors_are_one_line(folder, tmp_path, capsys):
    assert main(["finetune", "--model", "tiny", "--data", str(tmp_path / "missing"), "--output",
                 str(tmp_path / "run"), *TRAIN]) == 2
    error = capsys.readouterr().err.strip()
    assert error.startswith("bigtransfer finetune: error:") and "does not exist" in error and "\n" not in error
    run = tmp_path / "locked"
    run.mkdir()
    (run / LOCK_NAME).write_text(f"{os.getpid()} {os.uname().nodename}\n")
    assert main(["finetune", "--model", "tiny", "--data", str(folder), "--output", str(run), *TRAIN]) == 1
    error = capsys.readouterr().err.strip()
    assert "in use by process" in error and "\n" not in error


def _finetune_process(folder, output, *extra):
    command = [sys.executable, "-m", "bigtransfer.cli", "finetune", "--model", "tiny", "--data", str(folder),
               "--output", str(output), "--max-steps", "60", "--base-lr", "0.01", "--seed", "5", *TRAIN, *extra]
    environment = dict(os.environ, OMP_NUM_THREADS="1")
    return subprocess.Popen(command, env=environment, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


@pytest.mark.slow
def test_sigterm_half_way_then_resume_matches_an_uninterrupted_run(folder, tmp_path):
    straight = _finetune_process(folder, tmp_path / "straight")
    interrupted = _finetune_process(folder, tmp_path / "interrupted")
    metrics = tmp_path / "interrupted" / "metrics.jsonl"
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline and interrupted.poll() is None:
        if metrics.is_file() and len(metrics.read_text().splitlines()) >= 5:
            break
        time.sleep(0.01)
    interrupted.send_signal(signal.SIGTERM)
    _, err = interrupted.communicate(timeout=120)
    assert interrupted.returncode == 128 + signal.SIGTERM, err
    assert "continue with the same command and --resume" in err
    _, state = load_run_state(tmp_path / "interrupted" / CHECKPOINT_NAME)
    assert 5 <= state["step"] < 60
    assert not (tmp_path / "interrupted" / LOCK_NAME).exists()

    resumed = _finetune_process(folder, tmp_path / "interrupted", "--resume")
    _, err = resumed.communicate(timeout=300)
    assert resumed.returncode == 0, err
    _, err = straight.communicate(timeout=300)
    assert straight.returncode == 0, err
    expected, _ = load_run_state(tmp_path / "straight" / CHECKPOINT_NAME)
    actual, state = load_run_state(tmp_path / "interrupted" / CHECKPOINT_NAME)
    assert state["step"] == 60
    model_keys = [key for key in expected if key.startswith(("model/", "optimizer/"))]
    assert model_keys and all(torch.equal(expected[key], actual[key]) for key in model_keys)
    steps = [json.loads(line)["step"] for line in (tmp_path / "interrupted" / "metrics.jsonl").read_text().splitlines()]
    assert steps == list(range(1, 61))
    assert json.loads((tmp_path / "interrupted" / "report.json").read_text())["per_class_accuracy"].keys() == set(CLASSES)


@pytest.mark.slow
def test_a_signal_during_a_long_step_is_answered_at_once_and_a_second_waits_for_the_save(folder, tmp_path):
    # Steps of several seconds: 256 images at 96 px on one thread.
    command = [sys.executable, "-m", "bigtransfer.cli", "finetune", "--model", "tiny", "--data", str(folder),
               "--output", str(tmp_path / "run"), "--max-steps", "50", "--batch-size", "256", "--batch-split", "1",
               "--resize", "100", "--crop", "96", "--threads", "1", "--no-plots"]
    process = subprocess.Popen(command, env=dict(os.environ, PYTHONUNBUFFERED="1"), stderr=subprocess.PIPE,
                               stdout=subprocess.DEVNULL, text=True)
    lines = []
    for line in process.stderr:  # the first step's progress line: the second step is under way
        lines.append(line)
        if "finetune step 1/50" in line:
            break
    process.send_signal(signal.SIGINT)
    sent = time.monotonic()
    for line in process.stderr:
        lines.append(line)
        if "stopping after this step and saving a checkpoint" in line:
            break
    assert time.monotonic() - sent < 2, "".join(lines)
    _, rest = process.communicate(timeout=300)
    assert process.returncode == 128 + signal.SIGINT, "".join(lines) + rest
    _, state = load_run_state(tmp_path / "run" / CHECKPOINT_NAME)
    assert state["step"] == 2


def test_training_logs_progress_lines_when_stderr_is_not_a_terminal(folder, tmp_path, caplog):
    with caplog.at_level("INFO", logger="bigtransfer"):
        assert main(["finetune", "--model", "tiny", "--data", str(folder), "--output", str(tmp_path / "run"),
                     "--max-steps", "3", "--batch-size", "8", "--resize", "20", "--crop", "16", "--no-plots"]) == 0
    lines = [record.getMessage() for record in caplog.records if "finetune step" in record.getMessage()]
    assert len(lines) == 2 and lines[0].startswith("finetune step 1/3: loss") and lines[1].startswith("finetune step 3/3")
    assert all(" img/s, " in line and line.endswith(" left") for line in lines)


def test_defaults_that_would_take_hours_on_a_cpu_say_so_before_training(folder, tmp_path, caplog):
    class StopAtOnce(Callback):
        def on_train_begin(self, trainer):
            raise KeyboardInterrupt

    with caplog.at_level("INFO", logger="bigtransfer"), pytest.raises(KeyboardInterrupt):
        finetune(FinetuneConfig(model="tiny", data=str(folder), output=tmp_path / "run", device="cpu", resize=512,
                                crop=480, progress=False), callbacks=(StopAtOnce(),))  # the rule's for large images
    assert re.search(r"500 steps of 512 images at 480 px would take roughly \d+ hours on this CPU", caplog.text)
    assert "--resize 72 --crop 64 --batch-size 64 --max-steps 30" in caplog.text


@pytest.mark.skipif(not os.path.isdir(FASHION_MNIST_DIR), reason="apt-get install dataset-fashion-mnist")


@pytest.mark.slow
def test_demo_writes_results_with_tables_plots_and_commands(tmp_path, capsys):
    results = tmp_path / "docs" / "RESULTS.md"
    runs = tmp_path / "runs"
    arguments = ["demo", "--runs-dir", str(runs), "--seeds", "2", "--shots", "1,2", "--upstream-classes", "2,5",
                 "--linear-pool", "5", "--upstream-epochs", "0.01", "--finetune-steps", "2", "--threads", "1"]
    write_up = [sys.executable, str(Path(__file__).parents[1] / "docs" / "make_results.py"), str(runs), str(results)]
    assert main(arguments) == 0
    subprocess.run(write_up, check=True, capture_output=True)
    text = results.read_text()
    assert text.count("| paired margin [95 % CI] | interval above 0 |") == 3  # linear, fine-tuning, digits
    for heading in ("## Few-shot linear evaluation", "## HyperRule fine-tuning", "## Upstream breadth and model width",
                    "## Time taken", "deviations from the rule"):
        assert heading in text
    assert "bigtransfer pretrain --model tiny --data fashion-mnist --classes 0-4" in text
    assert "bigtransfer fewshot --model " in text and "| tiny-wide | 5 |" in text
    for plot in ("transfer_finetune.png", "transfer_linear.png", "transfer_breadth.png"):
        assert (results.parent / plot).read_bytes()[:4] == b"\x89PNG"
    record = json.loads((runs / "results.json").read_text())
    assert len(record["finetune"]["transfer"]["1"]) == 2 and len(record["finetune"]["random init"]["2"]) == 2
    assert set(record["linear"]["fashion-mnist"]) == {"tiny-2classes", "tiny-5classes", "tiny-wide-2classes",
                                                      "tiny-wide-5classes", "random init tiny", "random init tiny-wide"}
    assert all(len(values) == 2 for values in record["linear"]["digits"]["tiny-5classes"].values())
    # A second invocation reuses every finished run and says so.
    assert main(arguments) == 0
    subprocess.run(write_up, check=True, capture_output=True)
    assert "13 finished runs were reused" in results.read_text()  # 4 upstream, the linear protocol, 2 x 2 x 2 fine-tuned


def test_paired_margins_use_the_student_t_interval():
    margin = demo.paired_margin([0.51, 0.62, 0.73], [0.50, 0.60, 0.70])  # differences 1, 2, 3 points
    half = 4.302652729911275 / np.sqrt(3)  # t(0.975, 2 degrees of freedom) x sd 1 / sqrt(3)
    assert margin["mean"] == pytest.approx(2.0) and margin["seeds"] == 3
    assert margin["low"] == pytest.approx(2.0 - half) and margin["high"] == pytest.approx(2.0 + half)
    assert demo.paired_margin([0.5], [0.4])["low"] is None
    with pytest.raises(ValueError, match="same seeds"):
        demo.paired_margin([0.5, 0.6], [0.4])


def test_an_abbreviated_option_is_refused_not_guessed(folder, tmp_path, capsys):
    with pytest.raises(SystemExit) as stopped:
        main(["finetune", "--model", "tiny", "--data", str(folder), "--output", str(tmp_path / "run"), "--max-step", "2"])
    assert stopped.value.code == 2
    error = capsys.readouterr().err
    assert "unrecognized option --max-step" in error and "--max-steps" in error
    assert not (tmp_path / "run").exists()


def test_a_missing_optional_package_is_named_with_its_extra(tmp_path, capsys, monkeypatch):
    from bigtransfer import BitConfig, BitForImageClassification

    BitForImageClassification(BitConfig.from_variant("tiny", num_labels=3)).save_pretrained(tmp_path / "model")
    monkeypatch.setitem(sys.modules, "onnxscript", None)  # as if not installed: importing it raises ImportError
    assert main(["export", "--model", str(tmp_path / "model"), "--output", str(tmp_path / "m.onnx")]) == 1
    assert "ONNX export needs the onnxscript package: pip install 'bigtransfer[onnx]'" in capsys.readouterr().err
    assert not (tmp_path / "m.onnx").exists()
