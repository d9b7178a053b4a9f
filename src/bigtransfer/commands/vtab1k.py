"""`bigtransfer vtab1k`: the VTAB-1k-style protocol on user tasks (`bigtransfer.vtab.vtab1k`)."""

from __future__ import annotations

import argparse
import json
import sys

from ..fields import DATA_HELP, positive_float_list, positive_int, positive_int_list
from ..train.settings import FinetuneConfig
from . import library
from .options import add_fields, from_args

# What every run of the protocol shares with `bigtransfer finetune`, declared there.
RUN_FIELDS = ("batch_size", "batch_split", "resize", "crop", "device", "precision", "workers", "on_bad_image",
              "progress", "plots")


def register(subparsers) -> None:
    parser = subparsers.add_parser(
        "vtab1k", help="VTAB-1k-style transfer: sweep on train800/val200, retrain on 1,000, test",
        description="Per task: train800 and val200 drawn with --seed (or given in the task file), the BiT-HyperRule "
        "fine-tuning for each learning rate x schedule of the sweep scored on val200, the best retrained on all 1,000 "
        "examples and evaluated on the test data. Writes vtab1k.json and one folder per task (splits.json, runs).")
    add_fields(parser, FinetuneConfig, only=("model",))
    tasks = parser.add_mutually_exclusive_group(required=True)
    tasks.add_argument("--data", metavar="SPEC", help=f"one task's training data: {DATA_HELP}")
    tasks.add_argument("--tasks", metavar="FILE.json",
                       help='several tasks: {"tasks": [{"name", "data" | "train800" + "val200", "test", "group"}]}')
    add_fields(parser, FinetuneConfig, only=("eval_data", "classes", "val_fraction", "seed"),
               eval_data="with --data: its test data, used whole (default: the published test split, else "
               "--val-fraction of each class held out)", classes="with --data: keep only these classes",
               seed="draws train800 / val200 and seeds every run (default %(default)s)")
    parser.add_argument("--name", default="task", help="with --data: the task's name (default: task)")
    parser.add_argument("--output", required=True, metavar="DIR", help="results (vtab1k.json) and one folder per task")
    parser.add_argument("--overwrite", action="store_true", help="write into an --output that holds other files")
    parser.add_argument("--train-examples", type=positive_int, default=800, metavar="N", help="default 800")
    parser.add_argument("--val-examples", type=positive_int, default=200, metavar="N", help="default 200")
    parser.add_argument("--lrs", type=positive_float_list, metavar="LIST",
                        help="learning rates of the sweep (default: the HyperRule's 0.003, and 0.01)")
    parser.add_argument("--steps", type=positive_int_list, metavar="LIST",
                        help="schedule lengths of the sweep, the HyperRule's schedule scaled to each (default 500, "
                        "2500)")
    add_fields(parser, FinetuneConfig, only=RUN_FIELDS)
    parser.add_argument("--json", action="store_true", help="print vtab1k.json instead of the table")
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    vtab = library("vtab")
    if args.tasks:
        if args.eval_data or args.classes:
            raise ValueError("--eval-data and --classes go with --data; with --tasks, each task says its own")
        tasks = vtab.read_tasks(args.tasks)
    else:
        tasks = [vtab.VtabTask(name=args.name, data=args.data, test=args.eval_data, classes=args.classes)]
    template = from_args(FinetuneConfig, args, data="", output="", eval_data=None, classes=None, overwrite=False)
    sweep = {key: value for key, value in (("learning_rates", args.lrs), ("schedules", args.steps)) if value}
    config = vtab.Vtab1kConfig(
        model=args.model, tasks=tasks, output=args.output, train_examples=args.train_examples,
        val_examples=args.val_examples, seed=args.seed, val_fraction=args.val_fraction, overwrite=args.overwrite,
        finetune=template, **sweep,
    )
    try:
        summary = vtab.vtab1k(config)
    except vtab.Stopped as stopped:
        print(f"bigtransfer vtab1k: {stopped}; finished runs are kept", file=sys.stderr)
        return 130
    print(json.dumps(summary, indent=2) if args.json else vtab.table(summary))
    return 0
