"""Few-shot linear evaluation of a representation, computed as big_vision's evaluator does (fewshot_lsr.py, the
one BiT's upstream runs report every few thousand steps).

For each seed, each class's training examples are put in a seeded order (`data.shot_order`) and the first k
form the k-shot support set, so the 1-, 5- and 10-shot sets of one seed are nested. The pre-logits features are
whitened with the support set's mean and standard deviation (+1e-5), a constant feature of 100 is appended (the
bias, nearly unregularised), labels become one-hot vectors in {-1, +1}, and ridge regression with L2 strength
`l2` (1024 by default, 2^10 as in big_vision's BiT configs) is solved in closed form through the
eigendecomposition of XᵀX or XXᵀ, whichever is smaller. Accuracy is the argmax prediction on every test image.

Features are extracted once for all shots and seeds; each solve is a (k·C)² or D² eigendecomposition, a few
milliseconds for 25 shots of 10 classes.

Example:
    >>> report = bigtransfer.fewshot("google/bit-50", "cifar10:data/cifar-10-batches-py", shots=(1, 5, 10, 25))
    >>> report.mean(10)                                   # mean accuracy over the seeds, in [0, 1]
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from .data import ImageSource, TransformedDataset, check_shots, open_train_eval, shot_order
from .distributed import Context, distributed
from .files import atomic_directory, write_text_atomic
from .inference.evaluate import dataset_features, processed_dataset
from .inference.predict import load_for_inference, maybe_optimized
from .inference.selection import DataSelection
from .report import plot_accuracy_vs_shots, printable

BIAS_FEATURE = 100.0  # the appended constant: large, so the bias is almost unregularised
WHITENING_EPSILON = 1e-5
DEFAULT_L2 = 2.0**10
DEFAULT_SHOTS = (1, 5, 10, 25)
DEFAULT_SEEDS = 3
REPORT_NAME = "fewshot.json"
PLOT_NAME = "fewshot.png"
OUTPUT_FILES = (REPORT_NAME, PLOT_NAME)
_TEST_CHUNK = 8192  # test rows scored per float64 block
MAX_SEEDS = 1_000  # big_vision reports 3 to 5; each seed is one solve per shot count
MAX_SHOTS = 10_000  # examples per class in one support set: past this, train a linear probe on the features


@dataclasses.dataclass
class FewShotReport:
    """Few-shot linear accuracy of one representation on one data set.

    `accuracy[k]` lists the accuracy (in [0, 1]) for each seed 0..seeds-1 at k shots; `train` and `test` say
    which images ({data, split, images}); `feature_seconds` and `solve_seconds` split the time. `step` is the
    training step of the model when the trainer evaluated it.
    """

    shots: list[int]
    seeds: int
    l2: float
    accuracy: dict[int, list[float]]
    classes: list[str]
    train: dict[str, Any] = dataclasses.field(default_factory=dict)
    test: dict[str, Any] = dataclasses.field(default_factory=dict)
    feature_seconds: float = 0.0
    solve_seconds: float = 0.0
    step: int | None = None

    def mean(self, shots: int) -> float:
        return float(np.mean(self.accuracy[shots]))

    def std(self, shots: int) -> float:
        """The standard deviation over seeds (0 for one seed)."""
        return float(np.std(self.accuracy[shots]))

    def to_dict(self) -> dict[str, Any]:
        values = dataclasses.asdict(self)
        values["accuracy"] = {str(k): dict(mean=self.mean(k), std=self.std(k), seeds=list(v))
                              for k, v in self.accuracy.items()}
        return values

    @classmethod
    def from_dict(cls, values: dict[str, Any]) -> FewShotReport:
        fields = {field.name for field in dataclasses.fields(cls)}
        kept = {name: value for name, value in values.items() if name in fields}
        kept["accuracy"] = {int(k): list(v["seeds"]) for k, v in values["accuracy"].items()}
        return cls(**kept)

    def summary(self) -> str:
        """A table: one row per shot count (mean ± std over seeds, %), then which images and how long it took."""
        lines = [f"{'shots':>5}  {'top-1 (%)':>14}  seeds", f"{'-' * 5}  {'-' * 14}  -----"]
        for shots in self.shots:
            spread = f"{100 * self.mean(shots):6.2f} ± {100 * self.std(shots):5.2f}"
            lines.append(f"{shots:>5}  {spread:>14}  {self.seeds}")
        lines.append(f"linear ridge regression (l2 {self.l2:g}) on {self.train.get('images', '?')} training images of "
                     f"{printable(str(self.train.get('data', '?')))} ({self.train.get('split', '')}); tested on "
                     f"{self.test.get('images', '?')} images of {printable(str(self.test.get('data', '?')))} "
                     f"({self.test.get('split', '')}); features {self.feature_seconds:.1f} s, solves "
                     f"{1000 * self.solve_seconds:.0f} ms")
        return "\n".join(lines)


def ridge_classifier(features: np.ndarray, labels: np.ndarray, num_classes: int,
                     l2: float = DEFAULT_L2) -> tuple[np.ndarray, np.ndarray]:
    """(weight (D, C), bias (C,)) of big_vision's whitened ridge regression on a support set, with the whitening
    folded in: scores of raw features x are ``x @ weight + bias``. Solved in float64."""
    x = np.asarray(features, np.float64)
    mean = x.mean(axis=0)
    std = x.std(axis=0) + WHITENING_EPSILON
    x = np.concatenate([(x - mean) / std, np.full((len(x), 1), BIAS_FEATURE)], axis=1)
    targets = 2.0 * np.eye(num_classes)[np.asarray(labels)] - 1.0
    if len(x) >= x.shape[1]:  # (XᵀX + l2 I)⁻¹ Xᵀ Y through XᵀX = Q diag(e) Qᵀ
        eigenvalues, q = np.linalg.eigh(x.T @ x)
        left, right = q, q.T @ (x.T @ targets)
    else:  # Xᵀ (XXᵀ + l2 I)⁻¹ Y, the same matrix, through the smaller XXᵀ
        eigenvalues, q = np.linalg.eigh(x @ x.T)
        left, right = x.T @ q, q.T @ targets
    solution = (left / (eigenvalues + l2)) @ right  # (D + 1, C)
    weight = solution[:-1] / std[:, None]
    bias = BIAS_FEATURE * solution[-1] - (mean / std) @ solution[:-1]
    return weight, bias


def fewshot_accuracy(
    train_features: np.ndarray, train_labels: np.ndarray, test_features: np.ndarray, test_labels: np.ndarray,
    shots: Sequence[int] = DEFAULT_SHOTS, seeds: int | Sequence[int] = DEFAULT_SEEDS, l2: float = DEFAULT_L2,
    num_classes: int | None = None,
) -> dict[int, list[float]]:
    """Accuracy (in [0, 1]) per shot count, one per seed (0..seeds-1, or the seeds listed), of `ridge_classifier`
    on the k-shot support sets `shot_order` draws from the training features, scored on every test feature.

    Raises:
        ValueError: when a class has fewer training examples than the largest shot count, or the test set is empty.
    """
    train_labels, test_labels = np.asarray(train_labels), np.asarray(test_labels)
    num_classes = num_classes or int(max(train_labels.max(), test_labels.max())) + 1
    check_shots(train_labels, max(shots), [str(label) for label in range(num_classes)], "the training data")
    if len(test_labels) == 0:
        raise ValueError("few-shot evaluation needs test images; the test data has none")
    accuracy: dict[int, list[float]] = {k: [] for k in shots}
    for seed in range(seeds) if isinstance(seeds, int) else seeds:
        order = shot_order(train_labels, seed, num_classes)
        for k in shots:
            support = np.concatenate([indices[:k] for indices in order])
            weight, bias = ridge_classifier(train_features[support], train_labels[support], num_classes, l2)
            correct = sum(int((np.argmax(np.asarray(test_features[i : i + _TEST_CHUNK], np.float64) @ weight + bias, 1)
                               == test_labels[i : i + _TEST_CHUNK]).sum())
                          for i in range(0, len(test_labels), _TEST_CHUNK))
            accuracy[k].append(correct / len(test_labels))
    return accuracy


def check_arguments(shots: Sequence[int], seeds: int, l2: float) -> list[int]:
    """The shot counts sorted without repeats; ValueError for counts outside [1, MAX_SHOTS], seeds outside
    [1, MAX_SEEDS] or a bad l2."""
    shots = sorted({int(k) for k in shots})
    if not shots or shots[0] < 1 or shots[-1] > MAX_SHOTS:
        raise ValueError(f"shots must be integers from 1 to {MAX_SHOTS:,} (examples per class), got {list(shots)}")
    if not (isinstance(seeds, int) and not isinstance(seeds, bool) and 1 <= seeds <= MAX_SEEDS):
        raise ValueError(f"seeds must be an integer from 1 to {MAX_SEEDS:,} (support sets drawn per shot count), "
                         f"got {seeds!r}")
    if not (math.isfinite(l2) and l2 > 0):
        raise ValueError(f"l2 must be a finite number > 0, got {l2}")
    return shots


def check_classes(classes: Sequence[str], what: str) -> None:
    """ValueError for data of fewer than two classes: every prediction would be right, and the accuracy meaningless."""
    if len(classes) < 2:
        raise ValueError(f"few-shot classification needs at least 2 classes, but {what} has {len(classes)} "
                         f"({', '.join(map(repr, classes[:1]))}): accuracy over one class is always 100 %")


def evaluate_representation(
    backbone: torch.nn.Module, train: TransformedDataset, test: TransformedDataset, context: Context, *,
    shots: Sequence[int] = DEFAULT_SHOTS, seeds: int = DEFAULT_SEEDS, l2: float = DEFAULT_L2, batch_size: int = 128,
    progress: bool = False,
) -> FewShotReport:
    """The FewShotReport of a `BitModel` (any rank count; every rank gets the result) on preprocessed training and
    test sets: what `fewshot` and the trainer's `--fewshot-every` run."""
    shots = check_arguments(shots, seeds, l2)  # the shot counts are checked on the extracted labels below
    check_classes(train.classes, "the training data")
    started = time.perf_counter()
    train_x, train_y, _ = dataset_features(backbone, train, batch_size, context, progress, description="features (train)")
    test_x, test_y, _ = dataset_features(backbone, test, batch_size, context, progress, description="features (test)")
    extracted = time.perf_counter()
    accuracy = fewshot_accuracy(train_x, train_y, test_x, test_y, shots, seeds, l2, len(train.classes))
    return FewShotReport(shots=shots, seeds=seeds, l2=float(l2), accuracy=accuracy, classes=list(train.classes),
                         train=dict(images=len(train_y)), test=dict(images=len(test_y)),
                         feature_seconds=extracted - started, solve_seconds=time.perf_counter() - extracted)


