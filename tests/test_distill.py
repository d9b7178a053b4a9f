"""Distillation by function matching (`bigtransfer distill`): the loss, consistent views, frozen teachers,
ensembles, resolutions, resume, torchrun and the saved student. Tiny models on 16-24 px images, a few steps."""

from __future__ import annotations

import hashlib
import json
import signal

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from bigtransfer import BitConfig, BitForImageClassification
from bigtransfer.cli import main
from bigtransfer.data.transforms import InceptionCropTransform
from bigtransfer.report import read_metrics
from bigtransfer.train import CHECKPOINT_NAME, Callback, DistillConfig, distill, load_run_state
from bigtransfer.train.distillation import Teachers, kl_divergence_sum, load_teachers
from conftest import CLASSES, SigtermAfter, torchrun_cli


def save_teacher(path, seed: int, mean=None):
    """A random `tiny` classifier of the folder's classes, saved as an ordinary model directory."""
    torch.manual_seed(seed)
    model = BitForImageClassification(BitConfig.from_variant(
        "tiny", num_labels=len(CLASSES), id2label=dict(enumerate(CLASSES)), label2id={c: i for i, c in enumerate(CLASSES)}))
    model.save_pretrained(path)
    if mean is not None:
        (path / "preprocessor_config.json").write_text(json.dumps(dict(image_mean=mean, image_std=[0.25, 0.25, 0.25])))
    return path


@pytest.fixture(scope="module")
def teachers(tmp_path_factory):
    root = tmp_path_factory.mktemp("teachers")
    return save_teacher(root / "a", 1), save_teacher(root / "b", 2, mean=[0.4, 0.45, 0.5])


def config(folder, output, teacher, **overrides) -> DistillConfig:
    values = dict(teacher=teacher if isinstance(teacher, list) else str(teacher), student="tiny", data=str(folder), output=output, batch_size=8, max_steps=4,
                  crop=16, preset="pets-fast", batch_split=1, progress=False, plots=False)
    values.update(overrides)
    return DistillConfig(**values)


def student_weights(run_dir) -> dict[str, torch.Tensor]:
    tensors, _ = load_run_state(run_dir / CHECKPOINT_NAME)
    return {key: value for key, value in tensors.items() if key.startswith("model/")}


class CaptureInputs(Callback):
    """Keeps what the student and the first teacher receive in the first training step, and the teachers'
    weights before and after the run."""

    def on_train_begin(self, trainer):
        self.student, self.teacher = [], []
        self.teacher_modules = [model.model for model in trainer.recipe.teachers.models]
        self.before = [{k: v.clone() for k, v in m.state_dict().items()} for m in self.teacher_modules]
        self.hooks = [
            trainer.model.register_forward_pre_hook(lambda _, args: self.student.append(args[0].detach().clone())),
            self.teacher_modules[0].register_forward_pre_hook(lambda _, args: self.teacher.append(args[0].clone())),
        ]

    def on_step_end(self, trainer, step, loss, lr, images_per_second):
        for hook in self.hooks if step == 1 else ():
            hook.remove()

    def on_train_end(self, trainer):
        self.after = [{k: v.clone() for k, v in m.state_dict().items()} for m in self.teacher_modules]
        self.requires_grad = [p.requires_grad for m in self.teacher_modules for p in m.parameters()]
        self.grads = [p.grad for m in self.teacher_modules for p in m.parameters()]


# ---------------------------------------------------------------------------------------------------------------
# The loss.


