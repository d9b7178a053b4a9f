"""Fitting work to the machine: the CPU cores and memory this process may use, and the memory a training step needs.

Containers and batch schedulers limit a process by CPU affinity, cgroup quotas (v1 or v2) and rlimits, which
`os.cpu_count()` and /proc/meminfo do not show; each is read here (small files, bounded reads) and the smallest
wins. A training step's memory is measured on a small probe (`step_memory`) and the micro-batch split chosen
from it (`fit_batch_split`); `failed_allocation` reads how large the allocation was that an error reports.
"""

from __future__ import annotations

import dataclasses
import math
import os
import platform
import re
import resource
import time
from pathlib import Path
from typing import Any

import torch
from torch import nn

from .errors import OutOfMemoryError

CGROUP_ROOT = Path("/sys/fs/cgroup")
PROC = Path("/proc")
_UNLIMITED = 1 << 60  # cgroup v1 writes "no limit" as a number close to 2**63
# torch's CPU allocator and CUDA caching allocator, and NumPy's, word the failed request like this.
_REQUEST = re.compile(r"(?:tried to allocate|Tried to allocate|Unable to allocate)\s+([0-9.]+)\s*(bytes|[KMGT]i?B)?")
_UNITS = {None: 1, "bytes": 1, "KB": 1e3, "MB": 1e6, "GB": 1e9, "TB": 1e12,
          "KiB": 2**10, "MiB": 2**20, "GiB": 2**30, "TiB": 2**40}


def _read(path: Path) -> str | None:
    try:
        with open(path, encoding="ascii", errors="replace") as file:
            return file.read(4096)
    except OSError:
        return None


def _own_cgroup(controller: str) -> Path | None:
    """This process's directory of `controller` (v1), or of the unified hierarchy (v2, controller "")."""
    text = _read(PROC / "self" / "cgroup") or ""
    for line in text.splitlines():
        _, controllers, relative = (line.split(":", 2) + ["", ""])[:3]
        if controller in controllers.split(",") or (not controller and controllers == ""):
            base = CGROUP_ROOT / controller if controller else CGROUP_ROOT
            for candidate in (base / relative.lstrip("/"), base):  # inside a container the path is often the root
                if candidate.is_dir():
                    return candidate
    return None


def _cgroup_cpu_quota() -> float | None:
    """CPUs' worth of time the cgroup allows (cpu.max or cfs_quota_us / cfs_period_us), None when unlimited."""
    unified = _own_cgroup("")
    text = _read(unified / "cpu.max") if unified else None
    if text and text.split()[0] != "max":
        quota, period = (text.split() + ["100000"])[:2]
        return int(quota) / int(period)
    legacy = _own_cgroup("cpu")
    quota = _read(legacy / "cpu.cfs_quota_us") if legacy else None
    period = _read(legacy / "cpu.cfs_period_us") if legacy else None
    if quota and period and int(quota) > 0:
        return int(quota) / int(period)
    return None


def usable_cpus() -> int:
    """The CPUs this process may run on (its affinity), fewer when a cgroup quota allows less time than that."""
    count = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    quota = _cgroup_cpu_quota()
    return max(1, min(count, math.ceil(quota))) if quota else max(1, count)


def set_threads(threads: int | None) -> int:
    """Set torch's CPU threads: `threads`, or by default the CPUs this process may use (torch's own default counts
    every core of the host, which oversubscribes a container limited to a few). Returns the number set."""
    count = threads or min(torch.get_num_threads(), usable_cpus())
    torch.set_num_threads(count)
    return count


def _cgroup_memory_left() -> int | None:
    unified = _own_cgroup("")
    if unified and (unified / "memory.max").exists():
        limit, usage = _read(unified / "memory.max"), _read(unified / "memory.current")
    else:
        legacy = _own_cgroup("memory")
        limit = _read(legacy / "memory.limit_in_bytes") if legacy else None
        usage = _read(legacy / "memory.usage_in_bytes") if legacy else None
    if not limit or not usage or limit.strip() == "max" or int(limit) >= _UNLIMITED:
        return None
    return int(limit) - int(usage)


