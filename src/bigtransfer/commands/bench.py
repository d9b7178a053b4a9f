"""`bigtransfer bench`: this package's inference and training paths timed on this machine, in one process.

The command parses its flags into a `BenchConfig` and calls `bigtransfer.benchmark.run_bench`, which times the
contenders interleaved and reports medians and ratios; see that module for how. benchmarks/bench_models.py runs
the same with transformers and timm as peers.
"""

from __future__ import annotations

import json

from ..benchmark import PRECISIONS, WORKLOADS, BenchConfig, Peers, format_report, run_bench
from ..fields import non_negative_float, positive_int
from ..files import write_text_atomic


def register(subparsers) -> None:
    parser = subparsers.add_parser(
        "bench", help="time this package's paths on this machine (eager, optimize(), ONNX Runtime, training step, "
        "JPEG pipeline)",
        description=__doc__.split("\n\n")[0],
    )
    add_arguments(parser)
    parser.set_defaults(func=run)


def add_arguments(parser) -> None:
    """The bench's options (shared with benchmarks/bench_models.py)."""
    parser.add_argument("--variant", default="BiT-S-R50x1", help="model shape, e.g. BiT-S-R50x1 (random weights)")
    parser.add_argument("--workloads", default=None,
                        help=f"comma-separated, from {', '.join(WORKLOADS)} (default: all)")
    parser.add_argument("--rounds", type=positive_int, default=None, help="timed rounds per contender (default 5, --quick 3)")
    parser.add_argument("--device", default="cpu", help="cpu or cuda")
    parser.add_argument("--precision", default="fp32",
                        help=f"comma-separated, from {', '.join(PRECISIONS)} (tf32/fp16 are for GPUs; bf16 runs on CPUs with AVX512-BF16 or AMX fast)")
    parser.add_argument("--contenders", default=None, help="comma-separated substrings of contender names to keep")
    parser.add_argument("--no-compile", action="store_true", help="skip torch.compile contenders (saves minutes)")
    parser.add_argument("--no-onnx", action="store_true", help="skip the ONNX Runtime contender")
    parser.add_argument("--no-pipeline", action="store_true", help="skip the JPEG-to-prediction pipeline")
    parser.add_argument("--quick", action="store_true",
                        help="3 rounds, batch-16 inference and the training step only, no pipeline")
    parser.add_argument("--threads", type=positive_int, default=None, help="torch.set_num_threads for this run")
    parser.add_argument("--quiet-wait", type=non_negative_float, default=300.0, metavar="SECONDS",
                        help="per workload, how long in all to wait for other processes to go quiet before samples "
                        "(shared machines; 0: never wait). Samples taken while others were busy are marked and "
                        "left out of the medians")
    parser.add_argument("--json", dest="json_path", default=None, help="write the results to this JSON file")
    parser.add_argument("--profile", action="store_true",
                        help="after timing, print where the time goes (torch.profiler, top operators) for the "
                        "fastest bigtransfer contender and the best peer of each workload")


def run(args, peers: Peers | None = None) -> int:
    workloads = tuple(args.workloads.split(",")) if args.workloads else None
    if args.quick:
        workloads = workloads or ("infer-b16", "train-b16")
    config = BenchConfig(
        variant=args.variant,
        workloads=workloads or tuple(WORKLOADS),
        rounds=args.rounds or (3 if args.quick else 5),
        device=args.device,
        precisions=tuple(args.precision.split(",")),
        compile=not args.no_compile,
        onnx=not args.no_onnx,
        pipeline=not (args.no_pipeline or args.quick),
        contenders=tuple(args.contenders.split(",")) if args.contenders else None,
        threads=args.threads,
        json_path=args.json_path,
        profile=args.profile,
        quiet_wait=args.quiet_wait,
    )
    report = run_bench(config, peers)
    print(format_report(report))
    if config.json_path:
        write_text_atomic(config.json_path, json.dumps(report, indent=2) + "\n")
        print(f"wrote {config.json_path}")
    return 0

