"""The one precision vocabulary: the dtype names `dtype=`, `--precision` and the bench accept, the autocast that
runs a precision on a device, and whether training needs a loss scaler.

- `DTYPES`: every name the package accepts for a torch dtype (`from_pretrained(dtype=)`, `optimize(dtype=)`).
- `PRECISIONS`: what `--precision` takes. "auto" is bf16 autocast on GPUs that support it, fp16 on other GPUs
  and float32 on CPUs; "bf16" runs on CPUs too (fast with AVX512-BF16 or AMX); "fp16" needs a GPU and trains with
  a gradient scaler there.
"""

from __future__ import annotations

import torch

DTYPES = {
    "float32": torch.float32, "float": torch.float32, "fp32": torch.float32,
    "float16": torch.float16, "half": torch.float16, "fp16": torch.float16,
    "bfloat16": torch.bfloat16, "bf16": torch.bfloat16, "float64": torch.float64, "double": torch.float64,
}
PRECISIONS = ("auto", "fp32", "bf16", "fp16")
REDUCED_PRECISION = {name: dtype for name, dtype in DTYPES.items() if dtype in (torch.bfloat16, torch.float16)}


def check_precision(precision: str) -> str:
    if precision not in PRECISIONS:
        raise ValueError(f"precision must be one of {', '.join(PRECISIONS)}, got {precision!r}")
    return precision


def resolve(device: torch.device, precision: str) -> str:
    """A `precision` setting made concrete for `device`: "auto" becomes fp32, bf16 or fp16; fp16 on a CPU is
    refused."""
    check_precision(precision)
    if precision == "auto":
        precision = "fp32" if device.type != "cuda" else "bf16" if torch.cuda.is_bf16_supported() else "fp16"
    if precision == "fp16" and device.type != "cuda":
        raise ValueError("precision fp16 needs a GPU (it trains with loss scaling there); on a CPU use bf16 or fp32")
    return precision


def autocast_for(device: torch.device, dtype: torch.dtype | None):
    """Autocast to `dtype` on `device`'s type; None runs the model's own dtype (autocast switched off)."""
    if dtype is None:
        return torch.autocast(device.type, enabled=False)
    return torch.autocast(device.type, dtype=dtype)


def precision_autocast(device: torch.device, precision: str):
    """The autocast of a `precision` setting on `device` (see `resolve`)."""
    return autocast_for(device, REDUCED_PRECISION.get(resolve(device, precision)))


def grad_scaler(device: torch.device, precision: str) -> torch.amp.GradScaler:
    """The loss scaler training needs: enabled for fp16 on a GPU only (bf16 keeps float32's range)."""
    return torch.amp.GradScaler("cuda", enabled=device.type == "cuda" and resolve(device, precision) == "fp16")


def autocast_dtype(dtype: str | torch.dtype | None) -> torch.dtype | None:
    """`optimize(dtype=)`: None / fp32 run the model's own dtype, "bf16" / "fp16" (or the torch dtypes) autocast."""
    if dtype is None or dtype in ("fp32", "float32", torch.float32):
        return None
    if isinstance(dtype, str):
        if dtype.lower() not in REDUCED_PRECISION:
            raise ValueError(f"dtype must be fp32, bf16 or fp16, got {dtype!r}")
        return REDUCED_PRECISION[dtype.lower()]
    if dtype not in (torch.bfloat16, torch.float16):
        raise ValueError(f"dtype must be torch.float32, torch.bfloat16 or torch.float16, got {dtype}")
    return dtype
