"""The machine's measured peak GFLOP/s for the kernels a BiT model runs, the reference of the harness's
"% of peak" column (benchmarks/harness.py).

- fp32 and bf16: a 1x1 convolution through torch (oneDNN on CPU, cuDNN on GPU), channels_last, the kernels every
  contender's convolutions call. A matmul is not the reference: on AMD CPUs `torch.matmul` runs MKL's fp32 GEMM
  at about half the rate oneDNN's convolutions reach on the same cores.
- int8: the same convolutions as ONNX Runtime QLinearConv nodes (uint8 activations, per-channel int8 weights),
  what `bigtransfer.quantize` deploys (VNNI / AMX kernels on x86). Four in a row, so that the layout changes ONNX
  Runtime adds at the graph's ends are a small share.

The shape is BiT's stage-3 1x1 convolution widened to 1024 -> 1024 channels (R50x1 at 224 px runs 14x14 maps
there; 28x28 keeps a probe at about 13 GFLOP, tens of milliseconds on two cores). Each probe is timed once per
round; the peak is the median of the probes within 15 % of the fastest (other processes only slow a probe down).
"""

from __future__ import annotations

import statistics
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from bigtransfer.export import onnx_session  # onnxruntime is imported there, when a session is made
from bigtransfer.machine import cpu_description

CHANNELS, SIDE = 1024, 28
INT8_LAYERS = 4


class Peak:
    """A kernel timed once per `probe()`; `gflops` is the peak it reached."""

    def __init__(self, kernel: str, run: Callable[[], object], flops: float, sync: Callable[[], None] = lambda: None):
        self.kernel, self._run, self.flops, self._sync = kernel, run, flops, sync
        self.samples: list[float] = []
        run()  # warm-up: primitive creation, weight prepacking
        sync()

    def probe(self) -> float:
        self._sync()
        start = time.perf_counter()
        self._run()
        self._sync()
        self.samples.append(self.flops / (time.perf_counter() - start) / 1e9)
        return self.samples[-1]

    @property
    def gflops(self) -> float:
        best = max(self.samples, default=0.0)
        clean = [value for value in self.samples if value >= 0.85 * best]
        return statistics.median(clean) if clean else 0.0


def _flops(batch: int, layers: int = 1) -> float:
    return 2.0 * batch * SIDE * SIDE * CHANNELS * CHANNELS * layers


def convolution_peak(device: torch.device, dtype: torch.dtype) -> Peak:
    """fp32 / bf16 1x1 convolution, channels_last, through torch's convolution (oneDNN / cuDNN)."""
    batch = 64 if device.type == "cuda" else 8
    generator = torch.Generator().manual_seed(3)
    x = torch.randn(batch, CHANNELS, SIDE, SIDE, generator=generator).to(device, dtype)
    x = x.contiguous(memory_format=torch.channels_last)
    weight = (torch.randn(CHANNELS, CHANNELS, 1, 1, generator=generator) / 32).to(device, dtype)
    weight = weight.contiguous(memory_format=torch.channels_last)

    def run():
        with torch.inference_mode():
            return F.conv2d(x, weight)

    sync = (lambda: torch.cuda.synchronize(device)) if device.type == "cuda" else (lambda: None)
    name = {torch.float32: "fp32", torch.bfloat16: "bf16", torch.float16: "fp16"}.get(dtype, str(dtype))
    return Peak(f"{name} 1x1 convolution ({'cuDNN' if device.type == 'cuda' else 'oneDNN'})", run, _flops(batch), sync)


def int8_peak() -> Peak | None:
    """int8 QLinearConv in ONNX Runtime (CPU), or None when onnx / onnxruntime are not installed."""
    try:
        import onnx
        from onnx import TensorProto, helper, numpy_helper
    except ImportError:
        return None
    rng = np.random.default_rng(3)
    batch = 8
    initializers = [
        numpy_helper.from_array(np.array(0.05, np.float32), "scale"),
        numpy_helper.from_array(np.array(128, np.uint8), "zero"),
        numpy_helper.from_array(np.full(CHANNELS, 0.01, np.float32), "w_scale"),
        numpy_helper.from_array(np.zeros(CHANNELS, np.int8), "w_zero"),
    ]
    nodes = []
    for layer in range(INT8_LAYERS):
        weight = rng.integers(-127, 128, (CHANNELS, CHANNELS, 1, 1), dtype=np.int8)
        initializers.append(numpy_helper.from_array(weight, f"w{layer}"))
        source = "x" if layer == 0 else f"y{layer - 1}"
        nodes.append(helper.make_node("QLinearConv", [source, "scale", "zero", f"w{layer}", "w_scale", "w_zero",
                                                      "scale", "zero"], [f"y{layer}"]))
    shape = [batch, CHANNELS, SIDE, SIDE]
    graph = helper.make_graph(nodes, "int8_peak", [helper.make_tensor_value_info("x", TensorProto.UINT8, shape)],
                              [helper.make_tensor_value_info(f"y{INT8_LAYERS - 1}", TensorProto.UINT8, shape)],
                              initializers)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)])
    try:
        with tempfile.TemporaryDirectory() as directory:
            path = Path(directory) / "int8_peak.onnx"
            onnx.save(model, path)
            session = onnx_session(path, spinning=False)
    except ImportError:
        return None
    pixels = rng.integers(0, 256, shape, dtype=np.uint8)
    return Peak("int8 1x1 QLinearConv (ONNX Runtime)", lambda: session.run(None, {"x": pixels}),
                _flops(batch, INT8_LAYERS))


def measure_peaks(device: torch.device, precisions: tuple[str, ...] = ("fp32",), int8: bool = True) -> dict[str, Peak]:
    """The peaks the bench compares against: fp32, each of `precisions`, bf16 where the hardware runs it (GPUs,
    CPUs with AVX512-BF16 or AMX; elsewhere oneDNN emulates it far below the fp32 rate), and int8 on CPU when
    `int8` and ONNX Runtime is installed."""
    wanted = {"fp32", *precisions} - {"tf32"}
    flags = set(cpu_description()["flags"]) if device.type == "cpu" else set()
    if device.type == "cuda" or flags & {"avx512_bf16", "amx_bf16"}:
        wanted.add("bf16")
    dtypes = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
    peaks = {name: convolution_peak(device, dtypes[name]) for name in dtypes if name in wanted}
    if int8 and device.type == "cpu" and (peak := int8_peak()) is not None:
        peaks["int8"] = peak
    return peaks