@pytest.mark.parametrize("temperature", [1.0, 3.0])
def test_kl_at_temperature_equals_a_numpy_reference(temperature):
    rng = np.random.default_rng(0)
    student, teacher = rng.normal(size=(5, 7)) * 3, rng.normal(size=(5, 7)) * 3

    def softmax(x):
        e = np.exp(x - x.max(-1, keepdims=True))
        return e / e.sum(-1, keepdims=True)

    p, q = softmax(teacher / temperature), softmax(student / temperature)
    expected = temperature**2 * (p * (np.log(p) - np.log(q))).sum()
    actual = kl_divergence_sum(torch.tensor(student), torch.tensor(p), temperature)
    assert actual.item() == pytest.approx(expected, rel=1e-5)
    assert kl_divergence_sum(torch.tensor(teacher), torch.tensor(p), temperature).item() == pytest.approx(0, abs=1e-5)


def test_an_ensemble_is_the_mean_of_its_teachers_softmaxes(teachers):
    models, means, stds, classes = load_teachers([str(t) for t in teachers], torch.device("cpu"), "fp32", False)
    assert classes == list(CLASSES)
    ensemble = Teachers(models, means, stds, 16, (0.5, 0.5, 0.5), (0.5, 0.5, 0.5))
    images = torch.randn(4, 3, 16, 16, generator=torch.Generator().manual_seed(0))  # normalised as [-1, 1]
    expected = 0
    for teacher, mean in zip(teachers, ([0.5] * 3, [0.4, 0.45, 0.5]), strict=True):
        std = 0.5 if mean == [0.5] * 3 else 0.25
        pixels = images * 0.5 + 0.5  # the images in [0, 1], normalised as each teacher was trained
        own = (pixels - torch.tensor(mean).view(1, 3, 1, 1)) / std
        with torch.no_grad():
            expected = expected + F.softmax(BitForImageClassification.from_pretrained(teacher).eval()(own).logits, -1) / 2
    torch.testing.assert_close(ensemble.probabilities(images), expected, rtol=1e-4, atol=1e-5)


def test_inception_crop_covers_5_to_100_percent_at_aspect_3_4_to_4_3():
    transform = InceptionCropTransform(16)
    generator = torch.Generator().manual_seed(0)
    windows = [transform.window(200, 300, generator) for _ in range(300)]
    areas = np.array([h * w / (200 * 300) for _, _, h, w in windows])
    ratios = np.array([w / h for _, _, h, w in windows])
    assert areas.min() >= 0.045 and areas.max() <= 1.0 and areas.max() > 0.8 and areas.min() < 0.1
    assert ratios.min() >= 0.74 and ratios.max() <= 1.35
    assert all(0 <= top <= 200 - h and 0 <= left <= 300 - w for top, left, h, w in windows)


# ---------------------------------------------------------------------------------------------------------------
# Consistent teaching, frozen teachers, resolutions.


def test_teacher_and_student_see_the_same_crop_flip_and_mix_and_the_teacher_stays_frozen(folder, teachers, tmp_path):
    files = {path.name: hashlib.sha256(path.read_bytes()).hexdigest() for path in teachers[0].iterdir()}
    capture = CaptureInputs()
    result = distill(config(folder, tmp_path / "run", teachers[0]), callbacks=(capture,))
    assert len(capture.student) == len(capture.teacher) == 1  # one micro-batch of step 1
    student, teacher = capture.student[0], capture.teacher[0]
    assert student.shape == (8, 3, 16, 16)
    torch.testing.assert_close(teacher, student, rtol=0, atol=0)
    # Frozen: same weights, no gradient, and the teacher's files untouched.
    for before, after in zip(capture.before, capture.after, strict=True):
        assert all(torch.equal(before[key], after[key]) for key in before)
    assert not any(capture.requires_grad) and all(grad is None for grad in capture.grads)
    assert {path.name: hashlib.sha256(path.read_bytes()).hexdigest() for path in teachers[0].iterdir()} == files
    # The teacher is not part of the checkpoint: only the student (and its optimizer).
    tensors, state = load_run_state(tmp_path / "run" / CHECKPOINT_NAME)
    assert state["kind"] == "distill" and len(student_weights(tmp_path / "run")) == len(
        BitForImageClassification(BitConfig.from_variant("tiny", num_labels=3)).state_dict())
    metrics = result.report.metrics
    assert set(metrics) >= {"teacher_top1", "agreement_top1", "kl", "teacher_seconds_per_step",
                            "student_seconds_per_step"}
    assert 0 <= metrics["agreement_top1"] <= 1 and metrics["kl"] > 0
    records = read_metrics(tmp_path / "run" / "metrics.jsonl")
    assert all(r["teacher_seconds"] >= 0 and r["student_seconds"] > 0 for r in records)


