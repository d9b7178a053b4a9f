"""The few-shot linear evaluator (big_vision's fewshot_lsr): the formula against a plain NumPy solve on real
features, the nested seeded support sets, the command, and its use during pre-training (no effect on training,
exact under resume)."""

from __future__ import annotations

import json
import signal

import numpy as np
import pytest
import torch
from PIL import Image

from bigtransfer import BitConfig, BitForImageClassification
from bigtransfer.cli import main
from bigtransfer.data import few_shot_indices, load_digits, load_fashion_mnist, shot_order
from bigtransfer.fewshot import FewShotReport, fewshot, fewshot_accuracy, ridge_classifier
from bigtransfer.inference import extract_features
from bigtransfer.report import read_metrics
from bigtransfer.train import pretrain
from conftest import SigtermAfter
from conftest import upstream_config as upstream

SHOTS = (1, 2, 5, 10, 25)


def reference_accuracy(train_x, train_y, test_x, test_y, shots, seed, num_classes, l2=1024.0):
    """The evaluator as big_vision's fewshot_lsr.py describes it, written out directly: the primal ridge solve
    (XᵀX + l2 I) W = XᵀY on whitened support features with a constant 100 feature, one-hot labels in {-1, 1}."""
    rng = np.random.default_rng(seed)
    per_class = [rng.permutation(np.where(train_y == label)[0]) for label in range(num_classes)]
    support = np.concatenate([indices[:shots] for indices in per_class])
    x = train_x[support].astype(np.float64)
    mean, std = x.mean(0), x.std(0) + 1e-5
    design = np.hstack([(x - mean) / std, np.full((len(x), 1), 100.0)])
    targets = 2 * np.eye(num_classes)[train_y[support]] - 1
    weights = np.linalg.solve(design.T @ design + l2 * np.eye(design.shape[1]), design.T @ targets)
    test = np.hstack([(test_x.astype(np.float64) - mean) / std, np.full((len(test_x), 1), 100.0)])
    return float(np.mean(np.argmax(test @ weights, 1) == test_y))


def pixels(source) -> tuple[np.ndarray, np.ndarray]:
    return source.images.reshape(len(source), -1).astype(np.float32) / 255.0, np.asarray(source.labels)


@pytest.mark.slow
@pytest.mark.parametrize("data", ["digits", "fashion-mnist"])
def test_matches_the_reference_formula_on_real_features(data):
    """Digits' 64 pixels (k·C > D from 10 shots: the XᵀX branch) and Fashion-MNIST's 784 (always XXᵀ)."""
    if data == "digits":
        (train_x, train_y), (test_x, test_y) = pixels(load_digits("train")), pixels(load_digits("test"))
    else:
        train_x, train_y = pixels(load_fashion_mnist(split="train"))
        test_x, test_y = pixels(load_fashion_mnist(split="test"))
        test_x, test_y = test_x[:2000], test_y[:2000]
    measured = fewshot_accuracy(train_x, train_y, test_x, test_y, SHOTS, seeds=3)
    for shots in SHOTS:
        expected = [reference_accuracy(train_x, train_y, test_x, test_y, shots, seed, 10) for seed in range(3)]
        assert np.allclose(measured[shots], expected, atol=1e-4), (shots, measured[shots], expected)
    assert np.mean(measured[25]) > np.mean(measured[1]) + 0.1  # more shots, better: the features carry the classes


def test_weights_with_the_whitening_folded_in_score_like_the_reference():
    rng = np.random.default_rng(0)
    features, labels = rng.normal(size=(30, 200)).astype(np.float32), np.repeat(np.arange(3), 10)
    test = rng.normal(size=(50, 200))
    weight, bias = ridge_classifier(features, labels, 3, l2=10.0)
    mean, std = features.mean(0), features.std(0) + 1e-5
    design = np.hstack([(features - mean) / std, np.full((30, 1), 100.0)])
    solution = np.linalg.solve(design.T @ design + 10.0 * np.eye(201), design.T @ (2 * np.eye(3)[labels] - 1))
    expected = np.hstack([(test - mean) / std, np.full((50, 1), 100.0)]) @ solution
    assert np.allclose(test @ weight + bias, expected, rtol=1e-6, atol=1e-6)


def test_support_sets_are_seeded_and_nested():
    labels = np.repeat(np.arange(4), [30, 12, 25, 40])
    order = shot_order(labels, seed=3)
    assert [len(indices) for indices in order] == [30, 12, 25, 40]
    assert all(set(labels[indices]) == {label} for label, indices in enumerate(order))
    one, five, ten = (set(few_shot_indices(labels, k, seed=3).tolist()) for k in (1, 5, 10))
    assert one < five < ten and len(ten) == 40
    assert ten == set(few_shot_indices(labels, 10, seed=3).tolist())
    assert ten != set(few_shot_indices(labels, 10, seed=4).tolist())
    # big_vision's draw: one generator permuting each class in turn
    rng = np.random.default_rng(3)
    assert all(np.array_equal(indices, rng.permutation(np.where(labels == label)[0]))
               for label, indices in enumerate(order))


def test_too_few_examples_names_the_class():
    labels = np.repeat(np.arange(3), [10, 4, 10])
    with pytest.raises(ValueError, match=r"5-shot sampling needs 5 examples per class, but class 1 .*has 4"):
        fewshot_accuracy(np.zeros((24, 2)), labels, np.zeros((3, 2)), np.arange(3), shots=(1, 5))


