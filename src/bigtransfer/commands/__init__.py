"""One module per CLI command; see bigtransfer.cli. Shared here: argument types that name the flag on bad values."""

from __future__ import annotations

import argparse
import math


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


def add_inference_arguments(parser: argparse.ArgumentParser) -> None:
    """Options of the commands that run a trained model (predict, evaluate, features)."""
    parser.add_argument("--optimize", action="store_true",
                        help="run bigtransfer.optimize(model): folded weight standardization, channels_last, compiled "
                        "(the first batch compiles for tens of seconds; pays for hundreds of images, not a few)")
    parser.add_argument("--full-decode", action="store_true",
                        help="decode JPEGs in full (default: at the 1/2, 1/4 or 1/8 scale the model's resize allows)")
