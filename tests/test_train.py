"""The training library: HyperRule schedule and head, micro-batching, resume, locks, failures, reports.

Everything runs the `tiny` variant on 16x16 images for a handful of steps.
"""

from __future__ import annotations

import json
import math
import os
import signal
import socket
import subprocess
import sys

import numpy as np
import pytest
import torch
from PIL import Image

import bigtransfer.train.loop
from bigtransfer import BitForImageClassification, hyperrule
from bigtransfer.data import BadImageError
from bigtransfer.files import atomic_path
from bigtransfer.inference import DataSelection, evaluate, extract_features, predict
from bigtransfer.inference.evaluate import label_map
from bigtransfer.precision import precision_autocast
from bigtransfer.report import EvaluationReport, read_metrics
from bigtransfer.train import (
    CHECKPOINT_NAME,
    LOCK_NAME,
    BatchPlan,
    FinetuneConfig,
    NonFiniteLossError,
    PretrainConfig,
    RunLockedError,
    finetune,
    load_run_state,
    pretrain,
    run_dir,
)
from bigtransfer.train.recipe import Recipe, cross_entropy_sum, is_random_init, training_model
from bigtransfer.train.run_dir import remove_stale_temporaries
from conftest import CLASSES, SigtermAfter, make_image_folder
from conftest import finetune_config as config


def weights(run_dir) -> dict[str, torch.Tensor]:
    tensors, _ = load_run_state(run_dir / CHECKPOINT_NAME)
    return {key: value for key, value in tensors.items() if key.startswith("model/")}


# ---------------------------------------------------------------------------------------------------------------
# Which examples each step sees.


def test_batch_plan_epochs_are_permutations_and_shards_tile_the_global_batch():
    plan = BatchPlan(10, batch_size=4, seed=3)
    stream = [key for step in range(5) for key in plan.global_batch(step)]  # 20 items = 2 epochs
    for epoch in (0, 1):
        assert sorted(position for e, position in stream if e == epoch) == list(range(10))
    assert plan.permutation(0).tolist() != plan.permutation(1).tolist()
    assert BatchPlan(10, 4, seed=4).permutation(0).tolist() != plan.permutation(0).tolist()
    ranks = [BatchPlan(10, 4, seed=3, world_size=2, rank=rank, batch_split=2) for rank in (0, 1)]
    for step in range(5):
        shards = [key for shard in ranks for micro in shard.micro_batches(step) for key in micro]
        assert shards == plan.global_batch(step)
        assert all(len(micro) == 1 for micro in ranks[0].micro_batches(step))


def test_batch_plan_rejects_a_batch_that_does_not_split():
    with pytest.raises(ValueError, match="divisible"):
        BatchPlan(10, batch_size=6, seed=0, world_size=2, batch_split=2)


# ---------------------------------------------------------------------------------------------------------------
# Fine-tuning: outputs and the HyperRule.


@pytest.mark.slow
def test_finetune_writes_a_complete_run_directory(folder, tmp_path):
    result = finetune(config(folder, tmp_path / "run", plots=True))
    run = tmp_path / "run"
    records = read_metrics(run / "metrics.jsonl")
    assert [r["step"] for r in records] == list(range(1, 7))
    assert {"step", "loss", "lr", "images_per_second"} <= set(records[0])
    # The rule's 500-step schedule [100, 200, 300, 400, 500] scaled to 6 steps: warmup 1.2 steps, then decays.
    expected = [hyperrule.lr(step * 500 / 6, 24, 0.01) for step in range(6)]
    assert [r["lr"] for r in records] == pytest.approx(expected)
    assert records[0]["lr"] == 0.0
    report = json.loads((run / "report.json").read_text())
    assert set(report) >= {"top1", "top5", "loss", "per_class_accuracy", "confusion_matrix", "skipped_images"}
    assert list(report["per_class_accuracy"]) == list(CLASSES)
    assert np.asarray(report["confusion_matrix"]).sum() == report["num_images"] == 6  # 20 % of 30 images
    for name in ("loss.png", "lr.png", "accuracy.png", "confusion_matrix.png"):
        assert (run / name).read_bytes()[:4] == b"\x89PNG"
    model = BitForImageClassification.from_pretrained(run / "model")
    assert model.config.id2label == dict(enumerate(CLASSES))
    processor = json.loads((run / "model" / "preprocessor_config.json").read_text())
    assert processor["crop_size"] == {"height": 16, "width": 16}
    assert result.report.top1 == report["top1"] and result.steps == 6
    assert not (run / LOCK_NAME).exists()


