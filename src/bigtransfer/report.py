"""What a user sees of a run: evaluation metrics (top-1, top-5, loss, per-class accuracy, confusion matrix), the
PNG plots and progress bars.

Metrics are plain numpy; plots import matplotlib only when drawn (it is an optional dependency, the `train`
extra) and use its object API (`Figure` + Agg canvas), so no global pyplot state is touched; progress bars are
tqdm's (also an extra), and nothing is shown without it.

Example::

    report = EvaluationReport.from_predictions(topk, labels, losses, classes)
    write_report(report, "runs/pets/report.json")
    plot_run("runs/pets")  # loss.png, lr.png, accuracy.png, confusion_matrix.png
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from .extras import require
from .files import atomic_directory, atomic_path, read_bytes, read_json, write_text_atomic

REPORT_NAME = "report.json"
METRICS_NAME = "metrics.jsonl"
PLOT_NAMES = ("loss.png", "lr.png", "accuracy.png", "confusion_matrix.png", "fewshot.png", "distill.png")
EVALUATION_FILES = (REPORT_NAME, "accuracy.png", "confusion_matrix.png")  # what `bigtransfer evaluate --output` writes
MAX_METRICS_BYTES = 1 << 30


@dataclasses.dataclass
class EvaluationReport:
    """Classification quality on one evaluation set.

    Fields: `top1`, `top5` (top-k accuracy with k = min(5, classes), in [0, 1]), `loss` (mean softmax
    cross-entropy), `num_images`, `classes`, `per_class_accuracy` (name -> accuracy, NaN for a class without
    images), `confusion_matrix` (rows: true class, columns: predicted class, counts), `skipped_images`
    (paths of unreadable images left out), `step` (the training step that produced the model, if known),
    `data` (which images: the data spec, the split in words, the count), `metrics` (further measurements on the
    same images: a distillation run's teacher top-1, agreement and KL). `top5` is None with 5 classes or fewer,
    where every image is in its top 5.
    """

    top1: float
    top5: float | None
    loss: float
    num_images: int
    classes: list[str]
    per_class_accuracy: dict[str, float]
    confusion_matrix: list[list[int]]
    skipped_images: list[str] = dataclasses.field(default_factory=list)
    step: int | None = None
    data: dict[str, Any] = dataclasses.field(default_factory=dict)  # {data, split, images}: what was evaluated
    metrics: dict[str, Any] = dataclasses.field(default_factory=dict)

    @classmethod
    def from_predictions(
        cls, topk: np.ndarray, labels: np.ndarray, losses: np.ndarray, classes: Sequence[str],
        skipped_images: Sequence[str] = (), step: int | None = None,
    ) -> EvaluationReport:
        """Build from per-image predictions: `topk` (N, k) class indices best first, `labels` (N,), `losses` (N,)."""
        topk, labels, losses = np.asarray(topk), np.asarray(labels, dtype=np.int64), np.asarray(losses, np.float64)
        num_classes = len(classes)
        if topk.ndim != 2 or len(topk) != len(labels) or len(losses) != len(labels):
            raise ValueError(f"need topk (N, k), labels (N,), losses (N,); got {topk.shape}, {labels.shape}, {losses.shape}")
        count = len(labels)
        confusion = np.zeros((num_classes, num_classes), dtype=np.int64)
        if count:
            np.add.at(confusion, (labels, topk[:, 0]), 1)
        top1 = float((topk[:, :1] == labels[:, None]).any(1).mean()) if count else math.nan
        top5 = (float((topk[:, :5] == labels[:, None]).any(1).mean()) if count else math.nan) if num_classes > 5 else None
        per_class = {}
        for index, name in enumerate(classes):
            total = confusion[index].sum()
            per_class[str(name)] = float(confusion[index, index] / total) if total else math.nan
        return cls(
            top1=top1, top5=top5, loss=float(losses.mean()) if count else math.nan, num_images=count,
            classes=[str(name) for name in classes], per_class_accuracy=per_class,
            confusion_matrix=confusion.tolist(), skipped_images=list(skipped_images), step=step,
        )

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, values: dict[str, Any]) -> EvaluationReport:
        return cls(**{field.name: values[field.name] for field in dataclasses.fields(cls) if field.name in values})

    def summary(self) -> str:
        """One line: `top-1 81.20 %  top-5 99.10 %  loss 0.5123  (5000 images of fashion-mnist, its published
        test split)`; no top-5 with 5 classes or fewer."""
        skipped = f", {len(self.skipped_images)} unreadable skipped" if self.skipped_images else ""
        top5 = f"top-5 {100 * self.top5:.2f} %  " if self.top5 is not None else ""
        data = f" of {printable(str(self.data['data']))}, {self.data['split']}" if self.data else ""
        return f"top-1 {100 * self.top1:.2f} %  {top5}loss {self.loss:.4f}  ({self.num_images} images{data}{skipped})"


def to_json(report: EvaluationReport, indent: int | None = None) -> str:
    """The report as valid JSON: NaN (a class without images) and infinities are written as null."""
    return json.dumps(_finite_or_none(report.to_dict()), indent=indent, allow_nan=False)


def write_report(report: EvaluationReport, path: str | os.PathLike) -> Path:
    """Write the report as JSON atomically (NaN written as null); returns the path."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    write_text_atomic(path, to_json(report, indent=2) + "\n")
    return path


def is_evaluation_directory(path: Path) -> bool:
    """Whether `path` holds nothing but what `write_evaluation` writes (so it may be replaced)."""
    return {entry.name for entry in path.iterdir()} <= set(EVALUATION_FILES)


def write_evaluation(report: EvaluationReport, directory: str | os.PathLike, keep_existing: bool = False) -> Path:
    """report.json, accuracy.png and confusion_matrix.png, replacing `directory` as a whole (atomically; other
    files it held are carried over with `keep_existing`)."""
    directory = Path(directory)
    with atomic_directory(directory, keep_existing) as written:
        write_report(report, written / REPORT_NAME)
        plot_accuracy(report, [], written / "accuracy.png")
        plot_confusion_matrix(report, written / "confusion_matrix.png")
    return directory


def printable(text: str) -> str:
    """`text` with control characters (terminal escapes, carriage returns) shown as escapes: class names come
    from files and must not move the cursor or fake lines on a terminal."""
    return "".join(char if char.isprintable() or char == " " else repr(char)[1:-1] for char in str(text))


def read_report(path: str | os.PathLike) -> EvaluationReport:
    values = read_json(path)
    values["per_class_accuracy"] = {k: math.nan if v is None else v for k, v in values["per_class_accuracy"].items()}
    return EvaluationReport.from_dict(values)


def _finite_or_none(value: Any) -> Any:
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {key: _finite_or_none(item) for key, item in value.items()}
    if isinstance(value, list):
        return [_finite_or_none(item) for item in value]
    return value


def read_metrics(path: str | os.PathLike) -> list[dict[str, Any]]:
    """The records of a metrics.jsonl file (a torn last line from a killed run is ignored)."""
    records = []
    text = read_bytes(path, MAX_METRICS_BYTES, "metrics.jsonl").decode("utf-8", "replace")
    for line in text.splitlines():
        try:
            record = json.loads(line)
        except ValueError:
            continue
        if isinstance(record, dict):  # a line of anything else is not a record this package wrote
            records.append(record)
    return records


# ---------------------------------------------------------------------------------------------------------------
# Plots.


def progress_bar(enabled: bool, total: int, initial: int, description: str, unit: str = "step", leave: bool = True):
    """A tqdm bar on stderr, shown only on a terminal (None when disabled or tqdm is not installed); the caller
    updates and closes it. `leave=False` clears it when done (passes inside a longer run)."""
    if not enabled:
        return None
    try:
        from tqdm.auto import tqdm
    except ImportError:
        return None
    # disable=None: tqdm turns itself off when stderr is not a terminal (logs, CI, pipes).
    return tqdm(total=total, initial=initial, desc=description, unit=unit, dynamic_ncols=True, disable=None,
                leave=leave)


class StageProgress:
    """Progress through a few named stages of one long call (`convert`), as a context manager: `next(name)`
    finishes the stage before and shows the new one."""

    def __init__(self, enabled: bool, description: str, stages: int):
        self.bar = progress_bar(enabled, stages, 0, description, unit="stage")
        self.started = False

    def next(self, name: str) -> None:
        if self.bar is None:
            return
        if self.started:
            self.bar.update(1)
        self.started = True
        self.bar.set_postfix_str(name)

    def __enter__(self) -> StageProgress:
        return self

    def __exit__(self, error_type, *_) -> None:
        if self.bar is not None:
            if error_type is None:
                self.bar.update(1)
            self.bar.close()


def _figure(width: float = 6.0, height: float = 4.0):
    FigureCanvasAgg = require("matplotlib.backends.backend_agg", "plots").FigureCanvasAgg
    Figure = require("matplotlib.figure", "plots").Figure
    figure = Figure(figsize=(width, height), dpi=100)
    FigureCanvasAgg(figure)
    return figure


def _step_axis(axes) -> None:
    """Steps are whole numbers: integer ticks, never 2.5."""
    from matplotlib.ticker import MaxNLocator

    axes.xaxis.set_major_locator(MaxNLocator(integer=True))
    axes.set_xlabel("step")


def _log_scale_if_wide(axes, values: Sequence[float]) -> bool:
    """A log y axis when the positive values span a decade or more, labelled in plain numbers (0.3, not
    3x10^-1); a linear one otherwise, where a log axis would only show minor ticks in scientific notation."""
    from matplotlib.ticker import FormatStrFormatter, LogLocator, NullFormatter

    positive = [value for value in values if value > 0 and math.isfinite(value)]
    if not positive or max(positive) / min(positive) < 10:
        return False
    axes.set_yscale("log", nonpositive="mask")
    axes.yaxis.set_major_locator(LogLocator(base=10, subs=(1.0, 2.0, 5.0)))  # 0.2, 0.5, 1, 2: labelled ticks
    axes.yaxis.set_major_formatter(FormatStrFormatter("%g"))
    axes.yaxis.set_minor_formatter(NullFormatter())
    return True


def _save(figure, path: Path) -> Path:
    figure.tight_layout()
    with atomic_path(path) as temporary:
        figure.savefig(temporary, format="png")
    return path


def plot_curves(records: list[dict[str, Any]], directory: str | os.PathLike) -> list[Path]:
    """loss.png (training loss, plus evaluation loss where recorded), lr.png and, where the few-shot evaluator ran,
    fewshot.png, from metrics records."""
    directory = Path(directory)
    train = [r for r in records if "loss" in r]
    evals = [r for r in records if "eval_loss" in r]
    written = []
    if train:
        figure = _figure()
        axes = figure.add_subplot()
        steps, losses = [r["step"] for r in train], np.asarray([r["loss"] for r in train], dtype=np.float64)
        axes.plot(steps, losses, label="training loss", linewidth=0.8, alpha=0.5 if len(train) >= 50 else 1.0)
        if len(train) >= 50:  # a running mean over ~2 % of training shows the trend through batch noise
            window = max(5, len(train) // 50)
            smooth = np.convolve(losses, np.ones(window) / window, mode="valid")
            axes.plot(steps[window - 1 :], smooth, label=f"running mean ({window} steps)", linewidth=1.5)
        if evals:
            axes.plot([r["step"] for r in evals], [r["eval_loss"] for r in evals], "o-", label="evaluation loss")
        _step_axis(axes)
        axes.set_ylabel("loss")
        axes.set_title("training loss")
        _log_scale_if_wide(axes, [*losses.tolist(), *(r["eval_loss"] for r in evals)])
        axes.legend()
        axes.grid(alpha=0.3)
        written.append(_save(figure, directory / "loss.png"))
        figure = _figure()
        axes = figure.add_subplot()
        rates = [r["lr"] for r in train]
        axes.plot(steps, rates, drawstyle="steps-post")
        _step_axis(axes)
        axes.set_ylabel("learning rate")
        logarithmic = _log_scale_if_wide(axes, rates)
        axes.set_title("learning rate" + (" (log scale: a decay is a step down)" if logarithmic else ""))
        axes.grid(alpha=0.3)
        written.append(_save(figure, directory / "lr.png"))
    fewshot = [r for r in records if any(key.startswith("fewshot_") and key.endswith("shot") for key in r)]
    if fewshot:
        written.append(_plot_fewshot_curves(fewshot, directory / "fewshot.png"))
    distilled = [r for r in records if "agreement_top1" in r]
    if distilled:
        written.append(_plot_distillation_curves(distilled, directory / "distill.png"))
    return written


def _plot_distillation_curves(records: list[dict[str, Any]], path: Path) -> Path:
    """distill.png: the student's top-1, its top-1 agreement with the teachers and the teachers' top-1 (left), and
    KL(teacher || student) on the evaluation images (right), against the training step."""
    figure = _figure(10.0, 4.0)
    axes = figure.add_subplot(1, 2, 1)
    steps = [r["step"] for r in records]
    axes.plot(steps, [100 * r["eval_top1"] for r in records], "o-", label="student top-1")
    axes.plot(steps, [100 * r["agreement_top1"] for r in records], "s-", label="top-1 agreement with the teacher")
    axes.axhline(100 * records[-1]["teacher_top1"], color="grey", linestyle="--", label="teacher top-1")
    _step_axis(axes)
    axes.set_ylabel("%")
    axes.set_title("student, teacher and their agreement")
    axes.grid(alpha=0.3)
    axes.legend(fontsize="small")
    axes = figure.add_subplot(1, 2, 2)
    axes.plot(steps, [r["kl"] for r in records], "o-")
    _step_axis(axes)
    axes.set_ylabel("mean KL(teacher || student)")
    axes.set_title("distance to the teacher (evaluation images)")
    _log_scale_if_wide(axes, [r["kl"] for r in records])
    axes.grid(alpha=0.3)
    return _save(figure, path)


def _plot_fewshot_curves(records: list[dict[str, Any]], path: Path) -> Path:
    """fewshot.png: few-shot linear top-1 (mean over seeds) against the training step, one line per shot count."""
    figure = _figure()
    axes = figure.add_subplot()
    keys = sorted({key for r in records for key in r if key.startswith("fewshot_") and key.endswith("shot")},
                  key=lambda key: int(key[len("fewshot_") : -len("shot")]))
    for key in keys:
        points = [(r["step"], 100 * r[key]) for r in records if key in r]
        axes.plot(*zip(*points, strict=True), "o-", label=f"{key[len('fewshot_') : -len('shot')]}-shot")
    _step_axis(axes)
    axes.set_ylabel("top-1 accuracy (%)")
    axes.set_title("few-shot linear evaluation during training")
    axes.grid(alpha=0.3)
    axes.legend()
    return _save(figure, path)


def plot_accuracy(report: EvaluationReport, records: list[dict[str, Any]], path: str | os.PathLike) -> Path:
    """accuracy.png: per-class accuracy bars, and top-1 over training steps when evaluations were recorded."""
    evals = [r for r in records if "eval_top1" in r]
    figure = _figure(10.0 if evals else 6.0, max(3.0, 0.25 * len(report.classes) + 1.5))
    axes = figure.add_subplot(1, 2 if evals else 1, 1)
    names = list(report.per_class_accuracy)
    values = [0.0 if math.isnan(v) else 100 * v for v in report.per_class_accuracy.values()]
    positions = np.arange(len(names))
    axes.barh(positions, values)
    axes.set_yticks(positions, labels=names if len(names) <= 50 else [""] * len(names))
    axes.invert_yaxis()
    axes.set_xlim(0, 100)
    axes.set_xlabel("accuracy (%)")
    axes.set_title(f"per-class accuracy (top-1 {100 * report.top1:.1f} %)")
    if evals:
        axes = figure.add_subplot(1, 2, 2)
        axes.plot([r["step"] for r in evals], [100 * r["eval_top1"] for r in evals], "o-")
        _step_axis(axes)
        axes.set_ylabel("top-1 accuracy (%)")
        axes.set_title("evaluation during training")
        axes.grid(alpha=0.3)
    return _save(figure, Path(path))


def plot_confusion_matrix(report: EvaluationReport, path: str | os.PathLike) -> Path:
    """confusion_matrix.png: rows true class, columns predicted, each row normalised to sum to 1."""
    matrix = np.asarray(report.confusion_matrix, dtype=np.float64)
    rows = matrix.sum(1, keepdims=True)
    normalised = np.divide(matrix, rows, out=np.zeros_like(matrix), where=rows > 0)
    size = min(12.0, 3.0 + 0.45 * len(report.classes))
    figure = _figure(size, size)
    axes = figure.add_subplot()
    image = axes.imshow(normalised, vmin=0, vmax=1, cmap="Blues")
    bar = figure.colorbar(image, ax=axes, fraction=0.046)
    bar.set_label("share of the true class's images")
    count = len(report.classes)
    if count <= 30:
        positions = np.arange(count)
        axes.set_xticks(positions, labels=report.classes, rotation=90)
        axes.set_yticks(positions, labels=report.classes)
        if count <= 12:  # the counts, as large as their cells allow
            for row in range(count):
                for column in range(count):
                    axes.text(column, row, int(matrix[row, column]), ha="center", va="center",
                              fontsize=max(8, 16 - count), color="white" if normalised[row, column] > 0.5 else "black")
    axes.set_xlabel("predicted class")
    axes.set_ylabel("true class")
    axes.set_title(f"confusion matrix ({report.num_images} images, counts in the cells)" if count <= 12
                   else f"confusion matrix ({report.num_images} images)")
    return _save(figure, Path(path))


def plot_run(directory: str | os.PathLike, report: EvaluationReport | None = None) -> list[Path]:
    """Draw every plot of a run directory from its metrics.jsonl and report.json; returns the files written."""
    directory = Path(directory)
    records = read_metrics(directory / METRICS_NAME) if (directory / METRICS_NAME).is_file() else []
    if report is None and (directory / REPORT_NAME).is_file():
        report = read_report(directory / REPORT_NAME)
    if report is not None and "agreement_top1" in report.metrics:  # the final evaluation ends the curves
        records = [*records, dict(step=report.step, eval_top1=report.top1, **report.metrics)]
    written = plot_curves(records, directory)
    if report is not None:
        written.append(plot_accuracy(report, records, directory / "accuracy.png"))
        written.append(plot_confusion_matrix(report, directory / "confusion_matrix.png"))
    return written


def plot_accuracy_vs_shots(
    series: dict[str, dict[int, Sequence[float]]], path: str | os.PathLike, title: str = ""
) -> Path:
    """Mean accuracy (%) against examples per class, one line per arm, error bars = std over seeds."""
    figure = _figure()
    axes = figure.add_subplot()
    all_shots = sorted({shots for by_shots in series.values() for shots in by_shots})
    for name, by_shots in series.items():
        shots = sorted(by_shots)
        means = [100 * float(np.mean(by_shots[s])) for s in shots]
        stds = [100 * float(np.std(by_shots[s])) for s in shots]
        axes.errorbar(shots, means, yerr=stds, marker="o", capsize=3, label=name)
    axes.set_xscale("log")
    axes.set_xticks(all_shots, labels=[str(shots) for shots in all_shots])
    axes.minorticks_off()
    axes.set_xlabel("training examples per class")
    axes.set_ylabel("top-1 accuracy (%)")
    if title:
        axes.set_title(title)
    axes.grid(alpha=0.3)
    axes.legend()
    return _save(figure, Path(path))


def plot_series(
    series: dict[str, dict[int, Sequence[float]]], path: str | os.PathLike, xlabel: str, ylabel: str, title: str = ""
) -> Path:
    """Mean against an integer x, one line per series, error bars = std over the values at each x."""
    figure = _figure()
    axes = figure.add_subplot()
    for name, by_x in series.items():
        xs = sorted(by_x)
        axes.errorbar(xs, [float(np.mean(by_x[x])) for x in xs], yerr=[float(np.std(by_x[x])) for x in xs],
                      marker="o", capsize=3, label=name)
    all_x = sorted({x for by_x in series.values() for x in by_x})
    axes.set_xticks(all_x, labels=[str(x) for x in all_x])
    axes.axhline(0, color="grey", linewidth=0.8)
    axes.set_xlabel(xlabel)
    axes.set_ylabel(ylabel)
    if title:
        axes.set_title(title)
    axes.grid(alpha=0.3)
    axes.legend(fontsize="small")
    return _save(figure, Path(path))
