"""`bigtransfer fewshot`: few-shot linear accuracy of a model's features, as big_vision measures it
(`bigtransfer.fewshot.fewshot`)."""

from __future__ import annotations

import argparse
import json

from ..data import spec_paths
from ..distributed import is_main_process
from ..fewshot import DEFAULT_L2, DEFAULT_SEEDS, DEFAULT_SHOTS, fewshot, is_fewshot_directory, write_fewshot
from ..fields import DATA_HELP, positive_float, positive_int, positive_int_list
from ..inference import DataSelection
from ..ownership import claim_output
from .options import ModelOptions, OutputOptions, add_fields, from_args


def register(subparsers) -> None:
    parser = subparsers.add_parser(
        "fewshot", help="few-shot linear accuracy of a model's features (big_vision's ridge-regression evaluator)",
        description="Pre-logits features are extracted once; for each seed and shot count, the first k of each "
        "class's seeded order are the support set (nested across shot counts), whitened, and a closed-form ridge "
        "regression onto {-1, +1} one-hot labels classifies every test image.")
    add_fields(parser, ModelOptions)
    add_fields(parser, DataSelection, skip=("split",), data=f"the support sets come from here: {DATA_HELP}",
               val_fraction="held-out share of each class of --data when there is no --eval-data (default "
               "%(default)s)")
    parser.add_argument("--eval-data", metavar="SPEC",
                        help="test images, used whole (default: the published test split of Fashion-MNIST and "
                        "CIFAR; for other data the --val-fraction of each class held out of --data)")
    parser.add_argument("--shots", type=positive_int_list, default=list(DEFAULT_SHOTS), metavar="LIST",
                        help=f"examples per class, e.g. 1,2,5,10,25 (default {','.join(map(str, DEFAULT_SHOTS))})")
    parser.add_argument("--seeds", type=positive_int, default=DEFAULT_SEEDS, metavar="N",
                        help=f"support sets drawn with seeds 0..N-1 (default {DEFAULT_SEEDS})")
    parser.add_argument("--l2", type=positive_float, default=DEFAULT_L2,
                        help=f"ridge regularisation strength (default {DEFAULT_L2:g}, big_vision's)")
    parser.add_argument("--output", metavar="DIR", help="write fewshot.json (every seed) and fewshot.png here")
    add_fields(parser, OutputOptions)
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    if args.output:  # refused before any feature is computed
        claim_output(args.output, "bigtransfer few-shot evaluation", is_fewshot_directory,
                     [args.model, *spec_paths(args.data), *spec_paths(args.eval_data)], args.overwrite, create=False)
    report = fewshot(args.model, from_args(DataSelection, args), eval_data=args.eval_data, shots=args.shots,
                     seeds=args.seeds, l2=args.l2, batch_size=args.batch_size, device=args.device,
                     progress=args.progress, optimized=args.optimize)
    if not is_main_process():  # under torchrun the first process reports
        return 0
    if args.output:
        write_fewshot(report, args.output, keep_existing=args.overwrite)
    print(json.dumps(report.to_dict(), indent=2) if args.json else report.summary())
    return 0
