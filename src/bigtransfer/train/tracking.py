"""Experiment tracking: the records a training run writes to metrics.jsonl (the source of truth) also go to
TensorBoard, Weights & Biases or MLflow, as `--report-to` names them.

- `tensorboard`: event files in RUN_DIR/tensorboard (`tensorboard --logdir RUN_DIR`), scalars as train/loss,
  train/lr, train/images_per_second, eval/top1 ..., fewshot/1shot ..., and the run's settings as text. A resumed
  run purges the events past its checkpoint, as metrics.jsonl drops those records.
- `wandb`: offline unless WANDB_MODE says otherwise, files in RUN_DIR/wandb, one run per run directory (resumed
  runs continue it).
- `mlflow`: MLFLOW_TRACKING_URI, else a file store in RUN_DIR/mlruns.

Each needs its package (`pip install 'bigtransfer[track]'` for TensorBoard); a missing one is an ImportError
that names it, raised before training starts.
"""

from __future__ import annotations

import hashlib
import importlib
import json
import logging
import math
import os
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from ..extras import require
from ..ownership import folder_inside
from ..report import progress_bar
from .callbacks import Callback

logger = logging.getLogger("bigtransfer")

TRACKERS = ("tensorboard", "wandb", "mlflow")
PACKAGES = {"tensorboard": "tensorboard", "wandb": "wandb", "mlflow": "mlflow"}


def check_trackers(names: Sequence[str]) -> tuple[str, ...]:
    """The tracker names, checked: ValueError for an unknown one, ImportError (naming the package) for one whose
    package is missing."""
    names = tuple(dict.fromkeys(names))
    unknown = [name for name in names if name not in TRACKERS]
    if unknown:
        raise ValueError(f"report_to: unknown tracker(s) {unknown}; the trackers are {', '.join(TRACKERS)}")
    for name in names:
        require(PACKAGES[name], f"--report-to {name}")
    return names


def scalar_name(key: str) -> str:
    """metrics.jsonl key -> the tracker's name: eval_top1 -> eval/top1, fewshot_5shot -> fewshot/5shot,
    loss -> train/loss."""
    for prefix in ("eval", "fewshot"):
        if key.startswith(prefix + "_"):
            return f"{prefix}/{key[len(prefix) + 1 :]}"
    return f"train/{key}"


def _scalars(record: dict[str, Any]) -> dict[str, float]:
    return {scalar_name(key): float(value) for key, value in record.items()
            if key != "step" and isinstance(value, (int, float)) and not isinstance(value, bool)
            and math.isfinite(value)}


class Trackers:
    """The open trackers of one run (none on ranks other than 0); `log` takes a metrics.jsonl record."""

    def __init__(self, names: Sequence[str], directory: Path, settings: dict[str, Any], start_step: int):
        self._open: list[Any] = []
        try:
            for name in dict.fromkeys(names):  # tensorboard,tensorboard is one tracker, not two writers
                self._open.append(_OPENERS[name](directory, settings, start_step))
        except BaseException:
            self.close()
            raise

    def log(self, record: dict[str, Any]) -> None:
        values = _scalars(record)
        for tracker in self._open:
            tracker.log(int(record["step"]), values)

    def close(self) -> None:
        for tracker in self._open:
            tracker.close()
        self._open = []


class _TensorBoard:
    def __init__(self, directory: Path, settings: dict[str, Any], start_step: int):
        from torch.utils.tensorboard import SummaryWriter

        # A resumed run logs from step start_step + 1 on: the killed run's events from there are dropped.
        folder = folder_inside(directory, "tensorboard", "TensorBoard event files")
        self.writer = SummaryWriter(log_dir=str(folder), purge_step=start_step + 1 if start_step else None)
        self.writer.add_text("settings", "```\n" + json.dumps(settings, indent=2, default=str) + "\n```", start_step)

    def log(self, step: int, values: dict[str, float]) -> None:
        for name, value in values.items():
            self.writer.add_scalar(name, value, step)
        self.writer.flush()

    def close(self) -> None:
        self.writer.close()


