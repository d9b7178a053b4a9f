"""`bigtransfer predict`: top-k labels and probabilities for image files (`bigtransfer.inference.predict`)."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from ..data import IMAGE_EXTENSIONS, image_files
from ..fields import positive_int
from ..inference import DataSelection, predict
from ..report import printable
from .options import ModelOptions, add_fields


def register(subparsers) -> None:
    parser = subparsers.add_parser("predict", help="classify image files")
    add_fields(parser, ModelOptions, skip=("batch_size",))
    parser.add_argument("images", nargs="+", metavar="IMAGE",
                        help="image files (JPEG, PNG, WebP, TIFF, ...) or folders (their images, sorted, sub-folders "
                        "included; `bigtransfer evaluate` scores a labelled folder)")
    parser.add_argument("--top-k", type=positive_int, default=5, help="labels shown per image, best first (default 5)")
    parser.add_argument("--json", action="store_true",
                        help="one JSON object per image: {image, predictions: [{label, score}]}")
    add_fields(parser, DataSelection, only=("reduced_decode",))
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    images = [path for name in args.images for path in _files(name)]
    results = predict(args.model, images, args.top_k, args.device, optimized=args.optimize,
                      reduced_decode=args.reduced_decode, progress=args.progress)
    for image, predictions in zip(images, results, strict=True):
        if args.json:
            print(json.dumps({"image": image, "predictions": [{"label": label, "score": score}
                                                              for label, score in predictions]}))
        else:
            print(printable(image))
            for label, score in predictions:
                print(f"  {score:7.2%}  {printable(label)}")
    return 0


def _files(name: str) -> list[str]:
    """A file as it is; a folder's image files (ValueError naming a folder without any)."""
    if not Path(name).is_dir():
        return [name]
    found = image_files(Path(name))
    if not found:
        raise ValueError(f"{name} is a folder with no image files ({', '.join(IMAGE_EXTENSIONS)})")
    return found
