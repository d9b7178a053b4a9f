"""`bigtransfer` command line: argparse -> one library call per command.

Each command lives in `bigtransfer.commands.<name>` with `register(subparsers)` (adds its parser and sets
`func`) and a library function that does the work. Errors print one line and exit non-zero; `--debug` shows
the traceback.
"""

from __future__ import annotations

import argparse
import importlib
import sys

from .errors import original_message
from .report import printable

# Command modules, in the order `bigtransfer --help` lists them.
COMMANDS = ["convert", "demo", "pretrain", "finetune", "evaluate", "predict", "features", "export", "bench"]


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="bigtransfer", description="Big Transfer (BiT): convert, fine-tune, evaluate, predict, export."
    )
    parser.add_argument("--debug", action="store_true", help="show full tracebacks on errors")
    subparsers = parser.add_subparsers(dest="command", metavar="COMMAND")
    subparsers.required = True
    for name in COMMANDS:
        importlib.import_module(f"bigtransfer.commands.{name}").register(subparsers)
    return parser


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    args = build_parser().parse_args(argv)
    try:
        result = args.func(args)
    except KeyboardInterrupt:
        print("bigtransfer: interrupted", file=sys.stderr)
        return 130
    except MemoryError:
        if args.debug:
            raise
        print(f"bigtransfer {args.command}: error: out of memory; for training, raise --batch-split (same result, "
              "smaller micro-batches) or pass --gradient-checkpointing; elsewhere, lower --batch-size", file=sys.stderr)
        return 1
    except (ValueError, OSError, TypeError, RuntimeError, KeyError, ImportError) as error:
        if args.debug:
            raise
        message = error.args[0] if isinstance(error, KeyError) and error.args else error
        print(f"bigtransfer {args.command}: error: {_one_line(message)}", file=sys.stderr)
        return 2 if isinstance(error, (ValueError, TypeError, KeyError)) else 1
    except Exception as error:  # a bug or an error type nobody anticipated: still one line, never a traceback
        if args.debug:
            raise
        print(
            f"bigtransfer {args.command}: error: {type(error).__name__}: {_one_line(error)} "
            "(unexpected; run with --debug for the traceback and please report it)",
            file=sys.stderr,
        )
        return 1
    return int(result or 0)


def _one_line(message: object) -> str:
    """Messages from other libraries sometimes span lines, or carry a DataLoader worker's traceback; the CLI's
    error is always one line."""
    text = " ".join(line.strip() for line in original_message(str(message)).splitlines() if line.strip())
    return printable(text)


if __name__ == "__main__":
    sys.exit(main())