@pytest.mark.slow
def test_finetune_replaces_the_head_with_zeros_even_when_its_shape_fits(folder, tmp_path):
    finetune(config(folder, tmp_path / "first"))
    head = BitForImageClassification.from_pretrained(tmp_path / "first" / "model").classifier[1]
    assert head.weight.abs().sum() > 0  # trained
    model, _, _ = training_model(str(tmp_path / "first" / "model"), list(CLASSES), seed=0, fine_tune=True)
    assert model.classifier[1].weight.abs().sum() == 0 and model.classifier[1].bias.abs().sum() == 0
    backbone = BitForImageClassification.from_pretrained(tmp_path / "first" / "model").bit.state_dict()
    assert all(torch.equal(value, model.bit.state_dict()[key]) for key, value in backbone.items())


@pytest.mark.slow
def test_batch_split_gives_the_same_weights(folder, tmp_path):
    finetune(config(folder, tmp_path / "whole", batch_split=1))
    finetune(config(folder, tmp_path / "split", batch_split=4))
    whole, split = weights(tmp_path / "whole"), weights(tmp_path / "split")
    for key, value in whole.items():
        torch.testing.assert_close(split[key], value, rtol=1e-5, atol=1e-6)


@pytest.mark.slow
def test_compiled_run_trains_the_same_model_and_saves_it_loadably(folder, tmp_path):
    eager = finetune(config(folder, tmp_path / "eager", max_steps=3, batch_split=1))
    compiled = finetune(config(folder, tmp_path / "compiled", max_steps=3, batch_split=1, compile=True))
    for key, value in weights(tmp_path / "eager").items():
        torch.testing.assert_close(weights(tmp_path / "compiled")[key], value, rtol=1e-3, atol=1e-5)
    assert compiled.report.top1 == eager.report.top1
    loaded = BitForImageClassification.from_pretrained(compiled.model_dir)  # no compiler names in the saved keys
    assert set(loaded.state_dict()) == set(BitForImageClassification.from_pretrained(eager.model_dir).state_dict())


def test_mixup_draws_one_lambda_per_optimizer_step(folder, tmp_path, monkeypatch):
    calls = []
    original = bigtransfer.train.loop.mixup_lambda

    def recording(seed, step, alpha):
        calls.append(step)
        return original(seed, step, alpha)

    monkeypatch.setattr(bigtransfer.train.loop, "mixup_lambda", recording)
    finetune(config(folder, tmp_path / "run", batch_split=2, mixup_alpha=0.1, max_steps=4))
    assert calls == [0, 1, 2, 3]
    assert original(0, 5, 0.1) == original(0, 5, 0.1) and 0 < original(0, 5, 0.1) < 1
    assert original(0, 5, 0.0) is None


def test_shots_picks_that_many_examples_per_class(folder, tmp_path):
    finetune(config(folder, tmp_path / "run", shots=2))
    description = json.loads((tmp_path / "run" / "run.json").read_text())
    assert description["examples"] == 6


