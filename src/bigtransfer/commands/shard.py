"""`bigtransfer shard`: write a data set as WebDataset tar shards (`bigtransfer.data.shard_writer`)."""

from __future__ import annotations

import argparse
from pathlib import Path

from ..data import open_source, spec_paths, whole_split
from ..data.shard_writer import is_shard_output, write_shards
from ..data.tar_index import INFO_NAME
from ..fields import DATA_HELP, fraction, parse_classes, positive_int
from ..ownership import claim_output
from ..report import progress_bar
from .options import ModelOptions, add_fields


def _is_shard_directory(path) -> bool:
    return (path / INFO_NAME).is_file() and all(is_shard_output(entry.name) for entry in path.iterdir())


def register(subparsers) -> None:
    parser = subparsers.add_parser(
        "shard", help="write a data set as WebDataset tar shards (then train from wds:DIR/shard-{...}.tar)",
        description="Images are stored as they are (JPEG, PNG, WebP files keep their bytes; arrays become PNG) with "
        "their class index in KEY.cls, in shards of --shard-size samples, plus an _info.json with the class names "
        "and shard lengths (timm's layout), and one index of every shard (_index.npz) so that readers open them without a "
        "scan. The folder is written whole or not at all.")
    parser.add_argument("--data", required=True, metavar="SPEC", help=DATA_HELP)
    parser.add_argument("--output", required=True, metavar="DIR", help="the folder of shards (new, or one written here)")
    parser.add_argument("--split", choices=("train", "test", "all"), default=None,
                        help="default: all of a folder, CSV file or shard set; the published train split of "
                        "Fashion-MNIST and CIFAR")
    parser.add_argument("--val-fraction", type=fraction, default=0.2, metavar="F",
                        help="with --split train / test: the held-out share of each class (default 0.2)")
    parser.add_argument("--classes", type=parse_classes, metavar="LIST", help="keep only these classes, e.g. 0-4")
    parser.add_argument("--shard-size", type=positive_int, default=10_000, metavar="N",
                        help="samples per shard (default 10,000)")
    parser.add_argument("--overwrite", action="store_true",
                        help="write into an --output that holds other files: its shards, index and _info.json are "
                        "replaced as a whole (no shard of the earlier set remains), other files are kept")
    add_fields(parser, ModelOptions, only=("progress",))
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    claim_output(args.output, "shard folder", _is_shard_directory, spec_paths(args.data), args.overwrite, create=False)
    source = open_source(args.data, args.split or whole_split(args.data, "train"), val_fraction=args.val_fraction,
                         classes=args.classes)
    bar = progress_bar(args.progress, len(source), 0, "shard", unit="img")
    try:
        info = write_shards(source, args.output, args.shard_size, name=str(args.data), overwrite=args.overwrite,
                            progress=bar)
    finally:
        if bar is not None:
            bar.close()
    shards = info["splits"]["train"]["filenames"]
    print(f"{len(source)} images of {len(source.classes)} classes -> {len(shards)} shard(s) in {args.output}; train "
          f"from wds:{Path(args.output) / f'shard-{{{0:06d}..{len(shards) - 1:06d}}}.tar'}")
    return 0
