"""Export BiT models for deployment: ONNX (checked against ONNX Runtime), TorchScript, torch.export programs.

Weight Standardization is folded into plain convolution weights before export (`fold=True`), so the graph holds
only Conv, GroupNorm (as InstanceNormalization on grouped channels, ONNX opset 18) and elementwise ops: no
training-mode BatchNormalization, which is how timm's and transformers' weight standardization exports, and
which ONNX Runtime's CUDA provider rejects. Batch, height and width are dynamic.

Example:
    >>> report = export(model, "bit.onnx")                 # checks the outputs against onnxruntime
    >>> report.max_abs_difference, report.operators["Conv"]
"""

from __future__ import annotations

import contextlib
import copy
import dataclasses
import math
import os
import re
import secrets
import statistics
import time
import warnings
from collections import Counter
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from .extras import require
from .files import Staging, staged_outputs
from .inference.speed import fold_weight_standardization

FORMATS = ("onnx", "torchscript", "exported-program")
DEFAULT_OPSET = 18  # 18: GroupNorm exports as InstanceNormalization, which ORT runs natively (21's GroupNormalization is expanded into slower ops)
MIN_OPSET = 18  # the oldest opset torch.onnx's (dynamo) exporter writes
CHECK_SHAPES = ((2, 224, 224), (1, 160, 192))
MIN_IMAGE_SIZE = 64  # the dynamic height / width start here: at least a 2x2 map after the stride-32 network  # a second batch size and a non-square size: the axes are dynamic


@dataclasses.dataclass
class ExportReport:
    """What was written, and how well it matches the PyTorch model (largest |difference| over the checks)."""

    path: str
    format: str
    output_names: list[str]
    max_abs_difference: float | None = None
    max_relative_difference: float | None = None
    checked_shapes: list[tuple[int, ...]] = dataclasses.field(default_factory=list)
    operators: dict[str, int] = dataclasses.field(default_factory=dict)
    seconds: float = 0.0


