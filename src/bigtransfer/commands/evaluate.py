"""`bigtransfer evaluate`: top-1, top-5, loss, per-class accuracy and confusion matrix (`bigtransfer.inference.evaluate`)."""

from __future__ import annotations

import argparse
import os

from ..data import spec_paths
from ..files import claim_output
from ..inference import evaluate
from ..report import is_evaluation_directory, to_json, write_evaluation
from . import add_data_arguments, add_inference_arguments


def register(subparsers) -> None:
    parser = subparsers.add_parser("evaluate", help="evaluate a classifier on a data set")
    parser.add_argument("--model", required=True, metavar="DIR", help="model directory (or hub id)")
    add_data_arguments(parser, "test")
    parser.add_argument("--output", metavar="DIR", help="write report.json, accuracy.png and confusion_matrix.png here")
    parser.add_argument("--overwrite", action="store_true", help="write into an --output that holds other files")
    parser.add_argument("--json", action="store_true", help="print the whole report as JSON")
    add_inference_arguments(parser)
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    main_process = int(os.environ.get("RANK", "0")) == 0  # under torchrun the first process reports
    if args.output:  # refused before anything is evaluated, on every rank
        claim_output(args.output, "bigtransfer evaluation", is_evaluation_directory, [args.model, *spec_paths(args.data)],
                     args.overwrite, create=False)
    report = evaluate(
        args.model, args.data, split=args.split, val_fraction=args.val_fraction, classes=args.classes,
        batch_size=args.batch_size,
        device=args.device, on_bad_image=args.on_bad_image, optimized=args.optimize,
        reduced_decode=not args.full_decode, progress=args.progress,
    )
    if not main_process:
        return 0
    if args.output:
        write_evaluation(report, args.output, keep_existing=args.overwrite)
    if args.json:
        print(to_json(report))
    else:
        print(report.summary())
    return 0
