"""One process or a torchrun process group, behind one small interface. Internal: used by `bigtransfer.train`.

Every helper takes the `Context` that `distributed()` yields and is a no-op (returns its input) in a single
process, so the training and evaluation code reads the same for one process and for N.
"""

from __future__ import annotations

import atexit
import contextlib
import dataclasses
import datetime
import logging
import os
from collections.abc import Iterator
from typing import Any

import numpy as np
import torch
import torch.distributed as dist

logger = logging.getLogger("bigtransfer")

EXIT_BARRIER_TIMEOUT_S = 60


@dataclasses.dataclass(frozen=True)
class Context:
    """Where this process runs: its rank among `world_size` processes and its device."""

    world_size: int
    rank: int
    device: torch.device

    @property
    def is_main(self) -> bool:
        return self.rank == 0


@dataclasses.dataclass(frozen=True)
class Launch:
    """How torchrun started this process (world size 1, rank 0 when it did not)."""

    world_size: int
    rank: int
    local_rank: int


def launch() -> Launch:
    """torchrun's environment (WORLD_SIZE, RANK, LOCAL_RANK), read in one place. A RANK or LOCAL_RANK without a
    WORLD_SIZE above 1 is not a torchrun launch (a stray variable in a shell): it is ignored, with a warning, so
    the process does its work and reports it as the only one."""
    def number(name: str, default: int) -> int:
        text = os.environ.get(name, str(default))
        try:
            return int(text)
        except ValueError:
            raise ValueError(f"environment variable {name}={text!r} is not an integer (torchrun sets it)") from None

    world_size, rank, local_rank = number("WORLD_SIZE", 1), number("RANK", 0), number("LOCAL_RANK", 0)
    if world_size <= 1:
        if rank or local_rank:
            logger.warning("ignoring RANK=%s / LOCAL_RANK=%s: WORLD_SIZE is not above 1, so this is not a torchrun "
                           "launch", os.environ.get("RANK"), os.environ.get("LOCAL_RANK"))
        return Launch(1, 0, 0)
    if not 0 <= rank < world_size:
        raise ValueError(f"environment variable RANK={rank} must lie in [0, WORLD_SIZE={world_size})")
    return Launch(world_size, rank, local_rank)


def is_main_process() -> bool:
    """Whether this process reports a command's result (the only one, or rank 0 under torchrun)."""
    return launch().rank == 0


@contextlib.contextmanager
def distributed(device: str | None) -> Iterator[Context]:
    """One process, or the process group torchrun describes (WORLD_SIZE, RANK, LOCAL_RANK, MASTER_ADDR/PORT).

    NCCL on GPUs, gloo on CPUs. The group is created once and lives as long as the process: destroying and
    re-creating it between two commands run in one process (finetune, then features) can pair a rank with the
    previous group's leftover rendezvous keys in torchrun's store and hang both ranks.
    """
    started = launch()
    world_size, local_rank = started.world_size, started.local_rank
    wants_cuda = (device is None and torch.cuda.is_available()) or (device or "").startswith("cuda")
    if wants_cuda:
        chosen = torch.device(device if device and ":" in device else f"cuda:{local_rank if world_size > 1 else 0}")
        torch.cuda.set_device(chosen)
    else:
        chosen = torch.device(device or "cpu")
    if world_size > 1 and not dist.is_initialized():
        dist.init_process_group("nccl" if chosen.type == "cuda" else "gloo")
        atexit.register(_destroy_process_group)
    rank = dist.get_rank() if dist.is_initialized() else 0
    world_size = dist.get_world_size() if dist.is_initialized() else 1
    yield Context(world_size, rank, chosen)


def _destroy_process_group() -> None:
    """Tear the group down at interpreter exit (registered by `distributed`), once every rank is done.

    Without the barrier a rank that finishes first closes its connections while gloo's threads in a slower rank
    still use them, and that rank aborts at exit ("terminate called without an active exception"; about 1 run
    in 16 of the 2-process test). gloo's barrier is monitored, so a rank that died makes this one log and exit
    after the timeout instead of hanging.
    """
    if not dist.is_initialized():
        return
    try:
        if dist.get_backend() == "gloo":
            dist.monitored_barrier(timeout=datetime.timedelta(seconds=EXIT_BARRIER_TIMEOUT_S))
        else:
            dist.barrier()
    except Exception as error:  # a peer is gone: nothing to wait for
        logger.warning("rank %d: not every rank reached the end (%s); leaving without them", dist.get_rank(), error)
    dist.destroy_process_group()


def cuda_devices(context: Context) -> list[int]:
    """The CUDA device indices this process uses (for `torch.random.fork_rng`); empty on CPU."""
    return [context.device.index or 0] if context.device.type == "cuda" else []


def barrier(context: Context) -> None:
    """Wait until every rank gets here."""
    if context.world_size > 1:
        dist.barrier()


def all_sum(context: Context, values: list[float]) -> list[float]:
    """Element-wise sums of `values` over all ranks (float64)."""
    if context.world_size == 1:
        return values
    tensor = torch.tensor(values, dtype=torch.float64, device=context.device)
    dist.all_reduce(tensor)
    return tensor.tolist()


def all_gather(context: Context, value: Any) -> list[Any]:
    """Every rank's `value` (any picklable object), in rank order."""
    if context.world_size == 1:
        return [value]
    gathered = [None] * context.world_size
    dist.all_gather_object(gathered, value)
    return gathered


def gather_paths(context: Context, paths: list[str]) -> list[str]:
    """Every rank's `paths`, concatenated in rank order."""
    return [path for part in all_gather(context, paths) for path in part]


def gather_rows(context: Context, *arrays: np.ndarray) -> tuple[np.ndarray, ...]:
    """Re-interleave per-rank rows (rank r holds items r, r + world, ...) into the data set's order."""
    if context.world_size == 1:
        return arrays
    gathered = all_gather(context, arrays)
    result = []
    for column in range(len(arrays)):
        parts = [part[column] for part in gathered]
        total = sum(len(part) for part in parts)
        merged = np.empty((total,) + parts[0].shape[1:], dtype=parts[0].dtype)
        for rank, part in enumerate(parts):
            merged[rank :: context.world_size][: len(part)] = part
        result.append(merged)
    return tuple(result)
