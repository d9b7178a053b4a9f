"""`bigtransfer distill`: distil big BiT teachers into a small student by function matching
(`bigtransfer.train.distill`)."""

from __future__ import annotations

from ..train.settings import DistillConfig
from .finetune import register_recipe


def register(subparsers) -> None:
    register_recipe(
        subparsers, "distill", DistillConfig, help="distil teachers into a student (function matching)",
        description="Knowledge distillation as in Beyer et al. 2022 (\"a good teacher is patient and consistent\"): "
        "the student and the frozen teachers see the very same inception crop, flip and MixUp of every image; the "
        "loss is KL(teacher || student) at temperature 1 with no label term; Adam, gradient clipping at 1.0, linear "
        "warmup and cosine decay over long schedules. The defaults are the paper's ImageNet run (--preset); the "
        "options below say where each comes from. Works under torchrun for several GPUs or nodes.",
        skip=("resize",),
    )
