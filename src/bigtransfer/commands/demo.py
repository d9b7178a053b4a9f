"""`bigtransfer demo`: the Fashion-MNIST transfer experiment (`bigtransfer.demo.run_demo`), end to end.

Pre-train the `tiny` BiT on Fashion-MNIST classes 0-4, transfer to classes 5-9 and to scikit-learn's digits at
1-25 examples per class against random initialisation; print the tables and write results.json and plots into
the runs directory. `--quick` runs a short version into runs/demo-quick; finished runs are reused when the demo is
started again with the same settings.
"""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

from ..demo import RESULTS_NAME, DemoConfig, run_demo
from . import positive_int


def register(subparsers) -> None:
    parser = subparsers.add_parser(
        "demo", help="run the Fashion-MNIST transfer experiment",
        description="Pre-train tiny BiT on Fashion-MNIST classes 0-4, transfer to classes 5-9 and to digits at 1-25 "
        "examples per class against random initialisation; print the tables, write results.json and plots "
        "(docs/make_results.py turns them into RESULTS.md).",
    )
    parser.add_argument("--quick", action="store_true", help="one seed, shots 1/5/10, short upstream (a few minutes)")
    parser.add_argument("--runs-dir", type=Path, help="where the runs go (default runs/demo, runs/demo-quick)")
    parser.add_argument("--seeds", type=positive_int, help="number of seeds (default 3; quick 1)")
    parser.add_argument("--shots", help="comma-separated examples per class (default 1,2,5,10,25; quick 1,5,10)")
    parser.add_argument("--upstream-epochs", type=float, help="pre-training epochs (default 24; quick 3)")
    parser.add_argument("--finetune-steps", type=positive_int, help="fine-tuning steps (default 100)")
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    overrides: dict[str, Any] = {}
    if args.runs_dir:
        overrides["runs_dir"] = args.runs_dir
    if args.seeds:
        overrides["seeds"] = tuple(range(args.seeds))
    if args.shots:
        overrides["shots"] = tuple(int(s) for s in args.shots.split(","))
    if args.upstream_epochs:
        overrides["upstream_epochs"] = args.upstream_epochs
    if args.finetune_steps:
        overrides["finetune_steps"] = args.finetune_steps
    if args.threads:
        overrides["threads"] = args.threads
    config = DemoConfig.quick_version(**overrides) if args.quick else DemoConfig(**overrides)
    summary = run_demo(config)
    print(summary)
    print(f"results: {config.runs_dir / RESULTS_NAME} (python docs/make_results.py {config.runs_dir} RESULTS.md "
          "writes the page)")
    return 0
