"""This package against transformers and timm on the same weights: the full bench (benchmarks/harness.py).

    python benchmarks/bench_models.py --workloads infer-b1,infer-b16 --rounds 5 --profile --json fp32.json
    python benchmarks/bench_models.py --variant tiny --rounds 1 --no-pipeline     # a smoke run, about 2 minutes
    python benchmarks/bench_models.py --device cuda --precision fp32,tf32,bf16    # see gpu_check.sh

Prints one row per (workload, precision, contender): images/s (median of the interleaved rounds, each contender
in its own process), peak memory the step allocates, GFLOP/s, the fraction of the peak the machine's convolution
kernels reached in the same rounds (peaks.py), and the ratio to the best peer. The header records the CPU, its
instruction sets, the threads, the versions and the peaks.
"""

from __future__ import annotations

import argparse
import json
import signal
import sys

from harness import Extras, format_report, run

from bigtransfer.bench import PRECISIONS, WORKLOADS, BenchConfig
from bigtransfer.files import write_text_atomic


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="bench_models.py", description=__doc__.split("\n\n")[0])
    parser.add_argument("--variant", default="BiT-S-R50x1", help="model shape (random weights), e.g. tiny")
    parser.add_argument("--workloads", default=",".join(WORKLOADS), help=f"comma-separated, from {', '.join(WORKLOADS)}")
    parser.add_argument("--precision", default="fp32", help=f"comma-separated, from {', '.join(PRECISIONS)}")
    parser.add_argument("--rounds", type=int, default=5, help="timed rounds per contender")
    parser.add_argument("--device", default="cpu", help="cpu or cuda")
    parser.add_argument("--threads", type=int, default=None, help="torch threads of each contender and the peaks")
    parser.add_argument("--contenders", default=None, help="comma-separated substrings of contender names to keep")
    parser.add_argument("--no-compile", action="store_true", help="skip every compiled contender")
    parser.add_argument("--no-peers", action="store_true", help="this package's contenders only")
    parser.add_argument("--no-onnx", action="store_true", help="skip ONNX Runtime fp32 and int8")
    parser.add_argument("--no-pipeline", action="store_true", help="skip the JPEG-to-top-5 pipeline")
    parser.add_argument("--profile", action="store_true", help="print where the time goes for the best of ours "
                        "and the best peer of each workload (torch.profiler)")
    parser.add_argument("--parallel-builds", action="store_true", help="build the contenders of a workload all at "
                        "once (large machines, GPUs: compiles overlap; setup times are then not comparable)")
    parser.add_argument("--json", dest="json_path", default=None, help="also write the report to this JSON file")
    args = parser.parse_args(argv)
    config = BenchConfig(
        variant=args.variant, workloads=tuple(args.workloads.split(",")), precisions=tuple(args.precision.split(",")),
        rounds=args.rounds, device=args.device, compile=not args.no_compile, threads=args.threads,
        contenders=tuple(args.contenders.split(",")) if args.contenders else None, parallel_builds=args.parallel_builds,
    )
    # A `timeout` (gpu_check.sh) exits through Python, so that multiprocessing ends the workers with it.
    signal.signal(signal.SIGTERM, lambda number, frame: sys.exit(128 + number))
    extras = Extras(peers=not args.no_peers, onnx=not args.no_onnx, pipeline=not args.no_pipeline, profile=args.profile)
    try:
        report = run(config, extras)
    except (ValueError, ImportError) as error:
        print(f"bench_models.py: {error}", file=sys.stderr)
        return 2
    print(format_report(report))
    if args.json_path:
        write_text_atomic(args.json_path, json.dumps(report, indent=2) + "\n")
        print(f"wrote {args.json_path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
