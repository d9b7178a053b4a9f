"""`bigtransfer` command line: argparse -> one library call per command.

Each command lives in `bigtransfer.commands.<name>` with `register(subparsers)` (adds its parser and sets
`func`) and a library function that does the work. Every command also takes `--threads` and `--debug` (here).
A mistyped option or command is refused with the command's own usage and the closest names. Errors print one
line that says what to do and exit non-zero; `--debug` shows the traceback.
"""

from __future__ import annotations

import argparse
import importlib
import logging
import sys

import torch

from . import __version__, machine
from .errors import BadImageError, OutOfMemoryError, did_you_mean, original_message
from .extras import missing_module_message
from .fields import positive_int
from .report import printable

# Command modules, in the order `bigtransfer --help` lists them.
COMMANDS = ["convert", "demo", "pretrain", "finetune", "distill", "evaluate", "fewshot", "vtab1k", "predict", "features",
            "export", "shard", "bench"]
TRAINING_COMMANDS = ("pretrain", "finetune", "distill")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="bigtransfer", allow_abbrev=False, description="Big Transfer (BiT): convert, pre-train, fine-tune, evaluate, measure few-shot transfer, predict, export."
    )
    parser.add_argument("--version", action="version", version=f"bigtransfer {__version__} (torch {torch.__version__})")
    parser.add_argument("--debug", action="store_true", help="show full tracebacks on errors")
    subparsers = parser.add_subparsers(dest="command", metavar="COMMAND", parser_class=_Parser)
    subparsers.required = True
    for name in COMMANDS:
        importlib.import_module(f"bigtransfer.commands.{name}").register(subparsers)
    for command in subparsers.choices.values():
        _add_common_arguments(command)
    return parser


class _Parser(argparse.ArgumentParser):
    """A command's parser: options are taken only as spelled in full (`--max-step` is not `--max-steps`)."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **dict(kwargs, allow_abbrev=False))


def _add_common_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--debug", action="store_true", default=argparse.SUPPRESS,
                        help="show full tracebacks on errors")
    try:
        parser.add_argument(
            "--threads", type=positive_int, metavar="N",
            help=f"torch CPU threads (default: the CPUs this process may use, {machine.usable_cpus()} here; on a "
            "machine other jobs keep busy, fewer run faster, e.g. 1)",
        )
    except argparse.ArgumentError:  # the command has its own (bench)
        pass


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    parser = build_parser()
    _refuse_unknown_names(parser, argv)
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    machine.set_threads(getattr(args, "threads", None))
    try:
        result = args.func(args)
    except KeyboardInterrupt:
        print("bigtransfer: interrupted", file=sys.stderr)
        return 130
    except Exception as error:
        if args.debug:
            raise
        print(f"bigtransfer {args.command}: error: {_explain(error, args)}", file=sys.stderr)
        return 2 if isinstance(error, (ValueError, TypeError, KeyError)) else 1
    return int(result or 0)


def _explain(error: Exception, args: argparse.Namespace) -> str:
    """One line: the error's own message, what to do about it where the CLI knows more, and for an error type
    nobody anticipated, that it is our bug."""
    requested = machine.failed_allocation(error)
    if requested is not None and not isinstance(error, OutOfMemoryError):
        return _out_of_memory(requested, args)
    message = error.args[0] if isinstance(error, KeyError) and error.args else error
    text = _one_line(missing_module_message(error) or message) if isinstance(error, ImportError) else _one_line(message)
    if isinstance(error, BadImageError) and getattr(args, "on_bad_image", None) == "fail":
        text += "; pass --on-bad-image skip to leave unreadable images out (they are listed in the report)"
    if not isinstance(error, (ValueError, OSError, TypeError, RuntimeError, KeyError, ImportError, MemoryError)):
        text = (f"{type(error).__name__}: {text} (unexpected; run with --debug for the traceback and please "
                "report it)")
    return text


def _out_of_memory(requested: int, args: argparse.Namespace) -> str:
    device = torch.device(getattr(args, "device", None) or "cpu")
    available = machine.available_memory(device) if device.type in ("cpu", "cuda") else None
    text = "out of memory" + (f": {machine.human_size(requested)} could not be allocated" if requested else "")
    text += f" ({machine.human_size(available)} free now)" if available is not None else ""
    if args.command in TRAINING_COMMANDS:
        return text + ("; raise --batch-split (same result, smaller micro-batches), pass --gradient-checkpointing "
                       "or lower --crop")
    if hasattr(args, "batch_size"):
        return text + f"; lower --batch-size (it was {args.batch_size})"
    return text + "; free memory (other programs) or use a machine with more"


def _refuse_unknown_names(parser: argparse.ArgumentParser, argv: list[str]) -> None:
    """A mistyped command or option is refused before argparse sees it, so the message names the closest ones and
    shows the command's own usage (argparse would report a missing required option, or the top-level usage)."""
    subparsers = next(action for action in parser._actions if isinstance(action, argparse._SubParsersAction))
    position = next((index for index, token in enumerate(argv) if not token.startswith("-")), None)
    if position is None:
        return
    command = argv[position]
    if command not in subparsers.choices:
        parser.error(f"unknown command {command!r}{did_you_mean(command, COMMANDS)}; the commands are "
                     f"{', '.join(COMMANDS)}")
    subparser = subparsers.choices[command]
    options = [name for action in subparser._actions for name in action.option_strings]
    for token in argv[position + 1 :]:
        if token == "--":
            break
        name = token.split("=", 1)[0]
        if name.startswith("--") and name not in options:
            subparser.error(f"unrecognized option {name}{did_you_mean(name, options)}")


def _one_line(message: object) -> str:
    """Messages from other libraries sometimes span lines, or carry a DataLoader worker's traceback; the CLI's
    error is always one line."""
    text = " ".join(line.strip() for line in original_message(str(message)).splitlines() if line.strip())
    return printable(text)


if __name__ == "__main__":
    sys.exit(main())
