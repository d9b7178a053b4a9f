"""`bigtransfer bench`: this package's inference and training paths timed on this machine.

Parses the flags into a `BenchConfig` and calls `bigtransfer.bench.run_bench` (each contender in its own process,
interleaved rounds, medians); benchmarks/bench_models.py adds transformers and timm as peers.
"""

from __future__ import annotations

import json

from ..fields import positive_int
from ..files import write_text_atomic
from ..precision import PRECISIONS
from . import library

WORKLOADS = "infer-b1,infer-b16,train-b16"  # bigtransfer.bench.WORKLOADS, named here so the parser loads no bench


def register(subparsers) -> None:
    parser = subparsers.add_parser(
        "bench", help="time this package's paths on this machine (eager, optimize(), the training step)",
        description=__doc__.split("\n\n")[0],
    )
    parser.add_argument("--variant", default="BiT-S-R50x1", help="model shape, e.g. BiT-S-R50x1 (random weights)")
    parser.add_argument("--workloads", default=WORKLOADS, help=f"comma-separated, from {WORKLOADS}")
    parser.add_argument("--rounds", type=positive_int, default=5, help="timed rounds per contender")
    parser.add_argument("--device", default="cpu", help="cpu or cuda")
    parser.add_argument("--precision", default="fp32", help=f"comma-separated, from {', '.join(PRECISIONS[1:])}, tf32 ("
                        "and fp16 on GPUs; bf16 is fast on GPUs and CPUs with AVX512-BF16 or AMX)")
    parser.add_argument("--contenders", default=None, help="comma-separated substrings of contender names to keep")
    parser.add_argument("--no-compile", action="store_true", help="skip the compiled contenders (saves minutes)")
    parser.add_argument("--threads", type=positive_int, default=None, help="torch threads of each contender")
    parser.add_argument("--json", dest="json_path", default=None, help="also write the rows to this JSON file")
    parser.set_defaults(func=run)


def run(args) -> int:
    bench = library("bench")
    config = bench.BenchConfig(
        variant=args.variant, workloads=tuple(args.workloads.split(",")), rounds=args.rounds, device=args.device,
        precisions=tuple(args.precision.split(",")), compile=not args.no_compile, threads=args.threads,
        contenders=tuple(args.contenders.split(",")) if args.contenders else None,
    )
    rows = bench.run_bench(config)
    print(f"{'workload':<10} {'prec':<5} {'contender':<50} {'img/s':>8} {'vs default':>10} {'quiet':>6}")
    for row in rows:
        ratio = f"{row['ratio']:.2f}x" if row["ratio"] else "-"
        speed = (f"failed: {row['error'][:80]}" if row["error"] else f"{row['images_per_second']:>8.2f} "
                 f"{ratio:>10} {row['clean_rounds']:>3}/{len(row['rounds'])}")
        print(f"{row['workload']:<10} {row['precision']:<5} {row['contender']:<50} {speed}")
    frozen = [f"{r['contender']} ({r['workload']}, {r['precision']}) {r['frozen_constants']}" for r in rows
              if r["frozen"] and not r["error"]]
    if frozen:
        print("verified frozen, parameters made constants: " + "; ".join(frozen))
    if args.json_path:
        write_text_atomic(args.json_path, json.dumps(rows, indent=2) + "\n")
    return 0