@pytest.mark.parametrize("views", ["independent", "fixed"])
def test_the_papers_baselines_show_the_teacher_another_view(folder, teachers, tmp_path, views):
    capture = CaptureInputs()
    distill(config(folder, tmp_path / views, teachers[0], max_steps=1, teacher_views=views), callbacks=(capture,))
    student, teacher = capture.student[0], capture.teacher[0]
    assert student.shape == teacher.shape and not torch.equal(student, teacher)
    if views == "fixed":  # the un-augmented image, unmixed: each is one of the folder's 16 px images, squashed
        pixels = (teacher + 1) / 2 * 255
        assert torch.allclose(pixels, pixels.round(), atol=1e-3)


def test_a_teacher_at_its_own_resolution_sees_the_students_view_at_that_resolution(folder, teachers, tmp_path):
    capture = CaptureInputs()
    distill(config(folder, tmp_path / "run", teachers[0], max_steps=1, teacher_crop=24), callbacks=(capture,))
    student, teacher = capture.student[0], capture.teacher[0]
    assert student.shape == (8, 3, 16, 16) and teacher.shape == (8, 3, 24, 24)
    expected = F.interpolate(teacher, size=(16, 16), mode="bilinear", antialias=True, align_corners=False)
    torch.testing.assert_close(student, expected, rtol=0, atol=1e-6)


@pytest.mark.slow
def test_adam_warmup_and_cosine_schedule_with_decay_on_kernels_only(folder, teachers, tmp_path):
    distill(config(folder, tmp_path / "run", teachers[0], max_steps=5, lr=0.002, weight_decay=1e-3, warmup_steps=2))
    rates = [r["lr"] for r in read_metrics(tmp_path / "run" / "metrics.jsonl")]
    cosine = [0.002 * 0.5 * (1 + np.cos(np.pi * k / 3)) for k in range(3)]
    np.testing.assert_allclose(rates, [0.0, 0.001, *cosine], rtol=1e-12)
    tensors, state = load_run_state(tmp_path / "run" / CHECKPOINT_NAME)
    groups = state["optimizer"]["param_groups"]
    # big_vision's wd is not multiplied by the lr: AdamW's decay lr x wd equals schedule x 1e-3 on the kernels.
    assert [group["weight_decay"] for group in groups] == [pytest.approx(1e-3 / 0.002), 0.0]
    assert "optimizer/0/exp_avg_sq" in tensors and len(groups[0]["params"]) > 0 and len(groups[1]["params"]) > 0


# ---------------------------------------------------------------------------------------------------------------
# The run: ensemble, resume, torchrun, the saved student.


@pytest.mark.slow
def test_signal_then_resume_is_bit_exact_with_an_ensemble(folder, teachers, tmp_path):
    sources = [str(t) for t in teachers]
    straight = distill(config(folder, tmp_path / "straight", sources, eval_every=2))
    stopped = distill(config(folder, tmp_path / "resumed", sources, eval_every=2), callbacks=(SigtermAfter(1),))
    assert stopped.interrupted == signal.SIGTERM and stopped.steps == 2
    resumed = distill(config(folder, tmp_path / "resumed", sources, eval_every=2, resume=True))
    one, two = student_weights(tmp_path / "straight"), student_weights(tmp_path / "resumed")
    assert all(torch.equal(one[key], two[key]) for key in one)
    assert resumed.report.metrics["kl"] == straight.report.metrics["kl"]
    evaluations = [r for r in read_metrics(tmp_path / "resumed" / "metrics.jsonl") if "kl" in r]
    assert [r["step"] for r in evaluations] == [2]
    with pytest.raises(ValueError, match="settings differ"):
        distill(config(folder, tmp_path / "resumed", sources, eval_every=2, resume=True, temperature=2))


