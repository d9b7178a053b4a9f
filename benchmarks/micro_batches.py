"""Which micro-batch size `optimize()` should run a batch of 16 in on this CPU: every chunk size timed
interleaved in one process (R50x1 at 224 px, fp32), compiled and eager, beside the L2 cache it defaults from.

    python benchmarks/micro_batches.py [--rounds 9]

`optimize(micro_batch="auto")` takes 2 images of 224 px per MiB of the core's L2 cache when compiled (up to 8)
and 4 when eager; this prints the evidence for those defaults on the machine at hand.
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

from bigtransfer.bench import pixels, reference_model
from bigtransfer.inference import optimize
from bigtransfer.machine import cpu_description, l2_cache_bytes


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rounds", type=int, default=9)
    args = parser.parse_args()
    reference = reference_model("BiT-S-R50x1")
    batch = pixels("infer-b16", "cpu", channels_last=True)
    print(f"{cpu_description()}; L2 per core {l2_cache_bytes()} bytes; torch {torch.__version__}")
    for compiled, chunks in ((True, (2, 4, 6, 8, None)), (False, (2, 4, 8, None))):
        models = {chunk: optimize(reference, compile=compiled, micro_batch=chunk) for chunk in chunks}
        for model in models.values():  # warm-up: one compile per chunk shape
            model(batch)
        speed: dict[int | None, list[float]] = {chunk: [] for chunk in chunks}
        for _ in range(args.rounds):
            for chunk, model in models.items():
                start = time.perf_counter()
                model(batch)
                model(batch)
                speed[chunk].append(32 / (time.perf_counter() - start))
        auto = optimize(reference, compile=compiled).micro_batch_size(batch)
        print(("compiled" if compiled else "eager") + f" (auto: {auto}): " + ", ".join(
            f"{chunk or 'whole batch'} {statistics.median(values):.2f}" for chunk, values in speed.items()
        ) + " img/s")


if __name__ == "__main__":
    main()
