"""What standardizing the weights once per step (`layers.SharedStandardization`, the training loop's default for
eager steps split into micro-batches) saves against once per micro-batch: one R50x1 SGD step of a batch split into
micro-batches, both ways, interleaved in one process (channels_last, fp32, eager).

    python benchmarks/shared_standardization.py [--batch 32 --micro-batch 4 --size 128 --rounds 7]

Standardizing costs the same per pass whatever its batch, so the smaller the micro-batches, the more it saves.
"""

from __future__ import annotations

import argparse
import contextlib
import statistics
import time

import torch
import torch.nn.functional as F

from bigtransfer import BitConfig, BitForImageClassification, prepare_for_training
from bigtransfer.layers import SharedStandardization
from bigtransfer.machine import cpu_description


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--micro-batch", type=int, default=4)
    parser.add_argument("--size", type=int, default=128)
    parser.add_argument("--rounds", type=int, default=7)
    args = parser.parse_args()
    torch.manual_seed(0)
    model = prepare_for_training(BitForImageClassification(BitConfig.from_variant("BiT-S-R50x1")).train())
    optimizer = torch.optim.SGD(model.parameters(), lr=1e-4, momentum=0.9)
    images = torch.randn(args.batch, 3, args.size, args.size).contiguous(memory_format=torch.channels_last)
    labels = torch.randint(0, 1000, (args.batch,))
    shared = SharedStandardization(model)

    def step(once: bool) -> None:
        parts = list(zip(images.split(args.micro_batch), labels.split(args.micro_batch), strict=True))
        with shared.step() if once else contextlib.nullcontext():
            for index, (x, y) in enumerate(parts):
                carried = shared.last_pass() if once and index == len(parts) - 1 else 0.0
                (F.cross_entropy(model(x).logits, y) / len(parts) + carried).backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    times: dict[bool, list[float]] = {False: [], True: []}
    for once in (False, True):  # warm-up
        step(once)
    for round_ in range(args.rounds):
        for once in (False, True) if round_ % 2 == 0 else (True, False):
            start = time.perf_counter()
            step(once)
            times[once].append(time.perf_counter() - start)
    per_pass, per_step = (statistics.median(times[once]) * 1e3 for once in (False, True))
    print(f"{cpu_description()}; {torch.get_num_threads()} threads; R50x1, batch {args.batch} at {args.size} px in "
          f"micro-batches of {args.micro_batch}")
    print(f"standardized per micro-batch {per_pass:.0f} ms, once per step {per_step:.0f} ms per step: "
          f"{per_pass / per_step:.2f}x")


if __name__ == "__main__":
    main()
