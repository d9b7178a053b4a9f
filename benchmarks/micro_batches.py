"""Which micro-batch size `optimize()` should run a batch of 16 in on this CPU, and which GroupNorm kernel its
compiled graph should call: every chunk size timed interleaved in one process (R50x1 at 224 px), compiled and
eager, beside the L2 cache it defaults from, and the whole batch with the other GroupNorm kernel.

    python benchmarks/micro_batches.py [--rounds 9]
    python benchmarks/micro_batches.py --dtype bf16 --compiled-only

`optimize(micro_batch="auto")` takes, in float32, 2 images of 224 px per MiB of the core's L2 cache when compiled
(up to 8) and 4 when eager, and the whole batch under bf16; compiled, it calls ATen's GroupNorm in float32 and
the generated one under bf16. This prints the evidence for those defaults on the machine at hand.
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

from bigtransfer.bench import pixels, reference_model
from bigtransfer.fused import OpaqueGroupNormAct, use_opaque_group_norms
from bigtransfer.inference import optimize
from bigtransfer.layers import GroupNormAct
from bigtransfer.machine import cpu_description, l2_cache_bytes


def with_other_group_norm(fast):
    """`fast` (compiled on its first call) with the GroupNorm kernel optimize() did not choose."""
    opaque = [module for module in fast.model.modules() if type(module) is OpaqueGroupNormAct]
    for module in opaque:
        module.__class__ = GroupNormAct
    if not opaque:
        use_opaque_group_norms(fast.model)
    return fast


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rounds", type=int, default=9)
    parser.add_argument("--dtype", choices=("fp32", "bf16"), default="fp32")
    parser.add_argument("--compiled-only", action="store_true")
    args = parser.parse_args()
    reference = reference_model("BiT-S-R50x1")
    batch = pixels("infer-b16", "cpu", channels_last=True)
    dtype = None if args.dtype == "fp32" else args.dtype
    print(f"{cpu_description()}; L2 per core {l2_cache_bytes()} bytes; torch {torch.__version__}; {args.dtype}")
    for compiled in (True,) if args.compiled_only else (True, False):
        chunks = (2, 4, 6, 8, None) if compiled else (2, 4, 8, None)
        models = {chunk: optimize(reference, compile=compiled, micro_batch=chunk, dtype=dtype) for chunk in chunks}
        if compiled:
            models["whole batch, the other GroupNorm"] = with_other_group_norm(
                optimize(reference, micro_batch=None, dtype=dtype))
        for model in models.values():  # warm-up: one compile per chunk shape
            model(batch)
        speed: dict[int | str | None, list[float]] = {chunk: [] for chunk in models}
        for _ in range(args.rounds):
            for chunk, model in models.items():
                start = time.perf_counter()
                model(batch)
                model(batch)
                speed[chunk].append(32 / (time.perf_counter() - start))
        auto = optimize(reference, compile=compiled, dtype=dtype).micro_batch_size(batch)
        print(("compiled" if compiled else "eager") + f" (auto: {auto or 'whole batch'}): " + ", ".join(
            f"{chunk or 'whole batch'} {statistics.median(values):.2f}" for chunk, values in speed.items()
        ) + " img/s")


if __name__ == "__main__":
    main()
