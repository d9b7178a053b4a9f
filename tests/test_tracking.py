"""--report-to: TensorBoard event files that tensorboard's own reader parses back into metrics.jsonl's numbers
(also across a resume), and the wandb / mlflow adapters against stand-in modules."""

from __future__ import annotations

import sys
import types

import pytest

from bigtransfer.cli import main
from bigtransfer.report import read_metrics, read_report
from bigtransfer.train import finetune, pretrain
from bigtransfer.train.tracking import check_trackers, scalar_name
from conftest import SigtermAfter
from conftest import finetune_config as config
from conftest import upstream_config as upstream

event_accumulator = pytest.importorskip("tensorboard.backend.event_processing.event_accumulator")


def scalars(run_dir) -> dict[str, list[tuple[int, float]]]:
    events = event_accumulator.EventAccumulator(str(run_dir / "tensorboard"))
    events.Reload()
    return {tag: [(event.step, event.value) for event in events.Scalars(tag)] for tag in events.Tags()["scalars"]}


@pytest.mark.slow
def test_tensorboard_holds_the_runs_metrics(folder, tmp_path):
    result = finetune(config(folder, tmp_path / "run", eval_every=3, report_to=("tensorboard",)))
    logged, records = scalars(tmp_path / "run"), read_metrics(tmp_path / "run" / "metrics.jsonl")
    losses = [(r["step"], r["loss"]) for r in records if "loss" in r]
    assert [step for step, _ in logged["train/loss"]] == [step for step, _ in losses] == list(range(1, 7))
    assert [value for _, value in logged["train/loss"]] == pytest.approx([value for _, value in losses], rel=1e-6)
    assert {"train/lr", "train/images_per_second", "train/epoch", "eval/loss"} <= set(logged)
    assert logged["eval/top1"][-1] == (6, pytest.approx(result.report.top1))  # the final evaluation
    events = event_accumulator.EventAccumulator(str(tmp_path / "run" / "tensorboard"), size_guidance={"tensors": 0})
    events.Reload()
    assert "settings" in "".join(events.Tags()["tensors"])


@pytest.mark.slow
def test_tensorboard_after_a_resume_matches_the_uninterrupted_run(tmp_path, monkeypatch):
    pretrain(upstream(tmp_path / "straight", report_to=("tensorboard",)))
    pretrain(upstream(tmp_path / "resumed", report_to=("tensorboard",)), callbacks=(SigtermAfter(3),))
    pretrain(upstream(tmp_path / "resumed", resume=True, report_to=("tensorboard",)))
    straight, resumed = scalars(tmp_path / "straight"), scalars(tmp_path / "resumed")
    for tag in ("train/loss", "fewshot/1shot", "fewshot/5shot", "eval/top1"):
        assert resumed[tag] == straight[tag], tag  # no step twice, the same values


@pytest.mark.slow
def test_wandb_and_mlflow_get_every_record(folder, tmp_path, monkeypatch):
    calls = []
    run = types.SimpleNamespace(log=lambda values, step: calls.append(("wandb", step, values)),
                                finish=lambda: calls.append(("wandb finish",)))
    wandb = types.ModuleType("wandb")
    wandb.init = lambda **kwargs: calls.append(("wandb init", kwargs)) or run
    mlflow = types.ModuleType("mlflow")
    mlflow.set_tracking_uri = lambda uri: calls.append(("mlflow uri", uri))
    mlflow.start_run = lambda run_name: calls.append(("mlflow start", run_name))
    mlflow.log_params = lambda params: calls.append(("mlflow params", params))
    mlflow.log_metrics = lambda values, step: calls.append(("mlflow", step, values))
    mlflow.end_run = lambda: calls.append(("mlflow end",))
    monkeypatch.setitem(sys.modules, "wandb", wandb)
    monkeypatch.setitem(sys.modules, "mlflow", mlflow)
    monkeypatch.delenv("WANDB_MODE", raising=False)
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    result = finetune(config(folder, tmp_path / "run", report_to=("wandb", "mlflow")))
    init = next(call[1] for call in calls if call[0] == "wandb init")
    assert init["mode"] == "offline" and init["dir"] == str(tmp_path / "run") and init["config"]["kind"] == "finetune"
    assert [step for name, step, _ in (c for c in calls if c[0] == "wandb")] == [1, 2, 3, 4, 5, 6, 6]
    assert next(c for c in calls if c[0] == "mlflow uri")[1].startswith("file://")
    last = [c for c in calls if c[0] == "mlflow"][-1]
    assert last[1] == 6 and last[2]["eval.top1"] == pytest.approx(result.report.top1)
    assert calls[-2:] in ([("wandb finish",), ("mlflow end",)],)
    assert read_report(tmp_path / "run" / "report.json").top1 == result.report.top1  # metrics.jsonl stays the truth


def test_trackers_are_checked_before_training(folder, tmp_path, monkeypatch, capsys):
    assert scalar_name("eval_top1") == "eval/top1" and scalar_name("fewshot_5shot") == "fewshot/5shot"
    with pytest.raises(ValueError, match="unknown tracker"):
        check_trackers(["tensorbord"])
    monkeypatch.setitem(sys.modules, "mlflow", None)  # not installed
    assert main(["finetune", "--model", "tiny", "--data", str(folder), "--output", str(tmp_path / "run"),
                 "--report-to", "mlflow", "--max-steps", "1"]) == 1
    assert "--report-to mlflow needs the mlflow package: pip install mlflow" in capsys.readouterr().err
    assert not (tmp_path / "run").exists()


def test_a_tracker_named_twice_logs_each_point_once(folder, tmp_path):
    finetune(config(folder, tmp_path / "run", report_to=("tensorboard", "tensorboard")))
    assert len(list((tmp_path / "run" / "tensorboard").glob("events.out.tfevents.*"))) == 1
    assert [step for step, _ in scalars(tmp_path / "run")["train/loss"]] == list(range(1, 7))
