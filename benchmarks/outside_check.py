"""The outside check of the speed tables: `optimize()` against timm compiled and frozen the documented way, timed
without the harness (nothing from `harness.py`, `peers.py` or `bigtransfer.bench`), each contender in its own
fresh process, alternating A B A B A B.

    python benchmarks/outside_check.py --dtype fp32 --batch 1      # and --batch 16, --dtype bf16
    python benchmarks/outside_check.py --dtype fp32 --batch 16 --timm-chunks 4   # timm in optimize()'s chunks
    python benchmarks/outside_check.py --int8 --batch 1     # ONNX Runtime int8 (bigtransfer.quantize) vs optimize()

Each process builds its model with random weights (R50x1, 1,000 classes), calls it once to compile, three times
to warm up, then prints the median images/s of five one-second samples; the parent prints each contender's
process medians, their median and the ratio. timm's freezing is confirmed by counting inductor's freeze calls.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time


def child(contender: str, dtype: str, batch: int, timm_chunks: int | None) -> dict:
    import torch

    torch.set_num_threads(2)
    x = torch.randn(batch, 3, 224, 224).contiguous(memory_format=torch.channels_last)
    info: dict = {}
    if contender == "timm":
        import timm
        import torch._inductor.config
        import torch._inductor.freezing

        torch._inductor.config.freezing = True  # PyTorch's documented CPU-inference setting
        freeze, info["freeze_calls"] = torch._inductor.freezing.freeze, 0

        def counted(*args, **kwargs):
            info["freeze_calls"] += 1
            return freeze(*args, **kwargs)

        torch._inductor.freezing.freeze = counted
        model = timm.create_model("resnetv2_50x1_bit", pretrained=False, num_classes=1000).eval()
        compiled = torch.compile(model.to(memory_format=torch.channels_last))

        def step():
            with torch.inference_mode(), torch.autocast("cpu", torch.bfloat16, enabled=dtype == "bf16"):
                return torch.cat([compiled(part) for part in x.split(timm_chunks or batch)])
    elif contender == "int8":
        import tempfile

        import onnxruntime

        from bigtransfer import BitConfig, BitForImageClassification, quantize

        path = f"{tempfile.mkdtemp()}/model-int8.onnx"
        quantize(BitForImageClassification(BitConfig.from_variant("BiT-S-R50x1")).eval(), path, torch.randn(8, 3, 224, 224))
        options = onnxruntime.SessionOptions()
        options.intra_op_num_threads, options.inter_op_num_threads = 2, 1
        session = onnxruntime.InferenceSession(path, options, providers=["CPUExecutionProvider"])
        feed = {session.get_inputs()[0].name: x.contiguous().numpy()}

        def step():
            return session.run(None, feed)
    else:
        from bigtransfer import BitConfig, BitForImageClassification, optimize

        fast = optimize(BitForImageClassification(BitConfig.from_variant("BiT-S-R50x1")).eval(),
                        dtype=None if dtype == "fp32" else dtype)

        def step():
            return fast(x)

    for _ in range(4):
        step()
    samples = []
    for _ in range(5):
        calls, start = 0, time.perf_counter()
        while time.perf_counter() - start < 1.0:
            step()
            calls += 1
        samples.append(batch * calls / (time.perf_counter() - start))
    return info | {"median": statistics.median(samples), "samples": [round(value, 2) for value in samples]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--dtype", choices=("fp32", "bf16"), default="fp32")
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--processes", type=int, default=3, help="processes per contender")
    parser.add_argument("--timm-chunks", type=int, default=None, help="run timm's batch in chunks of this size")
    parser.add_argument("--int8", action="store_true", help="ONNX Runtime int8 against optimize() instead of timm")
    parser.add_argument("--child", choices=("timm", "bigtransfer", "int8"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        print(json.dumps(child(args.child, args.dtype, args.batch, args.timm_chunks)))
        return
    medians: dict[str, list[float]] = {"int8" if args.int8 else "timm": [], "bigtransfer": []}
    print(f"{args.dtype}, batch {args.batch}; load average before {os.getloadavg()}")
    for _ in range(args.processes):
        for contender in medians:
            done = subprocess.run([sys.executable, __file__, *sys.argv[1:], "--child", contender],
                                  capture_output=True, text=True, check=True)
            result = json.loads(done.stdout.strip().splitlines()[-1])
            medians[contender].append(result["median"])
            print(f"  {contender}: {result}", flush=True)
    other, ours = (statistics.median(values) for values in medians.values())
    print(f"{next(iter(medians))} {other:.2f}, bigtransfer optimize() {ours:.2f} img/s: optimize() at "
          f"{ours / other:.2f}x; load average after {os.getloadavg()}")


if __name__ == "__main__":
    main()
