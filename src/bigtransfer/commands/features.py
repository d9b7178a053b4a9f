"""`bigtransfer features`: pre-logits features of a data set as .npy, for linear probes (`extract_features`)."""

from __future__ import annotations

import argparse

from ..data import spec_paths
from ..distributed import is_main_process
from ..inference import DataSelection, extract_features, write_features
from ..inference.evaluate import claim_features
from ..ownership import check_outside_inputs
from .options import ModelOptions, add_fields, from_args


def register(subparsers) -> None:
    parser = subparsers.add_parser("features", help="write pre-logits features (N, C) to a .npy file")
    add_fields(parser, ModelOptions)
    parser.add_argument("--output", required=True, metavar="FILE.npy",
                        help="features; labels go to FILE.labels.npy, each row's image path and the class names to "
                        "FILE.index.json; the three appear together or not at all")
    add_fields(parser, DataSelection)
    parser.add_argument("--overwrite", action="store_true",
                        help="replace FILE.labels.npy / FILE.index.json that another program wrote")
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    for path in claim_features(args.output, args.overwrite):  # refused before any feature is computed
        check_outside_inputs(path, [args.model, *spec_paths(args.data)])
    features, labels, paths, classes = extract_features(
        args.model, from_args(DataSelection, args), batch_size=args.batch_size, device=args.device,
        optimized=args.optimize, progress=args.progress, return_paths=True,
    )
    if is_main_process():
        written = write_features(args.output, features, labels, paths, classes, overwrite=args.overwrite)
        print(f"{features.shape[0]} x {features.shape[1]} features -> {written[0]}; labels -> {written[1]}; "
              f"image paths and class names -> {written[2]}")
    return 0
