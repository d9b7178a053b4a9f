"""What GroupNorm would cost at memory speed: the bytes of every GroupNorm input of one R50x1 forward pass, and the
time reading them twice and writing them once would take at the bandwidth a plain tensor copy reaches here.

    python benchmarks/group_norm_budget.py [--batch 16 --dtype bf16]

Set it beside the generated GroupNorm code's time in the profile (`bench_models.py --profile`): the gap is what a
GroupNorm + ReLU kernel that streams channels_last data at memory speed could win.
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

from bigtransfer.bench import reference_model
from bigtransfer.layers import GroupNormAct
from bigtransfer.machine import cpu_description


def group_norm_input_bytes(batch: int, size: int, dtype: torch.dtype) -> tuple[int, int]:
    """(GroupNorm layers, bytes of their inputs in `dtype`) for one forward pass."""
    model, sizes = reference_model("BiT-S-R50x1"), []
    for module in model.modules():
        if isinstance(module, GroupNormAct):
            module.register_forward_hook(lambda module, inputs, output: sizes.append(inputs[0].numel()))
    with torch.no_grad():
        model(torch.zeros(1, 3, size, size))
    return len(sizes), sum(sizes) * batch * torch.finfo(dtype).bits // 8


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--size", type=int, default=224)
    parser.add_argument("--dtype", choices=("fp32", "bf16"), default="bf16")
    args = parser.parse_args()
    dtype = torch.float32 if args.dtype == "fp32" else torch.bfloat16
    layers, total = group_norm_input_bytes(args.batch, args.size, dtype)
    source = torch.ones(total // 2, dtype=torch.bfloat16)
    target = torch.empty_like(source)
    seconds = []
    for _ in range(12):
        start = time.perf_counter()
        target.copy_(source)
        seconds.append(time.perf_counter() - start)
    bandwidth = 2 * total / statistics.median(seconds[2:])  # bytes read and written per second
    print(f"{cpu_description()}; {torch.get_num_threads()} threads")
    print(f"{layers} GroupNorm inputs of batch {args.batch} at {args.size} px in {args.dtype}: {total / 1e6:.0f} MB; "
          f"a tensor copy moves {bandwidth / 1e9:.1f} GB/s (read + write); two reads and one write of them: "
          f"{3 * total / bandwidth * 1e3:.0f} ms")


if __name__ == "__main__":
    main()
