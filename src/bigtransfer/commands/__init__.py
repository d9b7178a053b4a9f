"""One module per CLI command; see bigtransfer.cli. Shared here: argument types that name the flag on bad values."""

from __future__ import annotations

import argparse
import math

from ..config import LIMITS

DATA_HELP = (
    "an image folder (one sub-folder per class), a CSV file of path,label rows, digits, fashion-mnist, "
    "fashion-mnist:DIR, cifar10:DIR, cifar100:DIR, wds:PATTERN (local tar shards) or hf:PATH (save_to_disk or Parquet)"
)


def positive_int(text: str) -> int:
    """An argparse type: an integer >= 1 (argparse prefixes the error with the flag's name)."""
    return _int_at_least(text, 1)


def non_negative_int(text: str) -> int:
    """An argparse type: an integer >= 0."""
    return _int_at_least(text, 0)


def _int_at_least(text: str, low: int) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected an integer, got {text!r}") from None
    if value < low:
        raise argparse.ArgumentTypeError(f"must be >= {low}, got {value}")
    return value


def batch_split(text: str) -> int | str:
    """An argparse type: "auto" or an integer >= 1."""
    return "auto" if text.strip().lower() == "auto" else _int_at_least(text, 1)


def non_negative_float(text: str) -> float:
    """An argparse type: a finite number >= 0 (NaN and infinity are refused)."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number, got {text!r}") from None
    if not (math.isfinite(value) and value >= 0):
        raise argparse.ArgumentTypeError(f"must be a finite number >= 0, got {text}")
    return value


def positive_float(text: str) -> float:
    """An argparse type: a finite number > 0."""
    value = non_negative_float(text)
    if value == 0:
        raise argparse.ArgumentTypeError("must be > 0, got 0")
    return value


def positive_int_list(text: str) -> list[int]:
    """An argparse type: `1,5,10` -> [1, 5, 10], each >= 1, sorted, without repeats."""
    values = {_int_at_least(item.strip(), 1) for item in text.split(",") if item.strip()}
    if not values:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers, got {text!r}")
    return sorted(values)


def positive_float_list(text: str) -> list[float]:
    """An argparse type: `0.003,0.01` -> [0.003, 0.01], each a finite number > 0, without repeats."""
    values = list(dict.fromkeys(positive_float(item.strip()) for item in text.split(",") if item.strip()))
    if not values:
        raise argparse.ArgumentTypeError(f"expected comma-separated numbers, got {text!r}")
    return values


def parse_classes(text: str | None) -> list[int | str] | None:
    """`5,6,7` -> [5, 6, 7]; `5-9` -> [5, 6, 7, 8, 9]; names (`Sandal,Shirt`) are kept as strings."""
    if text is None:
        return None
    classes: list[int | str] = []
    for item in (part.strip() for part in text.split(",")):
        if not item:
            continue
        low, dash, high = item.partition("-")
        if item.isdigit():
            classes.append(int(item))
        elif dash and low.isdigit() and high.isdigit():
            if len(high) > 9 or int(high) - int(low) >= LIMITS["num_labels"]:
                raise argparse.ArgumentTypeError(f"{item!r} spans more than {LIMITS['num_labels']:,} classes")
            classes.extend(range(int(low), int(high) + 1))
        else:
            classes.append(item)
    if not classes:
        raise argparse.ArgumentTypeError(f"no classes in {text!r}")
    return classes


def fraction(text: str) -> float:
    """An argparse type: a number in [0, 1)."""
    value = non_negative_float(text)
    if value >= 1:
        raise argparse.ArgumentTypeError(f"must be below 1, got {text}")
    return value


def add_data_arguments(parser: argparse.ArgumentParser, published_split: str) -> None:
    """How evaluate and features choose images and run the model."""
    parser.add_argument("--data", required=True, metavar="SPEC", help=DATA_HELP)
    parser.add_argument("--split", choices=("train", "test", "all"), default=None,
                        help=f"default: the whole data set (every image of a folder or CSV file; the published "
                        f"{published_split} split of Fashion-MNIST and CIFAR); test: the --val-fraction of each class "
                        "that finetune holds out when given no --eval-data; train: the rest")
    parser.add_argument("--val-fraction", type=fraction, default=0.2, metavar="F",
                        help="the held-out share of each class for --split test / train (default 0.2)")
    add_batch_arguments(parser)


def add_batch_arguments(parser: argparse.ArgumentParser) -> None:
    """Which classes, and how the model runs over them (evaluate, features, fewshot)."""
    parser.add_argument("--classes", type=parse_classes, metavar="LIST", help="keep only these classes, e.g. 5-9")
    parser.add_argument("--batch-size", type=positive_int, default=128, help="images per forward pass (default 128)")
    parser.add_argument("--device", help="cpu, cuda or cuda:N (default: cuda when available)")
    parser.add_argument("--on-bad-image", choices=("fail", "skip"), default="fail",
                        help="unreadable images: stop with an error naming the file, or skip them (listed)")


def add_progress_argument(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--no-progress", dest="progress", action="store_false",
                        help="no progress bar (it is shown only on a terminal anyway)")


def add_inference_arguments(parser: argparse.ArgumentParser) -> None:
    """Options of the commands that run a trained model (predict, evaluate, features)."""
    add_progress_argument(parser)
    parser.add_argument("--optimize", action="store_true",
                        help="run bigtransfer.optimize(model): folded weight standardization, channels_last, compiled "
                        "(the first batch compiles for tens of seconds; pays for hundreds of images, not a few)")
    parser.add_argument("--full-decode", action="store_true",
                        help="decode JPEGs in full (default: at the 1/2, 1/4 or 1/8 scale the model's resize allows)")
