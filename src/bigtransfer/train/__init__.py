"""Training: the BiT-HyperRule fine-tuning, upstream pre-training and distillation recipes on one loop.

- `settings`: the typed configs (`FinetuneConfig`, `PretrainConfig`, `DistillConfig`) and their checks;
- `plan`: which examples each step sees and how MixUp pairs them;
- `recipe`: a recipe's model, resolution, learning-rate rule and loss; `distillation`: function matching's recipe;
- `loop`: the `Trainer` (setup, resume, step, record, save, finish) with `Evaluator`s and `Callback`s;
- `run_dir`: the run directory's files, checkpoint, lock and stop signals;
- `tracking`: TensorBoard / W&B / MLflow and the progress bar, as callbacks;
- `run`: `finetune()`, `pretrain()` and `distill()`.

The names below load their module on first use, so importing a config does not load the loop.
"""

from __future__ import annotations

import importlib

_EXPORTS = {
    "FinetuneConfig": "settings", "PretrainConfig": "settings", "DistillConfig": "settings", "RunSettings": "settings",
    "BatchPlan": "plan", "Recipe": "recipe",
    "Trainer": "loop", "Evaluator": "loop", "Callback": "callbacks", "RunResult": "loop", "NonFiniteLossError": "loop",
    "CHECKPOINT_NAME": "run_dir", "LOCK_NAME": "run_dir", "RunLockedError": "run_dir", "load_run_state": "run_dir",
    "is_run_directory": "run_dir",
    "finetune": "run", "pretrain": "run", "distill": "run",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str):
    if name not in _EXPORTS:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    return getattr(importlib.import_module(f"{__name__}.{_EXPORTS[name]}"), name)
