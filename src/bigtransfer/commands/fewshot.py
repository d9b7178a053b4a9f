"""`bigtransfer fewshot`: few-shot linear accuracy of a model's features, as big_vision measures it
(`bigtransfer.fewshot.fewshot`)."""

from __future__ import annotations

import argparse
import json
import os

from ..data import spec_paths
from ..fewshot import DEFAULT_L2, DEFAULT_SEEDS, DEFAULT_SHOTS, fewshot, is_fewshot_directory, write_fewshot
from ..files import claim_output
from . import (
    DATA_HELP,
    add_batch_arguments,
    add_inference_arguments,
    fraction,
    positive_float,
    positive_int,
    positive_int_list,
)


def register(subparsers) -> None:
    parser = subparsers.add_parser(
        "fewshot", help="few-shot linear accuracy of a model's features (big_vision's ridge-regression evaluator)",
        description="Pre-logits features are extracted once; for each seed and shot count, the first k of each "
        "class's seeded order are the support set (nested across shot counts), whitened, and a closed-form ridge "
        "regression onto {-1, +1} one-hot labels classifies every test image.")
    parser.add_argument("--model", required=True, metavar="DIR", help="model directory, hub id, .npz, timm file...")
    parser.add_argument("--data", required=True, metavar="SPEC", help=f"the support sets come from here: {DATA_HELP}")
    parser.add_argument("--eval-data", metavar="SPEC",
                        help="test images, used whole (default: the published test split of Fashion-MNIST and "
                        "CIFAR; for other data the --val-fraction of each class held out of --data)")
    parser.add_argument("--val-fraction", type=fraction, default=0.2, metavar="F",
                        help="held-out share of each class of --data when there is no --eval-data (default 0.2)")
    parser.add_argument("--shots", type=positive_int_list, default=list(DEFAULT_SHOTS), metavar="LIST",
                        help=f"examples per class, e.g. 1,2,5,10,25 (default {','.join(map(str, DEFAULT_SHOTS))})")
    parser.add_argument("--seeds", type=positive_int, default=DEFAULT_SEEDS, metavar="N",
                        help=f"support sets drawn with seeds 0..N-1 (default {DEFAULT_SEEDS})")
    parser.add_argument("--l2", type=positive_float, default=DEFAULT_L2,
                        help=f"ridge regularisation strength (default {DEFAULT_L2:g}, big_vision's)")
    add_batch_arguments(parser)
    parser.add_argument("--output", metavar="DIR", help="write fewshot.json (every seed) and fewshot.png here")
    parser.add_argument("--overwrite", action="store_true", help="write into an --output that holds other files")
    parser.add_argument("--json", action="store_true", help="print the report as JSON instead of a table")
    add_inference_arguments(parser)
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    if args.output:  # refused before any feature is computed
        claim_output(args.output, "bigtransfer few-shot evaluation", is_fewshot_directory,
                     [args.model, *spec_paths(args.data), *spec_paths(args.eval_data)], args.overwrite, create=False)
    report = fewshot(
        args.model, args.data, eval_data=args.eval_data, shots=args.shots, seeds=args.seeds, l2=args.l2,
        val_fraction=args.val_fraction, classes=args.classes, batch_size=args.batch_size, device=args.device,
        on_bad_image=args.on_bad_image, progress=args.progress, optimized=args.optimize,
        reduced_decode=not args.full_decode,
    )
    if int(os.environ.get("RANK", "0")) != 0:  # under torchrun the first process reports
        return 0
    if args.output:
        write_fewshot(report, args.output, keep_existing=args.overwrite)
    print(json.dumps(report.to_dict(), indent=2) if args.json else report.summary())
    return 0