def _status_bytes(field: str) -> int:
    match = re.search(rf"^{field}:\s+(\d+) kB", _read(PROC / "self" / "status") or "", re.MULTILINE)
    return int(match.group(1)) * 1024 if match else 0


def available_memory(device: torch.device) -> int | None:
    """Bytes this process can still allocate on `device`: free GPU memory; on the CPU the smallest of the kernel's
    MemAvailable, the cgroup's limit less its usage, and the address-space / data rlimits less what is mapped.
    None when it cannot be told."""
    if device.type == "cuda":
        return torch.cuda.mem_get_info(device)[0]
    if device.type != "cpu":
        return None
    limits = []
    match = re.search(r"^MemAvailable:\s+(\d+) kB", _read(PROC / "meminfo") or "", re.MULTILINE)
    if match:
        limits.append(int(match.group(1)) * 1024)
    cgroup = _cgroup_memory_left()
    if cgroup is not None:
        limits.append(cgroup)
    for limit, field in ((resource.RLIMIT_AS, "VmSize"), (resource.RLIMIT_DATA, "VmData")):
        soft = resource.getrlimit(limit)[0]
        if soft != resource.RLIM_INFINITY:
            limits.append(soft - _status_bytes(field))
    return max(0, min(limits)) if limits else None


CPU_CACHES = Path("/sys/devices/system/cpu/cpu0/cache")
_SIZE_UNITS = {"": 1, "K": 2**10, "M": 2**20, "G": 2**30}


def l2_cache_bytes() -> int | None:
    """The L2 cache of one core in bytes, from Linux's sysfs (index*/level, type and size such as "2048K"),
    None where it is not known."""
    for index in sorted(CPU_CACHES.glob("index[0-9]*")) if CPU_CACHES.is_dir() else []:
        level, kind, size = ((_read(index / name) or "").strip() for name in ("level", "type", "size"))
        match = re.fullmatch(r"(\d+)([KMG]?)", size)
        if level == "2" and kind in ("Unified", "Data") and match:
            return int(match.group(1)) * _SIZE_UNITS[match.group(2)]
    return None


def failed_allocation(error: BaseException) -> int | None:
    """The size in bytes of the allocation an out-of-memory error reports, 0 when it says none, None when `error`
    is not about memory at all."""
    text = str(error)
    memory_error = isinstance(error, MemoryError) or isinstance(error, torch.cuda.OutOfMemoryError) or (
        "out of memory" in text.lower() or "can't allocate memory" in text or "Unable to allocate" in text
    )
    if not memory_error:
        return None
    match = _REQUEST.search(text)
    return int(float(match.group(1)) * _UNITS[match.group(2)]) if match else 0


def human_size(size: float) -> str:
    """Bytes for a message: GiB with one decimal, MiB below 1 GiB."""
    return f"{size / 2**30:.1f} GiB" if size >= 2**30 else f"{size / 2**20:.0f} MiB"


# ---------------------------------------------------------------------------------------------------------------
# What a training step needs.

# Saved activations are what a training step holds per image; the backward pass holds gradients of the largest
# of them at the same time, and the allocator rounds up. Measured peak RSS over the saved bytes: 1.18-1.35 for
# R50x1 / R101x1 and 1.6-1.8 for `tiny` (224 and 480 px, micro-batches of 4-32); 2 keeps a margin over both.
ACTIVATION_FACTOR = 2.0
# Share of the available memory a step may plan to fill (the data loader, the allocator's cache and other
# processes' growth take the rest).
MEMORY_HEADROOM = 0.8
PROBE_SIZE = 128  # activations scale with the pixel count, so the probe runs small and is scaled up