class ExportedOutputs(nn.Module):
    """The model with plain tensor outputs, as exporters need: logits (classifier); last_hidden_state and
    pooler_output (BitModel); one feature map per requested stage (BitBackbone)."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model
        kind = type(model).__name__
        if kind == "BitForImageClassification":
            self.output_names = ["logits"]
        elif kind == "BitBackbone":
            self.output_names = [f"feature_map_{name}" for name in model.out_features]
        elif kind == "BitModel":
            self.output_names = ["last_hidden_state", "pooler_output"]
        else:
            raise TypeError(f"export needs a BitModel, BitForImageClassification or BitBackbone, got {kind}")

    def forward(self, pixel_values: torch.Tensor) -> tuple[torch.Tensor, ...]:
        output = self.model(pixel_values, return_dict=True)
        if "logits" in self.output_names:
            return (output.logits,)
        if hasattr(output, "feature_maps"):
            return tuple(output.feature_maps)
        return output.last_hidden_state, output.pooler_output


def export(
    model: nn.Module, path: str | os.PathLike, format: str = "onnx", *, image_size: int = 224, fold: bool = True,
    opset: int = DEFAULT_OPSET, check: bool = True, tolerance: float = 1e-4,
) -> ExportReport:
    """Export `model` to `path` as "onnx", "torchscript" or "exported-program" (a torch.export .pt2 file).

    Args:
        model: a BitModel, BitForImageClassification or BitBackbone (not modified: a copy is exported), on any
            device and in any dtype; the graph is float32 (check it against the float32 model).
        path: the output file (its directory is created).
        format: "onnx" (dynamic batch, height and width), "torchscript" (a trace: any batch and image size, as
            the model has no shape-dependent Python control flow without SAME padding; PyTorch deprecates
            TorchScript and warns, so prefer "exported-program" unless a runtime needs it) or "exported-program"
            (dynamic batch, height and width).
        image_size: height and width of the example input used to trace (at least 64; exported graphs take
            any batch and any height and width from 64 up).
        fold: fold Weight Standardization into the convolution weights first (faster, simpler graph).
        opset: ONNX opset.
        check: run the exported model on random inputs of two shapes and compare with the PyTorch model;
            raises ValueError if the largest difference, relative to the largest output, exceeds `tolerance`.

    Returns:
        An ExportReport.
    """
    if format not in FORMATS:
        raise ValueError(f"format must be one of {', '.join(FORMATS)}, got {format!r}")
    if image_size < MIN_IMAGE_SIZE:
        raise ValueError(f"image_size must be at least {MIN_IMAGE_SIZE}, got {image_size}")
    if not (math.isfinite(tolerance) and tolerance > 0):  # NaN would let every check pass
        raise ValueError(f"tolerance must be a finite number > 0, got {tolerance}")
    start = time.perf_counter()
    # Exported graphs are float32 and traced on the CPU, whatever the model's device and dtype.
    on_cpu_in_float32 = all(p.device.type == "cpu" and p.dtype == torch.float32 for p in model.parameters())
    reference = model if on_cpu_in_float32 else copy.deepcopy(model).to(device="cpu", dtype=torch.float32)
    prepared = copy.deepcopy(reference).eval().requires_grad_(False)
    if fold:
        fold_weight_standardization(prepared)
    wrapped = ExportedOutputs(prepared).eval()
    path = Path(path)
    if path.is_dir():
        raise IsADirectoryError(f"cannot export to {path}: it is a directory; give the file to write")
    # Batch 2, not 1: exporters specialise dimensions whose example size is 1.
    example = torch.randn(2, prepared.config.num_channels, image_size, image_size)
    report = ExportReport(str(path), format, wrapped.output_names)
    with staged_export(path, onnx=format == "onnx") as (_, staged):
        _write(format, wrapped, example, staged, opset, report)
        if check:
            training = reference.training
            try:
                _check(report, reference.eval(), staged, format, prepared.config.num_channels, tolerance)
            finally:
                reference.train(training)
    report.seconds = time.perf_counter() - start
    return report


def _write(format: str, wrapped: ExportedOutputs, example: torch.Tensor, path: Path, opset: int,
           report: ExportReport) -> None:
    if format == "onnx":
        _export_onnx(wrapped, example, path, opset)
        report.operators = onnx_operators(path)
        training_bn = report.operators.get("BatchNormalization(training)", 0)
        if training_bn:
            raise RuntimeError(f"{path} holds {training_bn} training-mode BatchNormalization nodes")
    elif format == "torchscript":
        with torch.no_grad(), warnings.catch_warnings():
            warnings.simplefilter("ignore", torch.jit.TracerWarning)
            traced = torch.jit.trace(wrapped, example, check_trace=False)
        torch.jit.freeze(traced).save(str(path))
    else:
        program = torch.export.export(wrapped, (example,), dynamic_shapes={"pixel_values": _dynamic_axes()})
        torch.export.save(program, str(path))


@contextlib.contextmanager
def staged_export(path: Path, onnx: bool) -> Iterator[tuple[Staging, Path]]:
    """(staging, the path to write the export to): written and checked in the staging folder beside `path`, then
    put in its place (`files.staged_outputs`: a kill or a failed check leaves the previous file as it was, and the
    next export sweeps what a kill left). Weights an ONNX file keeps in external data (models over 2 GB) go to
    `NAME.TOKEN.N.data`, names of their own, moved in before the file that refers to them; the previous export's
    data files (found by their names: the previous file is not read) are deleted once it is replaced."""
    with staged_outputs(path) as staging:
        staged = staging.path(path)  # the suffix kept: torch.export wants .pt2
        yield staging, staged
        if onnx:
            _stage_external_data(staging, staged, path)


def _stage_external_data(staging: Staging, staged: Path, path: Path) -> None:
    """Give the staged file's external data files their final names, and the file the new locations."""
    pattern = re.compile(re.escape(path.name) + r"\.[0-9a-f]{8}\.\d+\.data")
    for previous in path.parent.iterdir():
        if pattern.fullmatch(previous.name):
            staging.remove_on_commit(previous)
    data = _external_data(staged)
    if not data:
        return
    import onnx  # there is external data only where onnx wrote it

    token = secrets.token_hex(4)
    model = onnx.load(str(staged), load_external_data=False)
    names = {old.name: f"{path.name}.{token}.{index}.data" for index, old in enumerate(data)}
    for tensor in model.graph.initializer:
        for entry in tensor.external_data:
            if entry.key == "location" and entry.value in names:
                entry.value = names[entry.value]
    for old in data:
        os.replace(old, staging.path(path.parent / names[old.name]))
    onnx.save(model, str(staged))


