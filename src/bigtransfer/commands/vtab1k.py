"""`bigtransfer vtab1k`: the VTAB-1k-style protocol on user tasks (`bigtransfer.vtab.vtab1k`)."""

from __future__ import annotations

import argparse
import json
import logging

from .. import hyperrule
from ..inference import PRECISIONS
from ..vtab import (
    DEFAULT_LEARNING_RATES,
    DEFAULT_SCHEDULES,
    Vtab1kConfig,
    VtabTask,
    read_tasks,
    table,
    vtab1k,
)
from . import (
    DATA_HELP,
    add_progress_argument,
    batch_split,
    fraction,
    non_negative_int,
    parse_classes,
    positive_float_list,
    positive_int,
    positive_int_list,
)


def register(subparsers) -> None:
    parser = subparsers.add_parser(
        "vtab1k", help="VTAB-1k-style transfer: sweep on train800/val200, retrain on 1,000, test",
        description="Per task: train800 and val200 drawn with --seed (or given in the task file), the BiT-HyperRule "
        "fine-tuning for each learning rate x schedule of the sweep scored on val200, the best retrained on all 1,000 "
        "examples and evaluated on the test data. Writes vtab1k.json and one folder per task (splits.json, runs).")
    parser.add_argument("--model", required=True, metavar="DIR|HUB_ID", help="the model to transfer")
    tasks = parser.add_mutually_exclusive_group(required=True)
    tasks.add_argument("--data", metavar="SPEC", help=f"one task's training data: {DATA_HELP}")
    tasks.add_argument("--tasks", metavar="FILE.json",
                       help='several tasks: {"tasks": [{"name", "data" | "train800" + "val200", "test", "group"}]}')
    parser.add_argument("--eval-data", metavar="SPEC", help="with --data: its test data, used whole (default: the "
                        "published test split, else --val-fraction of each class held out)")
    parser.add_argument("--name", default="task", help="with --data: the task's name (default: task)")
    parser.add_argument("--classes", type=parse_classes, metavar="LIST", help="with --data: keep only these classes")
    parser.add_argument("--output", required=True, metavar="DIR", help="results (vtab1k.json) and one folder per task")
    parser.add_argument("--overwrite", action="store_true", help="write into an --output that holds other files")
    parser.add_argument("--train-examples", type=positive_int, default=800, metavar="N", help="default 800")
    parser.add_argument("--val-examples", type=positive_int, default=200, metavar="N", help="default 200")
    parser.add_argument("--lrs", type=positive_float_list, default=list(DEFAULT_LEARNING_RATES), metavar="LIST",
                        help="learning rates of the sweep (default: the HyperRule's 0.003, and 0.01)")
    parser.add_argument("--steps", type=positive_int_list, default=list(DEFAULT_SCHEDULES), metavar="LIST",
                        help="schedule lengths of the sweep, the HyperRule's schedule scaled to each (default 500, 2500)")
    parser.add_argument("--seed", type=int, default=0, help="draws train800 / val200 and seeds every run (default 0)")
    parser.add_argument("--val-fraction", type=fraction, default=0.2, metavar="F",
                        help="test share held out of data without a test split or test data (default 0.2)")
    parser.add_argument("--batch-size", type=positive_int, default=hyperrule.DEFAULT_BATCH_SIZE,
                        help=f"global batch size (default the HyperRule's {hyperrule.DEFAULT_BATCH_SIZE})")
    parser.add_argument("--batch-split", type=batch_split, default="auto", metavar="N|auto",
                        help="micro-batches per step (same result, less memory; default: what fits)")
    parser.add_argument("--resize", type=positive_int, metavar="PX", help="training squash-resize (default: the rule's)")
    parser.add_argument("--crop", type=positive_int, metavar="PX", help="training crop and evaluation size")
    parser.add_argument("--device", help="cpu, cuda or cuda:N (default: cuda when available)")
    parser.add_argument("--precision", choices=PRECISIONS, default="auto", help="as for finetune")
    parser.add_argument("--workers", type=non_negative_int, default=0, help="data loading processes (default 0)")
    parser.add_argument("--on-bad-image", choices=("fail", "skip"), default="fail",
                        help="unreadable images: stop with an error naming the file, or skip them")
    add_progress_argument(parser)
    parser.add_argument("--no-plots", dest="plots", action="store_false", help="write no PNG plots in the runs")
    parser.add_argument("--json", action="store_true", help="print vtab1k.json instead of the table")
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    if args.tasks:
        if args.eval_data or args.classes:
            raise ValueError("--eval-data and --classes go with --data; with --tasks, each task says its own")
        tasks = read_tasks(args.tasks)
    else:
        tasks = [VtabTask(name=args.name, data=args.data, test=args.eval_data, classes=args.classes)]
    config = Vtab1kConfig(
        model=args.model, tasks=tasks, output=args.output, train_examples=args.train_examples,
        val_examples=args.val_examples, learning_rates=args.lrs, schedules=args.steps, seed=args.seed,
        val_fraction=args.val_fraction, overwrite=args.overwrite,
        finetune=dict(batch_size=args.batch_size, batch_split=args.batch_split, resize=args.resize, crop=args.crop,
                      device=args.device, precision=args.precision, workers=args.workers,
                      on_bad_image=args.on_bad_image, progress=args.progress, plots=args.plots),
    )
    summary = vtab1k(config)
    print(json.dumps(summary, indent=2) if args.json else table(summary))
    return 0