@pytest.mark.slow
def test_the_student_is_an_ordinary_model_directory_transformers_loads(folder, teachers, tmp_path):
    transformers = pytest.importorskip("transformers")
    result = distill(config(folder, tmp_path / "run", teachers[0], max_steps=2))
    ours = BitForImageClassification.from_pretrained(result.model_dir).eval()
    theirs = transformers.BitForImageClassification.from_pretrained(result.model_dir).eval()
    assert ours.config.width_factor == 1 and theirs.config.id2label == dict(enumerate(CLASSES))
    images = torch.randn(2, 3, 16, 16, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        torch.testing.assert_close(theirs(images).logits, ours(images).logits, rtol=1e-4, atol=1e-5)


def test_a_teacher_with_other_classes_is_refused_naming_both(folder, tmp_path):
    torch.manual_seed(0)
    other = BitForImageClassification(BitConfig.from_variant("tiny", num_labels=4))
    other.save_pretrained(tmp_path / "four")
    with pytest.raises(ValueError, match="predicts 4 classes.*--data has 3"):
        distill(config(folder, tmp_path / "run", tmp_path / "four"))


@pytest.mark.slow
def test_the_command_documents_the_paper_and_runs(folder, teachers, tmp_path, capsys):
    with pytest.raises(SystemExit):
        main(["distill", "--help"])
    help_text = " ".join(capsys.readouterr().out.split())
    for words in ("at temperature 1 with no label term", "imagenet (lr 0.03, wd 0.0003, T 1, 1200 epochs, batch 4096",
                  "fixed (the teacher sees the un-augmented image", "independent (teacher and student get separate"):
        assert words in help_text, words
    assert "--resize" not in help_text
    code = main(["distill", "--teacher", str(teachers[0]), "--student", "tiny", "--data", str(folder), "--output",
                 str(tmp_path / "cli"), "--batch-size", "8", "--max-steps", "2", "--crop", "16", "--preset",
                 "pets-fast", "--no-progress", "--no-plots"])
    assert code == 0
    report = json.loads((tmp_path / "cli" / "report.json").read_text())
    assert report["metrics"]["teacher_top1"] >= 0


@pytest.mark.slow
def test_two_processes_match_one_process_with_the_same_global_batch(folder, teachers, tmp_path):
    command = ["distill", "--teacher", str(teachers[0]), "--student", "tiny", "--data", str(folder), "--batch-size",
               "8", "--max-steps", "4", "--crop", "16", "--teacher-crop", "20", "--preset", "pets-fast", "--seed", "3",
               "--no-progress", "--no-plots", "--device", "cpu"]
    # MixUp pairs images within a micro-batch: one process in two micro-batches pairs them as two processes do.
    assert main([*command, "--output", str(tmp_path / "one"), "--batch-split", "2"]) == 0
    torchrun_cli([[*command, "--output", str(tmp_path / "two"), "--batch-split", "1"]], tmp_path)
    one, two = student_weights(tmp_path / "one"), student_weights(tmp_path / "two")
    for key in one:  # Adam divides by the root of small second moments: all-reduce rounding shows at ~1e-5
        torch.testing.assert_close(two[key], one[key], rtol=0, atol=5e-5, msg=lambda m, key=key: f"{key}: {m}")
    reports = [json.loads((tmp_path / name / "report.json").read_text()) for name in ("one", "two")]
    assert reports[0]["metrics"]["agreement_top1"] == reports[1]["metrics"]["agreement_top1"]
    assert reports[0]["metrics"]["kl"] == pytest.approx(reports[1]["metrics"]["kl"], rel=1e-5)
