"""This package against transformers and timm on the same R50x1 weights, interleaved in one process.

`bigtransfer bench` with the peers added (every option of `bigtransfer bench` applies), from a checkout:

    python benchmarks/bench_models.py                       # full CPU run: several minutes (compiles included)
    python benchmarks/bench_models.py --quick               # batch-16 inference and the training step, 3 rounds
    python benchmarks/bench_models.py --json results.json   # also write the numbers
    python benchmarks/bench_models.py --device cuda --precision fp32,tf32,bf16   # see gpu_check.sh

Prints one row per (workload, contender): images/s (median of the rounds), peak memory the step allocates,
GFLOP/s achieved, the fraction of the peak the machine's convolution kernels reached in the same rounds
(`bigtransfer.peaks`), and the ratio to the best peer (transformers or timm: eager, channels_last, compiled, and
compiled with inductor freezing). The header records the CPU, its instruction sets, the threads, the versions
and the peaks. Tests never time anything; this does.
"""

from __future__ import annotations

import argparse
import sys

from peers import TransformersAndTimm

from bigtransfer.commands import bench


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="bench_models.py", description=__doc__.split("\n\n")[0])
    bench.add_arguments(parser)
    return bench.run(parser.parse_args(argv), peers=TransformersAndTimm())


if __name__ == "__main__":
    sys.exit(main())