def test_freeze_backbone_trains_only_the_head(folder, tmp_path):
    finetune(config(folder, tmp_path / "base"))
    finetune(config(folder, tmp_path / "probe", model=str(tmp_path / "base" / "model"), freeze_backbone=True))
    before = BitForImageClassification.from_pretrained(tmp_path / "base" / "model").state_dict()
    after = BitForImageClassification.from_pretrained(tmp_path / "probe" / "model").state_dict()
    assert all(torch.equal(after[key], before[key]) for key in before if key.startswith("bit."))
    assert after["classifier.1.weight"].abs().sum() > 0


@pytest.mark.slow
def test_different_seeds_give_different_runs_and_equal_seeds_equal_runs(folder, tmp_path):
    finetune(config(folder, tmp_path / "a", seed=1))
    finetune(config(folder, tmp_path / "b", seed=1))
    finetune(config(folder, tmp_path / "c", seed=2))
    a, b, c = (weights(tmp_path / name) for name in "abc")
    assert all(torch.equal(a[key], b[key]) for key in a)
    assert not all(torch.equal(a[key], c[key]) for key in a)


# ---------------------------------------------------------------------------------------------------------------
# Resilience.


@pytest.mark.slow
def test_signal_mid_run_checkpoints_and_resume_is_bit_exact(folder, tmp_path, monkeypatch):
    finetune(config(folder, tmp_path / "straight", max_steps=8))
    stopped = finetune(config(folder, tmp_path / "resumed", max_steps=8), callbacks=(SigtermAfter(3),))
    assert stopped.interrupted == signal.SIGTERM and stopped.steps == 4 and stopped.report is None
    assert not (tmp_path / "resumed" / "model").exists()
    finished = finetune(config(folder, tmp_path / "resumed", max_steps=8, resume=True))
    assert finished.steps == 8 and finished.interrupted is None
    straight, resumed = weights(tmp_path / "straight"), weights(tmp_path / "resumed")
    assert all(torch.equal(straight[key], resumed[key]) for key in straight)
    assert [r["step"] for r in read_metrics(tmp_path / "resumed" / "metrics.jsonl")] == list(range(1, 9))


@pytest.mark.slow
def test_resume_refuses_changed_settings_and_a_rerun_refuses_to_overwrite(folder, tmp_path):
    finetune(config(folder, tmp_path / "run", save_every=2))
    with pytest.raises(ValueError, match="already holds a run"):
        finetune(config(folder, tmp_path / "run"))
    with pytest.raises(ValueError, match=r"settings differ.*base_lr"):
        finetune(config(folder, tmp_path / "run", base_lr=0.1, resume=True))
    again = finetune(config(folder, tmp_path / "run", resume=True))  # finished: nothing left to train
    assert again.steps == 6


def test_non_finite_loss_stops_and_keeps_the_last_good_checkpoint(folder, tmp_path, monkeypatch):
    original = Recipe.loss_sum
    calls = []

    def exploding(recipe, logits, labels, mix):
        calls.append(1)
        loss = original(recipe, logits, labels, mix)
        return loss * math.nan if len(calls) > 3 else loss

    monkeypatch.setattr(Recipe, "loss_sum", exploding)
    with pytest.raises(NonFiniteLossError, match=r"loss became nan at step 4.*last good checkpoint"):
        finetune(config(folder, tmp_path / "run", save_every=2))
    _, state = load_run_state(tmp_path / "run" / CHECKPOINT_NAME)
    assert state["step"] == 2
    assert not (tmp_path / "run" / LOCK_NAME).exists()


@pytest.mark.slow
def test_a_live_lock_refuses_a_second_run_and_a_dead_ones_is_taken_over(folder, tmp_path):
    run = tmp_path / "run"
    run.mkdir()
    sleeper = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        (run / LOCK_NAME).write_text(f"{sleeper.pid} {socket.gethostname()}\n")
        with pytest.raises(RunLockedError, match=f"in use by process {sleeper.pid}"):
            finetune(config(folder, run))
    finally:
        sleeper.kill()
        sleeper.wait()
    finetune(config(folder, run))  # the lock's owner is dead now
    assert not (run / LOCK_NAME).exists()


