"""`bigtransfer features`: pre-logits features of a data set as .npy, for linear probes (`extract_features`)."""

from __future__ import annotations

import argparse
import os

from ..data import spec_paths
from ..files import check_outside_inputs
from ..inference import extract_features, write_features
from . import add_inference_arguments, positive_int
from .finetune import DATA_HELP, parse_classes


def register(subparsers) -> None:
    parser = subparsers.add_parser("features", help="write pre-logits features (N, C) to a .npy file")
    parser.add_argument("--model", required=True, metavar="DIR", help="model directory (or hub id)")
    parser.add_argument("--data", required=True, metavar="SPEC", help=DATA_HELP)
    parser.add_argument("--output", required=True, metavar="FILE.npy", help="features; labels go to FILE.labels.npy")
    parser.add_argument("--split", choices=("train", "test"), default="train")
    parser.add_argument("--classes", type=parse_classes, metavar="LIST")
    parser.add_argument("--batch-size", type=positive_int, default=128)
    parser.add_argument("--device")
    parser.add_argument("--on-bad-image", choices=("fail", "skip"), default="fail")
    add_inference_arguments(parser)
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    check_outside_inputs(args.output, [args.model, *spec_paths(args.data)])
    features, labels = extract_features(
        args.model, args.data, split=args.split, classes=args.classes, batch_size=args.batch_size,
        device=args.device, on_bad_image=args.on_bad_image, optimized=args.optimize,
        reduced_decode=not args.full_decode,
    )
    if int(os.environ.get("RANK", "0")) == 0:
        path, labels_path = write_features(args.output, features, labels)
        print(f"{features.shape[0]} x {features.shape[1]} features -> {path}; labels -> {labels_path}")
    return 0