def fewshot(
    model: str | os.PathLike,
    data: str | ImageSource | DataSelection,
    *,
    eval_data: str | ImageSource | None = None,
    shots: Sequence[int] = DEFAULT_SHOTS,
    seeds: int = DEFAULT_SEEDS,
    l2: float = DEFAULT_L2,
    batch_size: int = 128,
    device: str | None = None,
    progress: bool = False,
    optimized: bool = False,
) -> FewShotReport:
    """Few-shot linear accuracy of `model`'s pre-logits features (see the module doc), at each of `shots`
    examples per class, for seeds 0..seeds-1.

    `model` is any source `from_pretrained` takes, preprocessed as its preprocessor_config.json says. The support
    sets are drawn from `data` and tested on `eval_data`, each used whole; without `eval_data`, the selection's
    `val_fraction` of each class of `data` is the test set (split seed 0) and the support sets come from the rest,
    except for Fashion-MNIST and CIFAR, whose published train and test splits are used. The selection's `classes`,
    `workers`, `on_bad_image` and `reduced_decode` apply to both; its `split` is not used.

    Raises:
        ValueError: a class with fewer training images than the largest shot count (named), or bad arguments.
    """
    shots = check_arguments(shots, seeds, l2)
    selection = DataSelection.of(data)
    with distributed(device) as context:
        source, test_source, described = open_train_eval(selection.data, eval_data,
                                                         val_fraction=selection.val_fraction, classes=selection.classes)
        check_classes(source.classes, str(selection.data))
        check_shots(source.labels, shots[-1], source.classes, str(selection.data))
        network, processor = load_for_inference(model, context.device)
        train_set, test_set = (processed_dataset(part, processor, selection.on_bad_image, selection.reduced_decode)
                               for part in (source, test_source))
        report = evaluate_representation(maybe_optimized(network.bit, optimized), train_set, test_set, context,
                                         shots=shots, seeds=seeds, l2=l2, batch_size=batch_size, progress=progress)
    report.train = dict(described["train"], images=report.train["images"])  # the images read (skipped ones not)
    report.test = dict(described["test"], images=report.test["images"])
    return report


def write_fewshot(report: FewShotReport, directory: str | os.PathLike, keep_existing: bool = False) -> Path:
    """fewshot.json and fewshot.png (accuracy against shots, one error bar per seed spread), replacing
    `directory` as a whole (atomically; other files it held are carried over with `keep_existing`)."""
    directory = Path(directory)
    with atomic_directory(directory, keep_existing) as written:
        write_text_atomic(written / REPORT_NAME, json.dumps(report.to_dict(), indent=2) + "\n")
        plot_accuracy_vs_shots({"few-shot linear": report.accuracy}, written / PLOT_NAME,
                               title=f"Few-shot linear evaluation ({report.seeds} seed{'s' * (report.seeds > 1)})")
    return directory


def is_fewshot_directory(path: Path) -> bool:
    """Whether `path` holds nothing but what `write_fewshot` writes (so it may be replaced)."""
    return {entry.name for entry in path.iterdir()} <= set(OUTPUT_FILES)
