"""int8 inference: static quantization of the exported ONNX graph with ONNX Runtime's own tooling.

The model is exported as for `export` (Weight Standardization folded into plain convolutions, so the weights
quantize per output channel), shape-inferred, and quantized statically: int8 weights per channel, uint8
activations calibrated on the user's images (min / max over the calibration batches), QOperator form
(QLinearConv, run by ONNX Runtime's VNNI / AMX kernels on x86). GroupNorm (InstanceNormalization), the residual
additions and the head's pooling stay in float32, where the activation statistics of a normalisation layer would
cost accuracy. The report says how often the int8 model's top-1 agrees with the float32 one on held-out images.

Example:
    >>> report = quantize(model, "model-int8.onnx", calibration_pixels, check_pixels)
    >>> report.top1_agreement, report.operators["QLinearConv"]
"""

from __future__ import annotations

import contextlib
import dataclasses
import io
import logging
import os
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from torch import nn

from .export import export, onnx_operators, onnx_session, staged_export
from .extras import require

QUANTIZED_OPERATORS = ("Conv", "Gemm", "MatMul")
_BATCH = 8  # calibration images per run of the float graph


@dataclasses.dataclass
class QuantizeReport:
    """What was written: the int8 file, how many images calibrated and checked it, the share of checked images
    whose top-1 class (classifiers) is the float32 model's, the largest |difference| of the outputs, the ops."""

    path: str
    calibration_images: int
    checked_images: int
    top1_agreement: float | None
    max_abs_difference: float
    operators: dict[str, int]
    seconds: float


class _Batches:
    """ONNX Runtime's CalibrationDataReader protocol over an (N, C, H, W) array."""

    def __init__(self, name: str, pixels: np.ndarray):
        self._batches = iter([{name: pixels[start : start + _BATCH]} for start in range(0, len(pixels), _BATCH)])

    def get_next(self):
        return next(self._batches, None)


def _quantization():
    return require("onnxruntime.quantization", "int8 quantization")


@contextlib.contextmanager
def _quiet():
    """The exporter's and ONNX Runtime's tooling print and log their progress and advice: not the user's output."""
    root = logging.getLogger()
    tools = [logging.getLogger(name) for name in ("onnxruntime", "onnx_ir", "onnxscript")]
    levels = [root.level, *(tool.level for tool in tools)]
    for logger in (root, *tools):
        logger.setLevel(logging.ERROR)
    try:
        with contextlib.redirect_stdout(io.StringIO()):
            yield
    finally:
        for logger, level in zip((root, *tools), levels, strict=True):
            logger.setLevel(level)


@contextlib.contextmanager
def _temporary_files_in(folder: Path):
    """ONNX Runtime's tooling writes copies of the model into `tempfile`'s folder: put them in ours, so a kill leaves
    them where the next run sweeps them, not in the system's temporary folder."""
    previous, tempfile.tempdir = tempfile.tempdir, str(folder)
    try:
        yield
    finally:
        tempfile.tempdir = previous


def _pixels(values: np.ndarray | torch.Tensor, what: str) -> np.ndarray:
    array = np.ascontiguousarray(np.asarray(values, dtype=np.float32))
    if array.ndim != 4 or len(array) == 0:
        raise ValueError(f"{what} must be preprocessed images of shape (N, C, H, W) with N >= 1, got {array.shape}")
    return array


def quantize(
    model: nn.Module, path: str | os.PathLike, calibration: np.ndarray | torch.Tensor,
    check: np.ndarray | torch.Tensor | None = None, *, per_channel: bool = True,
) -> QuantizeReport:
    """Write `model` as a statically quantized int8 ONNX file at `path` (see the module doc), calibrated on
    `calibration` and checked against the float32 graph on `check` (default: the calibration images).

    Both are preprocessed pixels (N, C, H, W) as the model's processor makes them. The file replaces `path` whole,
    and only once it has run in ONNX Runtime.
    """
    quantization = _quantization()
    calibration = _pixels(calibration, "calibration")
    check = calibration if check is None else _pixels(check, "check")
    started = time.perf_counter()
    path = Path(path)
    if path.is_dir():
        raise IsADirectoryError(f"cannot quantize to {path}: it is a directory; give the .onnx file to write")
    # The float graph and its prepared copy are staged with the output: removed with it on any exit, and swept by
    # the next run after a kill (not left in the system's temporary folder).
    with staged_export(path, onnx=True) as (staging, staged):
        floating, prepared = staging.scratch / "float.onnx", staging.scratch / "prepared.onnx"
        with _quiet(), _temporary_files_in(staging.scratch):
            export(model, floating, image_size=max(int(calibration.shape[-1]), 64))
            quantization.shape_inference.quant_pre_process(str(floating), str(prepared))
        session = onnx_session(floating)
        name = session.get_inputs()[0].name
        reference = _run(session, name, check)
        with _quiet(), _temporary_files_in(staging.scratch):
            quantization.quantize_static(
                str(prepared), str(staged), _Batches(name, calibration),
                quant_format=quantization.QuantFormat.QOperator, per_channel=per_channel,
                activation_type=quantization.QuantType.QUInt8, weight_type=quantization.QuantType.QInt8,
                op_types_to_quantize=list(QUANTIZED_OPERATORS),
            )
        quantized = _run(onnx_session(staged), name, check)
        operators = onnx_operators(staged)
    agreement = None
    if reference.ndim == 2:  # logits
        agreement = float((reference.argmax(1) == quantized.argmax(1)).mean())
    return QuantizeReport(str(path), len(calibration), len(check), agreement,
                          float(np.abs(reference - quantized).max()), operators, time.perf_counter() - started)


def _run(session, name: str, pixels: np.ndarray) -> np.ndarray:
    """The first output over all `pixels`, a few images per run (activations of hundreds at once take gigabytes)."""
    return np.concatenate([session.run(None, {name: pixels[start : start + _BATCH]})[0]
                           for start in range(0, len(pixels), _BATCH)])
