"""Every flag is declared once: as a field of a settings class (`fields.option`), from which `add_fields` builds
the flag of each command that takes it, with the same help everywhere, and `from_args` builds the typed settings
back from the parsed arguments. A new option is one field.

The settings classes are the library's own (`FinetuneConfig`, `PretrainConfig`, `DataSelection`) and, for what
only the command line has, `ModelOptions` and `OutputOptions` below.
"""

from __future__ import annotations

import argparse
import dataclasses
from collections.abc import Iterable
from typing import Any

from ..fields import DEVICE_HELP, MODEL_HELP, option, option_of, positive_int


@dataclasses.dataclass
class ModelOptions:
    """How the commands that run a trained model load and run it."""

    model: str = option("", MODEL_HELP, metavar="SOURCE", required=True)
    batch_size: int = option(128, "images per forward pass (default %(default)s)", parse=positive_int)
    device: str | None = option(None, DEVICE_HELP)
    progress: bool = option(True, "no progress bar (it is shown only on a terminal anyway)")
    optimize: bool = option(False, "run bigtransfer.optimize(model): folded weight standardization, channels_last, "
                            "compiled (the first batch compiles for tens of seconds; pays for hundreds of images, "
                            "not a few)")


@dataclasses.dataclass
class OutputOptions:
    """Where a command's results go."""

    overwrite: bool = option(False, "write into an --output that holds other files")
    json: bool = option(False, "print the result as JSON")


def add_fields(parser: argparse.ArgumentParser, settings: type, only: Iterable[str] | None = None,
               skip: Iterable[str] = (), **help_overrides: str) -> None:
    """Add a flag for each `option()` field of `settings` (those in `only`, if given; none in `skip`)."""
    wanted = None if only is None else list(only)
    fields = {field.name: field for field in dataclasses.fields(settings) if option_of(field) is not None}
    # The model first, as a command line reads: `finetune --model M --data D --output O ...`.
    order = wanted if wanted is not None else sorted(fields, key=lambda name: name != "model")
    names = [name for name in order if name not in set(skip)]
    for name in names:
        _add(parser, fields[name], help_overrides.get(name))


def _add(parser: argparse.ArgumentParser, field: dataclasses.Field, help_override: str | None) -> None:
    meta = option_of(field)
    flag = meta["flag"] or "--" + field.name.replace("_", "-")
    default = field.default if field.default is not dataclasses.MISSING else field.default_factory()
    text = help_override or meta["help"]
    if isinstance(default, bool) and meta["parse"] is None:
        if default:
            flag = meta["flag"] or "--no-" + field.name.replace("_", "-")
        parser.add_argument(flag, dest=field.name, action="store_false" if default else "store_true", help=text)
        return
    arguments: dict[str, Any] = dict(dest=field.name, help=text, metavar=meta["metavar"], choices=meta["choices"])
    if meta["parse"] is not None:
        arguments["type"] = meta["parse"]
    if meta["required"]:
        arguments["required"] = True
    else:
        arguments["default"] = default
    parser.add_argument(flag, **arguments)


def from_args(settings: type, args: argparse.Namespace, **values: Any) -> Any:
    """`settings` built from the parsed flags of its fields (those the command has), and `values`."""
    given = {field.name: getattr(args, field.name) for field in dataclasses.fields(settings)
             if option_of(field) is not None and hasattr(args, field.name)}
    return settings(**{**given, **values})
