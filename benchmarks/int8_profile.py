"""Where the int8 graph's time goes at batch 16 (R50x1 at 224 px, calibrated as the bench calibrates), by
ONNX Runtime's own profiler, and the two other ways of quantizing it: ONNX Runtime's QDQ form, and quantizing
the residual Adds and GroupNorm's affine Muls too (QLinearAdd / QLinearMul).

    python benchmarks/int8_profile.py [--rounds 3]
"""

from __future__ import annotations

import argparse
import collections
import json
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np
import onnxruntime as ort
from onnxruntime import quantization

from bigtransfer.bench import pixels, reference_model
from bigtransfer.export import export, onnx_session
from bigtransfer.machine import cpu_description
from bigtransfer.quantize import QUANTIZED_OPERATORS, _Batches  # quantize's own calibration reader

VARIANTS = {  # name -> (form, operators): the first is what bigtransfer.quantize writes
    "QOperator (bigtransfer.quantize)": ("QOperator", QUANTIZED_OPERATORS),
    "QDQ": ("QDQ", QUANTIZED_OPERATORS),
    "QOperator, Add and Mul too": ("QOperator", (*QUANTIZED_OPERATORS, "Add", "Mul")),
}


def quantized(directory: Path, calibration: np.ndarray) -> dict[str, Path]:
    floating, prepared = directory / "float.onnx", directory / "prepared.onnx"
    export(reference_model("BiT-S-R50x1"), floating, image_size=224)
    quantization.shape_inference.quant_pre_process(str(floating), str(prepared))
    name = onnx_session(floating).get_inputs()[0].name
    paths = {}
    for index, (variant, (form, operators)) in enumerate(VARIANTS.items()):
        paths[variant] = directory / f"int8-{index}.onnx"
        quantization.quantize_static(
            str(prepared), str(paths[variant]), _Batches(name, calibration), quant_format=getattr(quantization.QuantFormat, form),
            per_channel=True, activation_type=quantization.QuantType.QUInt8,
            weight_type=quantization.QuantType.QInt8, op_types_to_quantize=list(operators),
        )
    return paths


def profile(path: Path, pixels: np.ndarray, runs: int = 3) -> None:
    options = ort.SessionOptions()
    options.enable_profiling = True
    options.profile_file_prefix = str(path.with_suffix(""))
    session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
    name = session.get_inputs()[0].name
    for _ in range(runs + 2):  # the first two runs (allocation, first touch) are left out below
        session.run(None, {name: pixels})
    events = json.loads(Path(session.end_profiling()).read_text())
    windows = sorted((e["ts"], e["ts"] + e["dur"]) for e in events if e.get("name") == "model_run")[-runs:]
    time_by_op, nodes = collections.Counter(), collections.Counter()
    for event in events:
        warm = any(start <= event.get("ts", -1) <= end for start, end in windows)
        if warm and event.get("cat") == "Node" and event["name"].endswith("_kernel_time"):
            time_by_op[event["args"]["op_name"]] += event["dur"] / runs
            nodes[event["args"]["op_name"]] += 1
    total = sum(time_by_op.values())
    print(f"ONNX Runtime's profile, int8 at batch 16: {total / 1e3:.0f} ms a run")
    for op, microseconds in time_by_op.most_common(10):
        print(f"  {op:24} {microseconds / 1e3:7.1f} ms {100 * microseconds / total:5.1f} %  {nodes[op] // runs} nodes")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args()
    print(f"{cpu_description()}; onnxruntime {ort.__version__}")
    calibration = pixels("infer-b16", "cpu", False)[:8].numpy()
    images = pixels("infer-b16", "cpu", False).numpy()
    with tempfile.TemporaryDirectory() as directory:
        paths = quantized(Path(directory), calibration)
        sessions = {variant: onnx_session(path, spinning=False) for variant, path in paths.items()}
        name = next(iter(sessions.values())).get_inputs()[0].name
        speed: dict[str, list[float]] = {variant: [] for variant in sessions}
        for session in sessions.values():
            session.run(None, {name: images})
        for _ in range(args.rounds):
            for variant, session in sessions.items():
                start = time.perf_counter()
                session.run(None, {name: images})
                session.run(None, {name: images})
                speed[variant].append(32 / (time.perf_counter() - start))
        print("batch 16: " + ", ".join(f"{v} {statistics.median(s):.2f}" for v, s in speed.items()) + " img/s")
        profile(next(iter(paths.values())), images)


if __name__ == "__main__":
    main()
