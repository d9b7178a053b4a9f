"""`bigtransfer predict`: top-k labels and probabilities for image files (`bigtransfer.inference.predict`)."""

from __future__ import annotations

import argparse
import json

from ..inference import predict
from ..report import printable
from . import add_inference_arguments, positive_int


def register(subparsers) -> None:
    parser = subparsers.add_parser("predict", help="classify image files")
    parser.add_argument("--model", required=True, metavar="DIR", help="model directory (or hub id)")
    parser.add_argument("images", nargs="+", metavar="IMAGE", help="image files (JPEG, PNG, WebP, TIFF, ...)")
    parser.add_argument("--top-k", type=positive_int, default=5, help="labels shown per image, best first (default 5)")
    parser.add_argument("--device", help="cpu, cuda or cuda:N (default: cuda when available)")
    parser.add_argument("--json", action="store_true", help="one JSON object per image: {image, predictions: [{label, score}]}")
    add_inference_arguments(parser)
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    results = predict(args.model, args.images, args.top_k, args.device, optimized=args.optimize,
                      reduced_decode=not args.full_decode, progress=args.progress)
    for image, predictions in zip(args.images, results, strict=True):
        if args.json:
            print(json.dumps({"image": image, "predictions": [{"label": label, "score": score} for label, score in predictions]}))
        else:
            print(printable(image))
            for label, score in predictions:
                print(f"  {score:7.2%}  {printable(label)}")
    return 0
