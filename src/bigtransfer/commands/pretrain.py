"""`bigtransfer pretrain`: upstream pre-training with the BiT paper's recipe (`bigtransfer.train.pretrain`)."""

from __future__ import annotations

import argparse
import logging

from .. import hyperrule
from ..fewshot import DEFAULT_SEEDS, DEFAULT_SHOTS
from ..train import PretrainConfig, pretrain
from . import DATA_HELP, non_negative_int, positive_int, positive_int_list
from .finetune import add_run_arguments, finish, run_settings


def register(subparsers) -> None:
    parser = subparsers.add_parser(
        "pretrain", help="pre-train (upstream) with the paper's recipe",
        description="Pre-train a BiT model: SGD momentum 0.9, lr 0.03 x batch/256, linear warmup, weight decay 1e-4, "
        "/10 decays at 30, 60 and 80 % of training, softmax or sigmoid cross-entropy.",
    )
    parser.add_argument("--model", default="BiT-M-R50x1", metavar="VARIANT|DIR",
                        help="a variant name (random init; default BiT-M-R50x1) or a model directory to continue from")
    add_run_arguments(parser, 4096)
    parser.add_argument("--epochs", type=float, default=90.0, help="passes over the data (default 90; --max-steps wins)")
    parser.add_argument("--base-lr", type=float, default=hyperrule.UPSTREAM_BASE_LR, help="lr per 256 images (default 0.03)")
    parser.add_argument("--warmup-steps", type=non_negative_int, help="linear warmup steps (default 5 %% of training)")
    parser.add_argument("--weight-decay", type=float, default=1e-4, help="L2 weight decay of SGD (default 1e-4)")
    parser.add_argument("--loss", choices=("softmax", "sigmoid"), default="softmax", help="cross-entropy kind")
    parser.add_argument("--fewshot-every", type=non_negative_int, default=0, metavar="N",
                        help="every N steps and at the end, the few-shot linear evaluator (bigtransfer fewshot) on "
                        "--fewshot-data, logged to metrics.jsonl and fewshot.png (default 0: never)")
    parser.add_argument("--fewshot-data", metavar="SPEC",
                        help="data for it: support sets from its training part, tested on its test split or "
                        f"held-out --val-fraction; {DATA_HELP}")
    parser.add_argument("--fewshot-shots", type=positive_int_list, default=list(DEFAULT_SHOTS), metavar="LIST",
                        help=f"examples per class (default {','.join(map(str, DEFAULT_SHOTS))})")
    parser.add_argument("--fewshot-seeds", type=positive_int, default=DEFAULT_SEEDS, metavar="N",
                        help=f"support sets drawn with seeds 0..N-1 (default {DEFAULT_SEEDS})")
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    config = PretrainConfig(
        model=args.model, epochs=args.epochs, base_lr=args.base_lr, warmup_steps=args.warmup_steps,
        weight_decay=args.weight_decay, loss=args.loss, fewshot_every=args.fewshot_every,
        fewshot_data=args.fewshot_data, fewshot_shots=args.fewshot_shots, fewshot_seeds=args.fewshot_seeds,
        **run_settings(args),
    )
    return finish(pretrain(config))
