"""`bigtransfer demo`: the Fashion-MNIST transfer experiment (`bigtransfer.demo.run_demo`), end to end.

Pre-train `tiny` and `tiny-wide` on 2, 3 and 5 Fashion-MNIST classes; measure transfer to the unseen classes
5-9 (and digits) against random initialisation with the few-shot linear evaluator and with HyperRule fine-tuning,
paired by seed; print the tables and write results.json and plots into the runs directory. `--quick` runs a short
version into runs/demo-quick; finished runs are reused when the demo is started again with the same settings.
"""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

from ..fields import positive_int, positive_int_list
from . import library


def register(subparsers) -> None:
    parser = subparsers.add_parser(
        "demo", help="run the Fashion-MNIST transfer experiment",
        description="Pre-train tiny BiTs on 2, 3 and 5 Fashion-MNIST classes, measure transfer to the unseen classes "
        "5-9 (and digits) at 1-25 examples per class against random initialisation, paired by seed, with the few-shot "
        "linear evaluator and with HyperRule fine-tuning; print the tables, write results.json and plots "
        "(docs/make_results.py turns them into RESULTS.md with 95 % confidence intervals).",
    )
    parser.add_argument("--quick", action="store_true",
                        help="tiny on 5 classes only, shots 1/5/10, 1 fine-tuning and 3 linear seeds, 2 upstream epochs "
                        "(a few minutes)")
    parser.add_argument("--runs-dir", type=Path, help="where the runs go (default runs/demo, runs/demo-quick)")
    parser.add_argument("--seeds", type=positive_int, metavar="N",
                        help="seeds per cell for both protocols (default: 10 for the linear one and for fine-tuning "
                        "up to 5 shots, 5 above; quick 3 and 1)")
    parser.add_argument("--shots", type=positive_int_list, metavar="LIST",
                        help="examples per class (default 1,2,5,10,25; quick 1,5,10)")
    parser.add_argument("--upstream-classes", type=positive_int_list, metavar="LIST",
                        help="upstream breadths: the first k of Fashion-MNIST classes 0-4 (default 2,3,5; quick 5)")
    parser.add_argument("--architectures", type=lambda text: tuple(text.split(",")), metavar="LIST",
                        help="of tiny, tiny-wide; the first is fine-tuned (default tiny,tiny-wide; quick tiny)")
    parser.add_argument("--linear-pool", type=positive_int, metavar="N",
                        help="the linear protocol draws its support sets from the first N images per class (default: "
                        "all 6,000)")
    parser.add_argument("--upstream-epochs", type=float, help="pre-training epochs (default 8; quick 2)")
    parser.add_argument("--finetune-steps", type=positive_int, help="fine-tuning steps (default 100)")
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    demo = library("demo")
    overrides: dict[str, Any] = {}
    if args.runs_dir:
        overrides["runs_dir"] = args.runs_dir
    if args.seeds:
        overrides.update(finetune_seeds=args.seeds, finetune_seeds_many=args.seeds, linear_seeds=args.seeds)
    if args.shots:
        overrides["shots"] = tuple(args.shots)
    if args.upstream_classes:
        if max(args.upstream_classes) > 5:
            raise ValueError(f"--upstream-classes: at most the 5 classes 0-4, got {max(args.upstream_classes)}")
        overrides["upstream_classes"] = tuple(args.upstream_classes)
    if args.architectures:
        unknown = [name for name in args.architectures if name not in demo.ARCHITECTURES]
        if unknown:
            raise ValueError(f"--architectures: unknown {unknown}; known: {', '.join(demo.ARCHITECTURES)}")
        overrides["architectures"] = args.architectures
    if args.linear_pool:
        overrides["linear_pool"] = args.linear_pool
    if args.upstream_epochs:
        overrides["upstream_epochs"] = args.upstream_epochs
    if args.finetune_steps:
        overrides["finetune_steps"] = args.finetune_steps
    if args.threads:
        overrides["threads"] = args.threads
    config = demo.DemoConfig.quick_version(**overrides) if args.quick else demo.DemoConfig(**overrides)
    summary = demo.run_demo(config)
    print(summary)
    print(f"results: {config.runs_dir / demo.RESULTS_NAME} (python docs/make_results.py {config.runs_dir} RESULTS.md "
          "writes the page)")
    return 0