def _external_data(path: Path) -> list[Path]:
    """The external data files a (new, staged) ONNX file refers to (none for other files or unreadable ones)."""
    try:
        import onnx  # the onnx extra; without it there is nothing to look up

        model = onnx.load(str(path), load_external_data=False)
    except Exception:
        return []
    locations = {entry.value for tensor in model.graph.initializer for entry in tensor.external_data
                 if entry.key == "location"}
    return [path.parent / location for location in sorted(locations) if Path(location).name == location]


def _dynamic_axes() -> dict[int, Any]:
    dim = torch.export.Dim
    return {
        0: dim("batch", min=1, max=65536),
        2: dim("height", min=MIN_IMAGE_SIZE, max=8192),
        3: dim("width", min=MIN_IMAGE_SIZE, max=8192),
    }


def _export_onnx(wrapped: ExportedOutputs, example: torch.Tensor, path: Path, opset: int) -> None:
    if opset < MIN_OPSET:
        raise ValueError(f"opset {opset} is not supported: torch.onnx's exporter writes opset {MIN_OPSET} or newer")
    for module in ("onnx", "onnxscript"):  # torch.onnx's exporter imports them on its first call
        require(module, "ONNX export")
    program = torch.onnx.export(
        wrapped, (example,), dynamo=True, opset_version=opset, input_names=["pixel_values"],
        output_names=wrapped.output_names, dynamic_shapes={"pixel_values": _dynamic_axes()}, verbose=False,
    )
    program.save(str(path))
    onnx = require("onnx", "ONNX export")
    written = next((entry.version for entry in onnx.load(str(path), load_external_data=False).opset_import
                    if entry.domain in ("", "ai.onnx")), None)
    if written != opset:
        raise ValueError(f"asked for ONNX opset {opset}, but the exporter wrote opset {written}")


def onnx_operators(path: str | os.PathLike) -> dict[str, int]:
    """Node counts by operator of an ONNX file; training-mode BatchNormalization is counted separately."""
    onnx = require("onnx", "reading an ONNX file")
    graph = onnx.load(str(path), load_external_data=False).graph
    counts: Counter[str] = Counter()
    for node in graph.node:
        name = node.op_type
        if name == "BatchNormalization" and any(a.name == "training_mode" and a.i == 1 for a in node.attribute):
            name = "BatchNormalization(training)"
        counts[name] += 1
    return dict(counts)


def onnx_session(model_or_path: nn.Module | str | os.PathLike, device: str | torch.device | None = None,
                 threads: int | None = None, spinning: bool = True):
    """An onnxruntime InferenceSession for an .onnx file, or for a model (exported to a temporary file first).

    `device` "cuda" uses the CUDA provider when onnxruntime-gpu is installed; threads default to onnxruntime's.
    `spinning=False` stops its idle threads from busy-waiting after each run: needed when anything else (such
    as PyTorch, in a comparison) runs on the same cores in between.
    """
    import tempfile

    ort = _import_onnxruntime()
    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    if threads:
        options.intra_op_num_threads = threads
    if not spinning:
        options.add_session_config_entry("session.intra_op.allow_spinning", "0")
    providers = ["CPUExecutionProvider"]
    if device is not None and torch.device(device).type == "cuda":
        if "CUDAExecutionProvider" not in ort.get_available_providers():
            raise RuntimeError("onnxruntime has no CUDA provider here: pip install onnxruntime-gpu")
        providers.insert(0, "CUDAExecutionProvider")
    if isinstance(model_or_path, nn.Module):
        with tempfile.TemporaryDirectory() as directory:
            path = Path(directory) / "model.onnx"
            export(model_or_path, path, check=False)
            return ort.InferenceSession(str(path), options, providers=providers)
    return ort.InferenceSession(str(model_or_path), options, providers=providers)


