"""`bigtransfer pretrain`: upstream pre-training with the BiT paper's recipe (`bigtransfer.train.pretrain`)."""

from __future__ import annotations

from ..train.settings import PretrainConfig
from .finetune import register_recipe


def register(subparsers) -> None:
    register_recipe(
        subparsers, "pretrain", PretrainConfig, help="pre-train (upstream) with the paper's recipe",
        description="Pre-train a BiT model: SGD momentum 0.9, lr 0.03 x batch/256, linear warmup, weight decay 1e-4, "
        "/10 decays at 30, 60 and 80 % of training, softmax or sigmoid cross-entropy.",
    )
