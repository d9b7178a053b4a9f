"""`bigtransfer pretrain`: upstream pre-training with the BiT paper's recipe (`bigtransfer.train.pretrain`)."""

from __future__ import annotations

import argparse

from ..train.settings import PretrainConfig
from . import library
from .finetune import finish
from .options import add_fields, from_args


def register(subparsers) -> None:
    parser = subparsers.add_parser(
        "pretrain", help="pre-train (upstream) with the paper's recipe",
        description="Pre-train a BiT model: SGD momentum 0.9, lr 0.03 x batch/256, linear warmup, weight decay 1e-4, "
        "/10 decays at 30, 60 and 80 % of training, softmax or sigmoid cross-entropy.",
    )
    add_fields(parser, PretrainConfig)
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    return finish(library("train.run").pretrain(from_args(PretrainConfig, args)))