@pytest.fixture(scope="module")
def photos(tmp_path_factory):
    """Two folders (support pool, test) of scikit-image photographs in two classes, and a tiny random model."""
    skimage_data = pytest.importorskip("skimage.data")
    root = tmp_path_factory.mktemp("fewshot")
    names = {"animal": ("chelsea", "coffee", "astronaut"), "space": ("rocket", "hubble_deep_field", "moon")}
    for split, count in (("pool", 4), ("test", 2)):
        for label, images in names.items():
            (root / split / label).mkdir(parents=True)
            for index in range(count):
                image = Image.fromarray(getattr(skimage_data, images[index % 3])()).convert("RGB")
                image.rotate(90 * index + (45 if split == "test" else 0)).resize((48, 40)).save(
                    root / split / label / f"{index}.jpg")
    torch.manual_seed(0)
    BitForImageClassification(BitConfig.from_variant("tiny", num_labels=2)).save_pretrained(root / "model")
    return root


@pytest.mark.slow
def test_fewshot_is_the_formula_on_the_models_features(photos):
    report = fewshot(photos / "model", str(photos / "pool"), eval_data=str(photos / "test"), shots=(1, 2, 4), seeds=2)
    train_x, train_y = extract_features(photos / "model", str(photos / "pool"))
    test_x, test_y = extract_features(photos / "model", str(photos / "test"))
    assert report.accuracy == fewshot_accuracy(train_x, train_y, test_x, test_y, (1, 2, 4), seeds=2)
    assert report.train == dict(data=str(photos / "pool"), split="all of it", images=8)
    assert report.test == dict(data=str(photos / "test"), split="all of it", images=4)
    assert report.classes == ["animal", "space"] and FewShotReport.from_dict(report.to_dict()) == report


def test_command_writes_the_report_and_plot(photos, tmp_path, capsys):
    output = tmp_path / "out"
    assert main(["fewshot", "--model", str(photos / "model"), "--data", str(photos / "pool"), "--eval-data",
                 str(photos / "test"), "--shots", "2,1", "--seeds", "3", "--output", str(output)]) == 0
    table = capsys.readouterr().out
    assert "    1 " in table and "    2 " in table and "8 training images" in table and "tested on 4 images" in table
    written = json.loads((output / "fewshot.json").read_text())
    assert written["shots"] == [1, 2] and len(written["accuracy"]["2"]["seeds"]) == 3
    assert written["accuracy"]["1"]["mean"] == pytest.approx(np.mean(written["accuracy"]["1"]["seeds"]))
    assert (output / "fewshot.png").stat().st_size > 10_000
    # Nothing of the user's is replaced, and impossible shot counts are refused before any work.
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "notes.txt").write_text("keep")
    assert main(["fewshot", "--model", str(photos / "model"), "--data", str(photos / "pool"),
                 "--output", str(tmp_path / "mine")]) == 2
    assert "already holds files" in capsys.readouterr().err and (tmp_path / "mine" / "notes.txt").read_text() == "keep"
    assert main(["fewshot", "--model", str(photos / "model"), "--data", str(photos / "pool"), "--eval-data",
                 str(photos / "test"), "--shots", "5"]) == 2
    assert "class 0 ('animal') of " + str(photos / "pool") + " has 4" in capsys.readouterr().err


# ---------------------------------------------------------------------------------------------------------------
# During pre-training.


@pytest.mark.slow
def test_pretrain_logs_fewshot_without_changing_training_and_exactly_under_resume(tmp_path, monkeypatch):
    pretrain(upstream(tmp_path / "plain", fewshot_every=0))
    pretrain(upstream(tmp_path / "straight", plots=True))
    plain, straight = (read_metrics(tmp_path / name / "metrics.jsonl") for name in ("plain", "straight"))
    fewshot_records = [r for r in straight if "fewshot_1shot" in r]
    assert [r["step"] for r in fewshot_records] == [2, 4, 6]
    assert all(0 <= r["fewshot_1shot"] <= 1 and 0 <= r["fewshot_5shot"] <= 1 for r in fewshot_records)
    assert [r["loss"] for r in plain] == [r["loss"] for r in straight if "loss" in r]  # training did not notice
    assert (tmp_path / "straight" / "fewshot.png").is_file()

    assert pretrain(upstream(tmp_path / "resumed"), callbacks=(SigtermAfter(3),)).interrupted == signal.SIGTERM
    pretrain(upstream(tmp_path / "resumed", resume=True))
    resumed = read_metrics(tmp_path / "resumed" / "metrics.jsonl")

    def comparable(records):
        return [{key: value for key, value in r.items() if key not in ("seconds", "images_per_second", "fewshot_seconds")}
                for r in records]

    assert comparable(resumed) == comparable(straight)


def test_pretrain_fewshot_settings_are_checked_first(tmp_path):
    with pytest.raises(ValueError, match="fewshot_every needs fewshot_data"):
        pretrain(upstream(tmp_path / "a", fewshot_data=None))
    with pytest.raises(ValueError, match="2000-shot sampling .* of --fewshot-data digits"):
        pretrain(upstream(tmp_path / "b", fewshot_shots=(2000,)))
    assert not (tmp_path / "b" / "metrics.jsonl").exists()