@pytest.mark.slow
def test_a_run_removes_the_temporaries_a_killed_write_left_once_it_holds_the_lock(folder, tmp_path):
    run = tmp_path / "run"
    finetune(config(folder, run))
    checkpoint = (run / CHECKPOINT_NAME).read_bytes()
    # What a SIGKILL in the middle of `save_checkpoint` (or of run.json, metrics.jsonl) leaves behind.
    stale = [run / f".{CHECKPOINT_NAME}.k1ll_3d0.tmp", run / ".run.json.a0b1c2d3.tmp",
             run / ".metrics.jsonl.zz_9y8x7.tmp"]
    stale[0].write_bytes(checkpoint[: len(checkpoint) // 2])
    # Not this run's temporaries: `bigtransfer evaluate --output` writes report.json without the lock, and
    # nothing outside the run directory itself is touched.
    # (model/ itself is the run's own output and is replaced as a whole, so the sample sits in a sub-folder.)
    kept = [run / ".report.json.a0b1c2d3.tmp", run / f".{CHECKPOINT_NAME}.tmp",
            run / f"{CHECKPOINT_NAME}.a0b1c2d3.tmp", run / "eval" / f".{CHECKPOINT_NAME}.a0b1c2d3.tmp"]
    (run / "eval").mkdir()
    for path in stale[1:] + kept:
        path.write_text("partial")

    again = finetune(config(folder, run, resume=True))
    assert again.steps == 6
    assert not [path for path in stale if path.exists()]
    assert all(path.exists() for path in kept)
    assert (run / CHECKPOINT_NAME).read_bytes() == checkpoint
    _, state = load_run_state(run / CHECKPOINT_NAME)
    assert state["step"] == 6


def test_the_sweep_recognises_the_temporary_atomic_path_creates(tmp_path):
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    with atomic_path(tmp_path / CHECKPOINT_NAME) as temporary:
        os.link(temporary, elsewhere / temporary.name)  # the name a write killed now would leave
    assert remove_stale_temporaries(elsewhere, [CHECKPOINT_NAME]) == [elsewhere / temporary.name]
    assert not list(elsewhere.iterdir())


def test_out_of_memory_suggests_batch_split(folder, tmp_path, monkeypatch):
    def out_of_memory(*args):
        raise torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")

    monkeypatch.setattr(Recipe, "loss_sum", out_of_memory)
    with pytest.raises(RuntimeError, match=r"--batch-split \(e\.g\. 2\)"):
        finetune(config(folder, tmp_path / "run"))


@pytest.mark.slow
def test_unreadable_images_fail_or_are_skipped_and_listed(tmp_path):
    data = make_image_folder(tmp_path / "images", per_class=5)
    broken = data / "square" / "broken.png"
    broken.write_bytes(b"\x89PNG not really")
    with pytest.raises(BadImageError, match="broken.png"):
        finetune(config(data, tmp_path / "fail", max_steps=4))
    result = finetune(config(data, tmp_path / "skip", max_steps=4, on_bad_image="skip"))
    assert str(broken) in result.report.skipped_images
    assert str(broken) in json.loads((tmp_path / "skip" / "report.json").read_text())["skipped_images"]


# ---------------------------------------------------------------------------------------------------------------
# Pre-training, evaluation, features, prediction.


@pytest.mark.slow
def test_pretrain_follows_the_upstream_recipe(folder, tmp_path):
    result = pretrain(PretrainConfig(model="tiny", data=str(folder), output=tmp_path / "up", batch_size=8,
                                     max_steps=10, warmup_steps=2, resize=20, crop=16, loss="sigmoid",
                                     progress=False, plots=False))
    records = read_metrics(tmp_path / "up" / "metrics.jsonl")
    peak = 0.03 * 8 / 256
    assert [r["lr"] for r in records] == pytest.approx(
        [0, peak / 2, peak, peak, peak / 10, peak / 10, peak / 10, peak / 100, peak / 100, peak / 1000]
    )
    assert json.loads((tmp_path / "up" / "run.json").read_text())["weight_decay"] == 1e-4
    # Sigmoid cross-entropy sums over the 3 classes (about 3 log 2 at init); softmax would start near log 3.
    assert records[0]["loss"] > 1.8
    zeros = torch.zeros(4, 3)
    assert cross_entropy_sum(zeros, torch.tensor([0, 1, 2, 0]), "sigmoid").item() == pytest.approx(4 * 3 * math.log(2))
    assert cross_entropy_sum(zeros, torch.tensor([0, 1, 2, 0]), "softmax").item() == pytest.approx(4 * math.log(3))
    assert result.report.num_images == 6


def test_a_runs_report_and_evaluate_of_its_saved_model_see_the_same_pixels(tmp_path):
    # Real photos as JPEGs larger than the crop, so both read them at the same reduced scale.
    import skimage.data

    names = ("astronaut", "chelsea", "coffee", "rocket")
    for label, name in enumerate(names):
        photo = Image.fromarray(getattr(skimage.data, name)()).convert("RGB")
        for index in range(5):
            (tmp_path / "photos" / name).mkdir(parents=True, exist_ok=True)
            photo.rotate(20 * index).resize((96 + 8 * label, 80)).save(tmp_path / "photos" / name / f"{index}.jpg")
    run = finetune(config(tmp_path / "photos", tmp_path / "run", max_steps=3, resize=28, crop=24, batch_size=8))
    again = evaluate(run.model_dir, DataSelection(str(tmp_path / "photos"), split="test"), batch_size=32)
    assert again.num_images == run.report.num_images == 4
    assert again.confusion_matrix == run.report.confusion_matrix and again.top5 == run.report.top5
    assert again.loss == run.report.loss  # the same pixels through the same model: the same numbers


@pytest.mark.slow
def test_evaluate_features_and_predict_use_the_saved_model(folder, tmp_path):
    result = finetune(config(folder, tmp_path / "run", max_steps=10))
    model_dir = tmp_path / "run" / "model"
    report = evaluate(model_dir, DataSelection(str(folder), split="test"))  # the images the run held out
    assert report.top1 == pytest.approx(result.report.top1)
    assert report.loss == pytest.approx(result.report.loss, rel=1e-4)
    features, labels = extract_features(model_dir, DataSelection(str(folder), split="test"))
    assert features.shape == (6, 512) and features.dtype == np.float32
    assert labels.tolist() == [0, 0, 1, 1, 2, 2]
    images = [folder / "circle" / "0.png", folder / "stripes" / "1.png"]
    predictions = predict(model_dir, images, top_k=2)
    assert [len(p) for p in predictions] == [2, 2]
    for top in predictions:
        assert top[0][1] >= top[1][1] and {label for label, _ in top} <= set(CLASSES)


def test_evaluation_report_metrics():
    topk = np.array([[0, 1], [1, 0], [1, 2], [2, 0]])
    report = EvaluationReport.from_predictions(topk, np.array([0, 0, 1, 2]), np.array([1.0, 2.0, 3.0, 2.0]),
                                               ["a", "b", "c"], skipped_images=["x.png"])
    assert report.top1 == 0.75 and report.loss == 2.0
    assert report.top5 is None and "top-5" not in report.summary()  # 3 classes: every label is in the top 5
    assert report.per_class_accuracy == {"a": 0.5, "b": 1.0, "c": 1.0}
    assert report.confusion_matrix == [[1, 1, 0], [0, 1, 0], [0, 0, 1]]
    assert "1 unreadable skipped" in report.summary()
    topk = np.array([[1, 2, 3, 4, 0, 5], [5, 0, 1, 2, 3, 4], [1, 2, 3, 4, 5, 0], [1, 2, 3, 4, 5, 0]])
    six = EvaluationReport.from_predictions(topk, np.array([0, 5, 0, 1]), np.ones(4), list("abcdef"))
    assert six.top1 == 0.5 and six.top5 == 0.75 and "top-5 75.00 %" in six.summary()


def test_model_names_choose_between_random_init_and_pretrained_weights(tmp_path):
    # Fine-tuning: Google's checkpoint names mean their weights (as in the original code); variants build at random.
    assert not is_random_init("BiT-M-R50x1", google_names_are_weights=True)
    assert not is_random_init("BiT-S-R101x3-ILSVRC2012", google_names_are_weights=True)
    assert is_random_init("tiny", google_names_are_weights=True)
    assert is_random_init("R50x1", google_names_are_weights=True)
    # Pre-training starts from scratch whatever the name.
    assert is_random_init("BiT-M-R50x1", google_names_are_weights=False)
    # An existing path is always loaded, and an unknown name is not a variant.
    (tmp_path / "tiny").mkdir()
    assert not is_random_init(str(tmp_path / "tiny"), google_names_are_weights=False)
    assert not is_random_init("no-such-model", google_names_are_weights=True)


def test_resume_restores_cuda_generators_in_device_order(monkeypatch):
    # Machines with more than 10 GPUs: "rng/cuda/10" must not be given to device 2.
    tensors, plain = run_dir._rng_state()
    for index in range(12):
        tensors[f"rng/cuda/{index}"] = torch.full((4,), index, dtype=torch.uint8)
    restored = []
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 12)
    monkeypatch.setattr(torch.cuda, "set_rng_state_all", lambda states: restored.extend(int(s[0]) for s in states))
    run_dir._set_rng_state(tensors, plain)
    assert restored == list(range(12))


def test_class_names_that_match_nothing_are_matched_by_index_with_a_warning(caplog):
    assert label_map(["cat", "dog"], ["dog", "cat"]).tolist() == [1, 0]  # by name
    with caplog.at_level("WARNING", logger="bigtransfer"):
        assert label_map(["a", "b"], ["LABEL_0", "LABEL_1"]) is None  # a generic head: by index, quietly
    assert not caplog.records
    with caplog.at_level("WARNING", logger="bigtransfer"):
        assert label_map(["a", "b"], ["cat", "dog"]) is None
    assert "matching classes by index (a -> cat, b -> dog, ...)" in caplog.text


@pytest.mark.parametrize("run, field, value, match", [
    (finetune, "base_lr", math.nan, "base_lr must be a finite number > 0, got nan"),
    (finetune, "base_lr", math.inf, "base_lr must be a finite number > 0, got inf"),
    (finetune, "mixup_alpha", -1.0, "mixup_alpha must be a finite number >= 0, got -1.0"),
    (pretrain, "weight_decay", math.nan, "weight_decay must be a finite number >= 0, got nan"),
    (pretrain, "epochs", math.nan, "epochs must be a finite number > 0, got nan"),
])
def test_numbers_that_would_poison_training_are_refused_before_it_starts(tmp_path, run, field, value, match):
    # NaN passes `<= 0` checks: before, these surfaced steps later as a NaN loss blamed on the learning rate.
    settings = FinetuneConfig if run is finetune else PretrainConfig
    with pytest.raises(ValueError, match=match):
        run(settings(model="tiny", data="digits", output=tmp_path / "run", max_steps=None, **{field: value}))
    assert not (tmp_path / "run").exists()


def test_precision_settings_on_a_cpu():
    cpu = torch.device("cpu")
    a = torch.randn(4, 4)
    with precision_autocast(cpu, "bf16"):  # was silently float32 on CPUs
        assert torch.mm(a, a).dtype == torch.bfloat16
    for precision in ("auto", "fp32"):
        with precision_autocast(cpu, precision):
            assert torch.mm(a, a).dtype == torch.float32
    with pytest.raises(ValueError, match="precision fp16 needs a GPU"):
        precision_autocast(cpu, "fp16")
