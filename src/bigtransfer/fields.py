"""Typed settings that the command line is built from: a dataclass field made with `option()` carries its help
text and the parser of its command-line value, so one field is one flag in every command that takes it, with the
same help everywhere (`bigtransfer.commands.options` builds the flags).

The value parsers here name the flag's problem in their message (argparse prefixes the flag's name).
"""

from __future__ import annotations

import argparse
import dataclasses
import math
from collections.abc import Callable
from typing import Any

from .config import LIMITS


def option(default: Any = dataclasses.MISSING, help: str = "", *, parse: Callable[[str], Any] | None = None,
           metavar: str | None = None, choices: Any = None, required: bool = False, flag: str | None = None,
           default_factory: Any = dataclasses.MISSING) -> Any:
    """A dataclass field that is also a command-line option.

    `help` may use argparse's `%(default)s`; `parse` turns the text into the value (default: the text itself;
    bool fields are switches: `--name` for a False default, `--no-name` for a True one); `required` makes the flag
    required on the command line even where the Python API has a default; `flag` overrides `--field-name`.
    """
    metadata = dict(help=help, parse=parse, metavar=metavar, choices=choices, required=required, flag=flag)
    return dataclasses.field(default=default, default_factory=default_factory, metadata={"option": metadata})


def option_of(field: dataclasses.Field) -> dict[str, Any] | None:
    """The command-line description of a field made with `option()`, or None."""
    return field.metadata.get("option")


# ---------------------------------------------------------------------------------------------------------------
# Value parsers.


def _int_at_least(text: str, low: int) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected an integer, got {text!r}") from None
    if value < low:
        raise argparse.ArgumentTypeError(f"must be >= {low}, got {value}")
    return value


def positive_int(text: str) -> int:
    """An integer >= 1."""
    return _int_at_least(text, 1)


def non_negative_int(text: str) -> int:
    """An integer >= 0."""
    return _int_at_least(text, 0)


def batch_split(text: str) -> int | str:
    """"auto" or an integer >= 1."""
    return "auto" if text.strip().lower() == "auto" else _int_at_least(text, 1)


def non_negative_float(text: str) -> float:
    """A finite number >= 0 (NaN and infinity are refused)."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number, got {text!r}") from None
    if not (math.isfinite(value) and value >= 0):
        raise argparse.ArgumentTypeError(f"must be a finite number >= 0, got {text}")
    return value


def positive_float(text: str) -> float:
    """A finite number > 0."""
    value = non_negative_float(text)
    if value == 0:
        raise argparse.ArgumentTypeError("must be > 0, got 0")
    return value


def fraction(text: str) -> float:
    """A number in [0, 1)."""
    value = non_negative_float(text)
    if value >= 1:
        raise argparse.ArgumentTypeError(f"must be below 1, got {text}")
    return value


def positive_int_list(text: str) -> list[int]:
    """`1,5,10` -> [1, 5, 10], each >= 1, sorted, without repeats."""
    values = {_int_at_least(item.strip(), 1) for item in text.split(",") if item.strip()}
    if not values:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers, got {text!r}")
    return sorted(values)


def positive_float_list(text: str) -> list[float]:
    """`0.003,0.01` -> [0.003, 0.01], each a finite number > 0, without repeats."""
    values = list(dict.fromkeys(positive_float(item.strip()) for item in text.split(",") if item.strip()))
    if not values:
        raise argparse.ArgumentTypeError(f"expected comma-separated numbers, got {text!r}")
    return values


def name_list(text: str) -> tuple[str, ...]:
    """`a, b` -> ("a", "b")."""
    return tuple(part.strip() for part in text.split(",") if part.strip())


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


# ---------------------------------------------------------------------------------------------------------------
# Help texts shared by fields of several settings classes.

DATA_HELP = (
    "an image folder (one sub-folder per class), a CSV file of path,label rows, digits, fashion-mnist, "
    "fashion-mnist:DIR, cifar10:DIR, cifar100:DIR, wds:PATTERN (tar shards) or hf:PATH (save_to_disk or Parquet)"
)
MODEL_HELP = "a model directory, a hub id (google/bit-50), a Google name (BiT-M-R50x1), or a .npz / timm file"
TRAIN_MODEL_HELP = MODEL_HELP + ", or a variant name for random weights (tiny, R50x1, BiT-S-R50x1)"
DEVICE_HELP = "cpu, cuda or cuda:N (default: cuda when available; cuda:LOCAL_RANK under torchrun)"
BAD_IMAGE_HELP = ("unreadable images: fail (stop with an error naming the file) or skip (leave them out, listed in "
                  "the report); default %(default)s")
VAL_FRACTION_HELP = ("without evaluation data, the share of each class of --data held out for evaluation "
                     "(stratified, split seed 0 whatever --seed is; default %(default)s)")
