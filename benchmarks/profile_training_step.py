"""Where the R50x1 training step's time goes: convolution FLOPs, convolution time, and the speed-up ceiling.

The step is the bench's (batch 16 at 128x128, channels_last, SGD with momentum). FLOPs are counted by
torch.utils.flop_counter; time by torch.profiler over a few steps. If everything but the convolutions cost nothing,
the step would be step_ms / convolution_ms times faster: the ceiling for any implementation that runs the same
convolutions.

    python benchmarks/profile_training_step.py [--steps 3]
"""

from __future__ import annotations

import argparse
import time

import torch
from peaks import convolution_peak
from torch.profiler import ProfilerActivity, profile
from torch.utils.flop_counter import FlopCounterMode

from bigtransfer import BitConfig, BitForImageClassification, prepare_for_training

CONVOLUTION_OPS = ("aten::mkldnn_convolution", "aten::convolution_backward", "aten::_convolution", "aten::cudnn_convolution")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--steps", type=int, default=3)
    args = parser.parse_args()
    torch.manual_seed(0)
    model = prepare_for_training(BitForImageClassification(BitConfig.from_variant("BiT-S-R50x1")).train())
    optimizer = torch.optim.SGD(model.parameters(), lr=0.003, momentum=0.9)
    pixels = torch.randn(16, 3, 128, 128).contiguous(memory_format=torch.channels_last)
    labels = torch.randint(0, 1000, (16,))

    def step() -> None:
        optimizer.zero_grad(set_to_none=True)
        model(pixels, labels=labels).loss.backward()
        optimizer.step()

    for _ in range(2):
        step()
    counter = FlopCounterMode(display=False)
    with counter:
        model(pixels, labels=labels).loss.backward()
    flops = counter.get_flop_counts()["Global"]
    convolution_flops = sum(value for op, value in flops.items() if "convolution" in str(op))
    start = time.perf_counter()
    for _ in range(args.steps):
        step()
    step_ms = (time.perf_counter() - start) / args.steps * 1e3
    with profile(activities=[ProfilerActivity.CPU]) as profiler:
        for _ in range(args.steps):
            step()
    events = profiler.key_averages()
    convolution_ms = sum(e.self_cpu_time_total for e in events if e.key in CONVOLUTION_OPS) / args.steps / 1e3
    profiled_ms = sum(e.self_cpu_time_total for e in events) / args.steps / 1e3
    peak = convolution_peak(torch.device("cpu"), torch.float32)
    peak_gflops = max(peak.probe() for _ in range(5))
    share = convolution_ms / profiled_ms
    print(f"step: {step_ms:.0f} ms ({16 / step_ms * 1e3:.1f} images/s); under the profiler {profiled_ms:.0f} ms")
    print(f"convolutions: {convolution_flops / 1e9:.1f} GFLOP, {convolution_ms:.0f} ms ({100 * share:.0f} % of the step), "
          f"{convolution_flops / convolution_ms / 1e6:.0f} GFLOP/s = {100 * convolution_flops / convolution_ms / 1e6 / peak_gflops:.0f} % "
          f"of the measured peak, {peak_gflops:.0f} GFLOP/s ({peak.kernel})")
    print(f"ceiling with everything else free: {1 / share:.2f}x")
    others = sorted((e for e in events if e.key not in CONVOLUTION_OPS), key=lambda e: -e.self_cpu_time_total)
    print("the rest, by self time per step: " + ", ".join(
        f"{e.key} {e.self_cpu_time_total / args.steps / 1e3:.0f} ms" for e in others[:8]))


if __name__ == "__main__":
    main()
