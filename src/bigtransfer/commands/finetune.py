"""`bigtransfer finetune`: transfer a BiT model to a data set with the BiT-HyperRule (`bigtransfer.train.finetune`)."""

from __future__ import annotations

import argparse
import logging
import os
import sys

from .. import hyperrule
from ..inference import PRECISIONS
from ..tracking import TRACKERS
from ..train import FinetuneConfig, finetune
from . import (
    DATA_HELP,
    add_progress_argument,
    batch_split,
    fraction,
    non_negative_int,
    parse_classes,
    positive_int,
)


def add_run_arguments(parser: argparse.ArgumentParser, batch_size: int) -> None:
    """Options shared by finetune and pretrain."""
    parser.add_argument("--data", required=True, metavar="SPEC", help=DATA_HELP)
    parser.add_argument("--output", required=True, metavar="RUN_DIR", help="run directory (metrics, model, report, plots, checkpoint)")
    parser.add_argument("--classes", type=parse_classes, metavar="LIST", help="keep only these classes, e.g. 5-9 or 0,1,2 or Sandal,Shirt")
    parser.add_argument("--eval-data", metavar="SPEC",
                        help="evaluation data, used whole, as is --data then (default: --val-fraction of each class "
                        "of --data held out; Fashion-MNIST and CIFAR use their published test split)")
    parser.add_argument("--val-fraction", type=fraction, default=0.2, metavar="F",
                        help="without --eval-data, the share of each class of --data held out for evaluation "
                        "(stratified, split seed 0 whatever --seed is; default 0.2)")
    parser.add_argument("--batch-size", type=positive_int, default=batch_size, help=f"global batch size (default {batch_size})")
    parser.add_argument("--batch-split", type=batch_split, default="auto", metavar="N|auto",
                        help="compute each batch in N micro-batches (same result, less memory); auto (the default): "
                        "the fewest that fit this machine's free memory, measured on a small probe")
    parser.add_argument("--max-steps", type=positive_int, metavar="N", help="train for N optimizer steps (the whole learning-rate schedule is scaled to fit)")
    parser.add_argument("--seed", type=int, default=0,
                        help="seeds the initialisation of a variant, the data order, crops, flips and MixUp, and "
                        "which --shots examples are drawn (default 0)")
    parser.add_argument("--resize", type=positive_int, metavar="PX", help="training squash-resize before the random crop")
    parser.add_argument("--crop", type=positive_int, metavar="PX", help="training crop and evaluation size")
    parser.add_argument("--save-every", type=non_negative_int, default=0, metavar="N", help="checkpoint every N steps (always at the end)")
    parser.add_argument("--eval-every", type=non_negative_int, default=0, metavar="N", help="evaluate every N steps")
    parser.add_argument("--resume", action="store_true", help="continue the run in --output from its checkpoint")
    parser.add_argument("--overwrite", action="store_true",
                        help="start the run in --output again (its previous files are replaced), or write into an "
                        "existing folder that is not a run directory")
    parser.add_argument("--on-bad-image", choices=("fail", "skip"), default="fail",
                        help="unreadable images: stop with an error naming the file, or skip and list them in the report")
    parser.add_argument("--device", help="cpu, cuda or cuda:N (default: cuda when available)")
    parser.add_argument("--precision", choices=PRECISIONS, default="auto",
                        help="auto: bf16 (or fp16) mixed precision on GPUs, fp32 on CPUs; bf16 also runs on CPUs "
                        "(fast with AVX512-BF16 or AMX); fp16 needs a GPU")
    parser.add_argument("--workers", type=non_negative_int, default=0, help="data loading processes")
    parser.add_argument("--gradient-checkpointing", action="store_true", help="recompute activations: less memory")
    parser.add_argument("--compile", action="store_true",
                        help="compile the training step with TorchInductor (the first step and the first "
                        "evaluation compile for a minute or more; see the README's speed section for when it pays)")
    add_progress_argument(parser)
    parser.add_argument("--no-plots", dest="plots", action="store_false", help="write no PNG plots")
    parser.add_argument("--report-to", type=lambda text: tuple(part.strip() for part in text.split(",") if part.strip()),
                        default=(), metavar="LIST",
                        help=f"also log the metrics to {', '.join(TRACKERS)} (comma-separated; tensorboard writes "
                        "RUN_DIR/tensorboard, wandb runs offline, mlflow to RUN_DIR/mlruns unless configured)")


def run_settings(args: argparse.Namespace) -> dict:
    return dict(
        data=args.data, output=args.output, classes=args.classes, eval_data=args.eval_data,
        val_fraction=args.val_fraction,
        batch_size=args.batch_size, batch_split=args.batch_split, max_steps=args.max_steps, seed=args.seed,
        resize=args.resize, crop=args.crop, save_every=args.save_every, eval_every=args.eval_every,
        resume=args.resume, overwrite=args.overwrite, on_bad_image=args.on_bad_image, device=args.device, precision=args.precision,
        workers=args.workers, gradient_checkpointing=args.gradient_checkpointing, compile=args.compile, progress=args.progress,
        plots=args.plots, report_to=args.report_to,
    )


def finish(result) -> int:
    """Print the outcome of a run (first process only under torchrun); exit status 128 + signal if interrupted."""
    if int(os.environ.get("RANK", "0")) != 0:
        return 128 + result.interrupted if result.interrupted else 0
    if result.interrupted:
        print(
            f"stopped at step {result.steps}/{result.total_steps}; checkpoint saved in {result.output_dir}; "
            "continue with the same command and --resume", file=sys.stderr,
        )
        return 128 + result.interrupted
    if result.report is not None:
        print(f"{result.report.summary()}  [{result.steps} steps, {result.seconds:.0f} s]")
    print(f"model: {result.model_dir}  report: {result.output_dir / 'report.json'}")
    return 0


def register(subparsers) -> None:
    parser = subparsers.add_parser(
        "finetune", help="fine-tune with the BiT-HyperRule",
        description="Fine-tune a BiT model with the BiT-HyperRule: SGD momentum 0.9, no weight decay, linear warmup, "
        "step decays, MixUp (20k+ examples), zero-initialised head. Works under torchrun for several GPUs or nodes.",
    )
    parser.add_argument("--model", required=True, metavar="DIR|HUB_ID|VARIANT",
                        help="a model directory, a hub id, or a variant name (tiny, BiT-M-R50x1, ...) for random init")
    add_run_arguments(parser, hyperrule.DEFAULT_BATCH_SIZE)
    parser.add_argument("--base-lr", type=float, default=hyperrule.DEFAULT_BASE_LR, help="peak learning rate (default 0.003)")
    parser.add_argument("--shots", type=positive_int, metavar="K", help="train on K examples per class (chosen with --seed)")
    parser.add_argument("--preset", choices=sorted(hyperrule.PRESETS), default="code",
                        help="HyperRule tables: code (the released code's, default) or paper (its schedules: decays at "
                        "30, 60, 90 %%)")
    parser.add_argument("--freeze-backbone", action="store_true", help="train the head only (linear probe)")
    parser.add_argument("--mixup-alpha", type=float, help="override the rule's MixUp alpha (0 disables)")
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    config = FinetuneConfig(
        model=args.model, base_lr=args.base_lr, shots=args.shots, preset=args.preset,
        freeze_backbone=args.freeze_backbone, mixup_alpha=args.mixup_alpha, **run_settings(args),
    )
    return finish(finetune(config))
