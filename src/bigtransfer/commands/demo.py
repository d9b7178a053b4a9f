"""`bigtransfer demo`: placeholder until the transfer experiment lands (issue 4)."""

from __future__ import annotations


def register(subparsers) -> None:
    parser = subparsers.add_parser("demo", help="run the Fashion-MNIST transfer experiment")
    parser.set_defaults(func=run)


def run(args) -> int:
    raise NotImplementedError("bigtransfer demo is not implemented yet")
