"""`bigtransfer evaluate`: top-1, top-5, loss, per-class accuracy and confusion matrix (`bigtransfer.inference.evaluate`)."""

from __future__ import annotations

import argparse

from ..data import spec_paths
from ..distributed import is_main_process
from ..inference import DataSelection, evaluate
from ..ownership import claim_output
from ..report import is_evaluation_directory, to_json, write_evaluation
from .options import ModelOptions, OutputOptions, add_fields, from_args


def register(subparsers) -> None:
    parser = subparsers.add_parser("evaluate", help="evaluate a classifier on a data set")
    add_fields(parser, ModelOptions)
    add_fields(parser, DataSelection)
    parser.add_argument("--output", metavar="DIR", help="write report.json, accuracy.png and confusion_matrix.png here")
    add_fields(parser, OutputOptions)
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    if args.output:  # refused before anything is evaluated, on every rank
        claim_output(args.output, "bigtransfer evaluation", is_evaluation_directory, [args.model, *spec_paths(args.data)],
                     args.overwrite, create=False)
    report = evaluate(args.model, from_args(DataSelection, args), batch_size=args.batch_size, device=args.device,
                      optimized=args.optimize, progress=args.progress)
    if not is_main_process():  # under torchrun the first process reports
        return 0
    if args.output:
        write_evaluation(report, args.output, keep_existing=args.overwrite)
    print(to_json(report) if args.json else report.summary())
    return 0
