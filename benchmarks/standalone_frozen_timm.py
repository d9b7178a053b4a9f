"""The outside check of the bench's frozen timm row: timm's model in a fresh process with inductor freezing set the
way PyTorch's documentation says (`torch._inductor.config.freezing = True`), compiled, timed in a plain loop.

    python benchmarks/standalone_frozen_timm.py --variant BiT-S-R50x1 --batch 1
    python benchmarks/bench_models.py --workloads infer-b1 --contenders "timm channels_last compiled+frozen" \\
        --no-onnx --no-pipeline          # the same row from the harness: the two should agree within 10 %
    python benchmarks/standalone_frozen_timm.py --batch 16 --bf16       # under bf16 autocast, as timm users run it

Prints the median images/s of `--samples` samples of about half a second each (after two warm-up calls).
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
import torch._inductor.config
from peers import peer_model


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--variant", default="BiT-S-R50x1")
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--samples", type=int, default=5)
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--bf16", action="store_true", help="run under torch.autocast('cpu', torch.bfloat16)")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    torch._inductor.config.freezing = True  # PyTorch's documented CPU-inference setting, for the whole process
    model = peer_model("timm", args.variant).to(memory_format=torch.channels_last)
    compiled = torch.compile(model)
    x = torch.randn(args.batch, 3, 224, 224).contiguous(memory_format=torch.channels_last)
    with torch.inference_mode(), torch.autocast("cpu", torch.bfloat16, enabled=args.bf16):
        compiled(x), compiled(x)  # compiles and freezes
        start = time.perf_counter()
        compiled(x)
        repeats = max(1, int(0.5 / (time.perf_counter() - start)))
        speeds = []
        for _ in range(args.samples):
            start = time.perf_counter()
            for _ in range(repeats):
                compiled(x)
            speeds.append(args.batch * repeats / (time.perf_counter() - start))
    print(f"timm channels_last{' bf16 autocast' * args.bf16}, torch._inductor.config.freezing = True, "
          f"{args.variant}, batch {args.batch}, "
          f"{torch.get_num_threads()} threads: {statistics.median(speeds):.2f} img/s (samples "
          + ", ".join(f"{speed:.2f}" for speed in speeds) + ")")


if __name__ == "__main__":
    main()