def _import_onnxruntime():
    return require("onnxruntime", "running an ONNX export")


def _check(report: ExportReport, reference: nn.Module, path: Path, format: str, channels: int, tolerance: float) -> None:
    run = _runner(path, format)
    worst_abs, worst_rel = 0.0, 0.0
    generator = torch.Generator().manual_seed(0)
    for batch, height, width in CHECK_SHAPES:
        pixels = torch.randn(batch, channels, height, width, generator=generator)
        with torch.no_grad():
            expected = ExportedOutputs(reference)(pixels)
        actual = run(pixels)
        for want, got in zip(expected, actual, strict=True):
            got = torch.as_tensor(np.asarray(got)) if not isinstance(got, torch.Tensor) else got
            if tuple(got.shape) != tuple(want.shape):
                raise ValueError(f"exported {format} gives shape {tuple(got.shape)} for input {tuple(pixels.shape)}, "
                                 f"PyTorch {tuple(want.shape)}")
            difference = (got.float() - want.float()).abs().max().item()
            worst_abs = max(worst_abs, difference)
            worst_rel = max(worst_rel, difference / max(want.abs().max().item(), 1e-12))
        report.checked_shapes.append((batch, channels, height, width))
    report.max_abs_difference, report.max_relative_difference = worst_abs, worst_rel
    if worst_rel > tolerance:
        raise ValueError(
            f"exported {format} differs from the PyTorch model by {worst_abs:.3g} ({worst_rel:.3g} of the largest "
            f"output), more than the tolerance {tolerance:g}"
        )


def _runner(path: Path, format: str):
    if format == "onnx":
        session = onnx_session(path)
        name = session.get_inputs()[0].name
        return lambda pixels: session.run(None, {name: pixels.numpy()})
    if format == "torchscript":
        module = torch.jit.load(str(path))
    else:
        module = torch.export.load(str(path)).module()

    def run(pixels):
        with torch.no_grad():
            return module(pixels)

    return run


def time_against_pytorch(model: nn.Module, path: str | os.PathLike, batch_size: int = 1, image_size: int = 224,
                         rounds: int = 5) -> dict[str, float]:
    """Images/s of the ONNX file in ONNX Runtime beside the eager PyTorch model, interleaved, median of rounds."""
    session = onnx_session(path, spinning=False)  # spinning threads would steal the cores from PyTorch's turn
    name = session.get_inputs()[0].name
    pixels = torch.randn(batch_size, model.config.num_channels, image_size, image_size)
    array = pixels.numpy()
    model = model.eval()
    runners = {"onnxruntime": lambda: session.run(None, {name: array})}

    def eager():
        with torch.inference_mode():
            model(pixels)

    runners["pytorch"] = eager
    for run in runners.values():  # the same warm-up for both (first calls allocate and pick kernels)
        for _ in range(3):
            run()
    times: dict[str, list[float]] = {key: [] for key in runners}
    for _ in range(rounds):
        for key, run in runners.items():  # interleaved; each sample repeats calls for at least 0.3 s
            calls, start = 0, time.perf_counter()
            while not calls or time.perf_counter() - start < 0.3:
                run()
                calls += 1
            times[key].append((time.perf_counter() - start) / calls)
    return {f"{key}_images_per_second": batch_size / statistics.median(values) for key, values in times.items()}
