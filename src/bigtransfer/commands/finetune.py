"""`bigtransfer finetune`: transfer a BiT model to a data set with the BiT-HyperRule (`bigtransfer.train.finetune`);
`register_recipe` and `finish` serve every training command."""

from __future__ import annotations

import argparse
import sys

from ..distributed import is_main_process
from ..train.settings import FinetuneConfig, RunSettings
from . import library
from .options import add_fields, from_args


def register(subparsers) -> None:
    register_recipe(
        subparsers, "finetune", FinetuneConfig, help="fine-tune with the BiT-HyperRule",
        description="Fine-tune a BiT model with the BiT-HyperRule: SGD momentum 0.9, no weight decay, linear warmup, "
        "step decays, MixUp (20k+ examples), zero-initialised head. Works under torchrun for several GPUs or nodes.",
    )


def register_recipe(subparsers, name: str, settings: type[RunSettings], help: str, description: str,
                    skip: tuple[str, ...] = ()) -> None:
    """A training command: its flags are the settings' fields (but `skip`); it runs
    `bigtransfer.train.<name>(settings)`."""
    parser = subparsers.add_parser(name, help=help, description=description)
    add_fields(parser, settings, skip=skip)

    def run(args: argparse.Namespace) -> int:
        return finish(getattr(library("train.run"), name)(from_args(settings, args)))

    parser.set_defaults(func=run)


def finish(result) -> int:
    """Print the outcome of a run (first process only under torchrun); exit status 128 + signal if interrupted."""
    if not is_main_process():
        return 128 + result.interrupted if result.interrupted else 0
    if result.interrupted:
        print(
            f"stopped at step {result.steps}/{result.total_steps}; checkpoint saved in {result.output_dir}; "
            "continue with the same command and --resume", file=sys.stderr,
        )
        return 128 + result.interrupted
    if result.report is not None:
        print(f"{result.report.summary()}  [{result.steps} steps, {result.seconds:.0f} s]")
    print(f"model: {result.model_dir}  report: {result.output_dir / 'report.json'}")
    return 0