class _Wandb:
    def __init__(self, directory: Path, settings: dict[str, Any], start_step: int):
        self.wandb = importlib.import_module("wandb")
        run_id = hashlib.sha256(str(directory.resolve()).encode()).hexdigest()[:16]  # one run per directory
        folder_inside(directory, "wandb", "Weights & Biases files")  # wandb.init(dir=RUN_DIR) writes RUN_DIR/wandb
        self.run = self.wandb.init(dir=str(directory), mode=os.environ.get("WANDB_MODE", "offline"),
                                   project=os.environ.get("WANDB_PROJECT", "bigtransfer"), name=directory.name,
                                   id=run_id, resume="allow", config=json.loads(json.dumps(settings, default=str)))

    def log(self, step: int, values: dict[str, float]) -> None:
        self.run.log(values, step=step)

    def close(self) -> None:
        self.run.finish()


class _MLflow:
    def __init__(self, directory: Path, settings: dict[str, Any], start_step: int):
        self.mlflow = importlib.import_module("mlflow")
        uri = os.environ.get("MLFLOW_TRACKING_URI") or folder_inside(directory, "mlruns", "MLflow runs").resolve().as_uri()
        self.mlflow.set_tracking_uri(uri)
        self.run = self.mlflow.start_run(run_name=directory.name)
        flat = {key: json.dumps(value, default=str)[:500] for key, value in settings.get("settings", settings).items()}
        self.mlflow.log_params(flat)

    def log(self, step: int, values: dict[str, float]) -> None:
        self.mlflow.log_metrics({name.replace("/", "."): value for name, value in values.items()}, step=step)

    def close(self) -> None:
        self.mlflow.end_run()


_OPENERS = {"tensorboard": _TensorBoard, "wandb": _Wandb, "mlflow": _MLflow}


class TrackerCallback(Callback):
    """Sends every record of rank 0 to the trackers `names` (opened when training begins, at its resumed step)."""

    def __init__(self, names: Sequence[str]):
        self.names, self.trackers = tuple(dict.fromkeys(names)), None

    def on_train_begin(self, trainer: Any) -> None:
        if trainer.context.is_main:
            self.trackers = Trackers(self.names, trainer.output, trainer.describe(trainer), trainer.start_step)

    def on_record(self, trainer: Any, record: dict[str, Any]) -> None:
        if self.trackers is not None:
            self.trackers.log(record)

    def on_train_end(self, trainer: Any) -> None:
        if self.trackers is not None:
            self.trackers.close()
            self.trackers = None


class ProgressCallback(Callback):
    """Progress on rank 0: a bar on a terminal (loss, lr, images/s); in a log (stderr not a terminal), a line at
    the first step, at least every `every_seconds` and at the last step, with the loss, images/s and the time
    left."""

    def __init__(self, enabled: bool, every_seconds: float = 60.0):
        self.enabled, self.every_seconds, self.bar = enabled, every_seconds, None
        self.logged_at = self.started = 0.0

    def on_train_begin(self, trainer: Any) -> None:
        if not (self.enabled and trainer.context.is_main):
            return
        if sys.stderr.isatty():
            self.bar = progress_bar(True, trainer.recipe.total_steps, trainer.start_step, trainer.recipe.kind)
        self.started = self.logged_at = time.monotonic()

    def on_step_end(self, trainer: Any, step: int, loss: float, lr: float, images_per_second: float) -> None:
        total = trainer.recipe.total_steps
        if self.bar is not None:
            self.bar.update(1)
            self.bar.set_postfix_str(f"loss={loss:.4f} lr={lr:.2e} img/s={images_per_second:.0f}", refresh=False)
            if step == total:  # before the final evaluation shows its own
                self.on_train_end(trainer)
        elif self.started and (step in (trainer.start_step + 1, total)
                               or time.monotonic() - self.logged_at >= self.every_seconds):
            now = time.monotonic()
            left = (now - self.started) / (step - trainer.start_step) * (total - step)
            logger.info("%s step %d/%d: loss %.4f, lr %.3g, %.1f img/s, %s left", trainer.recipe.kind, step, total,
                        loss, lr, images_per_second, _duration(left))
            self.logged_at = now

    def on_train_end(self, trainer: Any) -> None:
        if self.bar is not None:
            self.bar.close()
            self.bar = None


def _duration(seconds: float) -> str:
    """12 s, 7 min, 2.5 h."""
    if seconds < 90:
        return f"{seconds:.0f} s"
    return f"{seconds / 60:.0f} min" if seconds < 5400 else f"{seconds / 3600:.1f} h"