@dataclasses.dataclass(frozen=True)
class StepMemory:
    """Bytes a training step needs: `fixed` (gradients, optimizer state, standardized weights) plus
    `per_image` for every image of a micro-batch."""

    fixed: int
    per_image: int
    seconds_per_image: float = 0.0  # the probe's forward pass, scaled to `crop` pixels
    split_fixed: int = 0  # more when the batch is split (the gradients gathered for the standardized weights)

    def for_micro_batch(self, images: int, split: int = 1) -> int:
        return self.fixed + images * self.per_image + (self.split_fixed if split > 1 else 0)

    def step_seconds(self, images: int) -> float:
        """A rough training-step time for `images` images: forward and backward about 3 forwards."""
        return 3 * self.seconds_per_image * images


def step_memory(model: nn.Module, crop: int, device: torch.device, autocast: Any) -> StepMemory:
    """Measure what one forward pass saves for backward at micro-batches of 1 and 2 images (zeros, so no RNG is
    drawn and no weight changes), scaled from `PROBE_SIZE` to `crop` pixels."""
    size = min(crop, PROBE_SIZE)
    parameters = [parameter for parameter in model.parameters() if parameter.requires_grad]
    parameter_ids = {parameter.data_ptr() for parameter in model.parameters()}

    def saved(images: int) -> int:
        tensors: dict[tuple[int, int], int] = {}

        def pack(tensor: torch.Tensor) -> torch.Tensor:
            if tensor.data_ptr() not in parameter_ids:
                tensors[(tensor.data_ptr(), tensor.numel())] = tensor.numel() * tensor.element_size()
            return tensor

        pixels = torch.zeros(images, 3, size, size, device=device)
        with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor), autocast:
            output = model(pixels)
        del output
        return sum(tensors.values())

    one, seconds = saved(1), math.inf
    for _ in range(2):  # the first passes also set up kernels: the faster of two
        started = time.perf_counter()
        two = saved(2)
        seconds = min(seconds, time.perf_counter() - started)
    scale = (crop / size) ** 2
    per_image = (two - one) * scale * ACTIVATION_FACTOR + 3 * crop * crop * 4  # and the image itself
    fixed = max(0, one - (two - one)) + 2 * sum(p.numel() * p.element_size() for p in parameters)  # grads, momentum
    return StepMemory(int(fixed), int(per_image), seconds / 2 * scale)


def fit_batch_split(batch_per_process: int, need: StepMemory, available: int | None) -> int:
    """The fewest micro-batches (a divisor of the batch) whose step fits `MEMORY_HEADROOM` of `available`; 1 when
    the memory cannot be told. Raises OutOfMemoryError, with the numbers, when not even one image per micro-batch fits."""
    if available is None:
        return 1
    budget = available * MEMORY_HEADROOM
    for split in (n for n in range(1, batch_per_process + 1) if batch_per_process % n == 0):
        if need.for_micro_batch(batch_per_process // split, split) <= budget:
            return split
    raise OutOfMemoryError(
        f"a training step needs about {human_size(need.for_micro_batch(1, batch_per_process))} even with one image "
        f"per micro-batch, and {human_size(available)} is available: lower --crop, pass --gradient-checkpointing or "
        "use a smaller model"
    )


# The instruction sets a CPU benchmark's figures depend on (fp32 AVX2 / AVX-512, int8 VNNI, bf16, AMX tiles).
ISA_FLAGS = ("avx2", "avx512f", "avx512_vnni", "avx512_bf16", "amx_tile", "amx_bf16", "amx_int8")


def cpu_description() -> dict[str, Any]:
    """{model, flags (those of ISA_FLAGS it has), cpus (usable here)}: what every benchmark records beside its
    figures. From /proc/cpuinfo; elsewhere the model is platform.processor() and no flags are known."""
    model, flags = platform.processor() or "cpu", set()
    try:
        text = (PROC / "cpuinfo").read_text(encoding="utf-8", errors="replace")
    except OSError:
        text = ""
    for line in text.splitlines():
        key, _, value = line.partition(":")
        if key.strip() == "model name":
            model = value.strip()
        elif key.strip() == "flags" and not flags:
            flags = set(value.split())
    return dict(model=model, flags=[flag for flag in ISA_FLAGS if flag in flags], cpus=usable_cpus())
