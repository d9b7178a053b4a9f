"""`Callback`: hooks into a training run. The progress bar and the trackers (`train.tracking`) are callbacks; so
can a user's be (`finetune(config, callbacks=(...,))`)."""

from __future__ import annotations

from typing import Any


class Callback:
    """Hooks into a run, called on every rank (`trainer.context.is_main` says which): override what you need.

    `trainer` is the `train.loop.Trainer` (its settings, recipe, model, output and step counters).
    """

    def on_train_begin(self, trainer: Any) -> None:
        """After setup and resumption, before the first step (trainer.start_step says where it starts)."""

    def on_step_end(self, trainer: Any, step: int, loss: float, lr: float, images_per_second: float) -> None:
        """After optimizer step `step` (1-based), with its mean loss, learning rate and throughput."""

    def on_record(self, trainer: Any, record: dict[str, Any]) -> None:
        """Every record of metrics.jsonl (steps and evaluations), and the final evaluation."""

    def on_train_end(self, trainer: Any) -> None:
        """When the run ends: finished, stopped by a signal, or failed."""
