"""`bigtransfer features`: pre-logits features of a data set as .npy, for linear probes (`extract_features`)."""

from __future__ import annotations

import argparse
import os

from ..data import spec_paths
from ..files import check_outside_inputs
from ..inference import extract_features, write_features
from . import add_data_arguments, add_inference_arguments


def register(subparsers) -> None:
    parser = subparsers.add_parser("features", help="write pre-logits features (N, C) to a .npy file")
    parser.add_argument("--model", required=True, metavar="DIR", help="model directory (or hub id)")
    parser.add_argument("--output", required=True, metavar="FILE.npy",
                        help="features; labels go to FILE.labels.npy, each row's image path and the class names to "
                        "FILE.index.json")
    add_data_arguments(parser, "train")
    add_inference_arguments(parser)
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    check_outside_inputs(args.output, [args.model, *spec_paths(args.data)])
    features, labels, paths, classes = extract_features(
        args.model, args.data, split=args.split, val_fraction=args.val_fraction, classes=args.classes,
        batch_size=args.batch_size, device=args.device, on_bad_image=args.on_bad_image, optimized=args.optimize,
        reduced_decode=not args.full_decode, progress=args.progress, return_paths=True,
    )
    if int(os.environ.get("RANK", "0")) == 0:
        written = write_features(args.output, features, labels, paths, classes)
        print(f"{features.shape[0]} x {features.shape[1]} features -> {written[0]}; labels -> {written[1]}; "
              f"image paths and class names -> {written[2]}")
    return 0
