"""The run directory: what a training run owns and keeps there to survive being stopped.

- which files are a run's (`RUN_FILES`), whether a folder is a run (`is_run_directory`), claiming an output and
  clearing it for `--overwrite`, and cutting metrics.jsonl back to the checkpoint's step on resume;
- the training checkpoint (`checkpoint.safetensors`): model, optimizer, RNG states, the loss scaler and the
  loop's own state, in one safetensors file written atomically, so a run resumes exactly where it stopped;
- the run lock (`.lock`), so two processes never train into one directory;
- SIGINT / SIGTERM turned into a flag the loop checks after each step, so a stop saves a checkpoint first;
- the sweep of temporaries that a SIGKILL in the middle of an atomic write leaves behind.

Model weight *formats* (timm, .npz, the original code) are another matter: see `bigtransfer.checkpoints`.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import random
import shutil
import signal
import socket
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors import safe_open
from torch import nn

from ..checkpoints.writers import save_safetensors
from ..data import spec_paths
from ..files import atomic_path, is_alive, is_atomic_temporary, read_json, write_text_atomic
from ..ownership import claim_output
from ..report import METRICS_NAME, PLOT_NAMES, REPORT_NAME, read_metrics

logger = logging.getLogger("bigtransfer")

CHECKPOINT_NAME = "checkpoint.safetensors"
CHECKPOINT_FORMAT = "bigtransfer-checkpoint-1"
LOCK_NAME = ".lock"
MODEL_DIRNAME = "model"
RUN_NAME = "run.json"
RUN_FILES = (CHECKPOINT_NAME, RUN_NAME, METRICS_NAME, REPORT_NAME, MODEL_DIRNAME, *PLOT_NAMES)
RUN_KINDS = ("finetune", "pretrain", "distill")


class RunLockedError(RuntimeError):
    """Another live process is training into the same output directory."""


# ---------------------------------------------------------------------------------------------------------------
# Ownership.


def is_run_directory(path: Path) -> bool:
    """Whether `path` is a directory a run wrote: its run.json describes a training run, or it holds nothing but
    a run's lock and the temporaries of a run's files (a run killed before writing anything)."""
    names = {entry.name for entry in path.iterdir()
             if not any(is_atomic_temporary(entry.name, name) for name in RUN_FILES)}  # left by a killed run
    if names <= {LOCK_NAME}:
        return True
    try:
        description = read_json(path / RUN_NAME)
    except (OSError, ValueError):
        return False
    return description.get("kind") in RUN_KINDS and isinstance(description.get("settings"), dict)


def claim_run_directory(settings: Any, create: bool) -> Path:
    """The run's output directory, refused when it is not a run's (without `overwrite`) or when it is, holds or
    lies in one of the run's inputs (the model, the data); created when `create`."""
    inputs = [getattr(settings, "model", None), *spec_paths(settings.data), *spec_paths(settings.eval_data)]
    return claim_output(settings.output, "bigtransfer run directory", is_run_directory, inputs, settings.overwrite,
                        create=create)


def remove_run_files(output: Path) -> None:
    """--overwrite: the previous run's files go, so the new run starts afresh (nothing else is touched)."""
    for name in RUN_FILES:
        path = output / name
        if path.is_dir() and not path.is_symlink():
            shutil.rmtree(path)
        else:
            path.unlink(missing_ok=True)


def truncate_metrics(path: Path, steps: int) -> None:
    """Drop records past the checkpoint (written by a run that was killed after it) so steps never repeat."""
    if not path.is_file():
        return
    kept = [record for record in read_metrics(path) if record.get("step", 0) <= steps] if steps else []
    write_text_atomic(path, "".join(json.dumps(record) + "\n" for record in kept))


# ---------------------------------------------------------------------------------------------------------------
# The training checkpoint.


def save_run_state(path: str | os.PathLike, model: nn.Module, optimizer: torch.optim.Optimizer,
                    state: dict[str, Any], scaler: torch.amp.GradScaler | None = None) -> Path:
    """Write model, optimizer, RNG states and `state` (JSON) to one safetensors file, atomically."""
    tensors = {f"model/{key}": value.detach().cpu().contiguous() for key, value in model.state_dict().items()}
    optimizer_tensors, optimizer_plain = _flatten_optimizer(optimizer)
    rng_tensors, rng_plain = _rng_state()
    tensors.update(optimizer_tensors)
    tensors.update(rng_tensors)
    full_state = dict(state, optimizer=optimizer_plain, rng=rng_plain)
    if scaler is not None and scaler.is_enabled():
        full_state["scaler"] = {key: (value.item() if isinstance(value, torch.Tensor) else value)
                                for key, value in scaler.state_dict().items()}
    metadata = {"format": CHECKPOINT_FORMAT, "state": json.dumps(full_state)}
    path = Path(path)
    with atomic_path(path) as temporary:
        save_safetensors(tensors, temporary, metadata, path)
    return path


def load_run_state(path: str | os.PathLike) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """(tensors, state) of a checkpoint written by `save_run_state`, checked whole before anything is restored;
    ValueError naming the file and how to start again for anything else (truncated, tampered, another file)."""
    try:
        with safe_open(str(path), framework="pt") as handle:
            metadata = handle.metadata() or {}
            if metadata.get("format") != CHECKPOINT_FORMAT:
                raise ValueError("not a bigtransfer training checkpoint")
            tensors = {key: handle.get_tensor(key) for key in handle.keys()}
        state = json.loads(metadata["state"])
        _check_state(tensors, state)
    except (OSError, RuntimeError, ValueError, KeyError, TypeError, IndexError) as error:  # safetensors, JSON, shapes
        detail = f"{type(error).__name__}: {error}" if str(error) else type(error).__name__
        raise ValueError(f"cannot resume from {path}: it is damaged or not a training checkpoint ({detail[:200]}); "
                         "start the run again with --overwrite, or choose another --output") from None
    return tensors, state


def _check_state(tensors: dict[str, torch.Tensor], state: Any) -> None:
    """Every part `restore_run_state` and the loop read is there, of its type; the RNG states load."""
    if not isinstance(state, dict):
        raise TypeError("the state is not a JSON object")
    for key, kind in (("step", int), ("seconds", (int, float)), ("signature", dict), ("skipped_images", list),
                      ("optimizer", dict), ("rng", dict)):
        if not isinstance(state.get(key), kind):
            raise ValueError(f"state field {key!r} is missing or not a {getattr(kind, '__name__', 'number')}")
    torch.Generator().set_state(tensors["rng/torch"])
    kind, position, has_gauss, gauss = state["rng"]["numpy"]
    np.random.RandomState().set_state((kind, tensors["rng/numpy"].numpy().astype(np.uint32), position, has_gauss, gauss))
    version, internal, gauss_next = state["rng"]["python"]
    random.Random().setstate((version, tuple(internal), gauss_next))


def restore_run_state(tensors: dict[str, torch.Tensor], state: dict[str, Any], model: nn.Module,
                       optimizer: torch.optim.Optimizer, scaler: torch.amp.GradScaler) -> None:
    """Put what `load_run_state` returned back into the model, the optimizer, the global RNGs and the scaler;
    ValueError (saying how to start again) when the checkpoint does not fit them."""
    try:
        model.load_state_dict({key[len("model/"):]: value for key, value in tensors.items() if key.startswith("model/")})
        optimizer.load_state_dict(_unflatten_optimizer(tensors, state["optimizer"]))
    except (RuntimeError, ValueError, KeyError, TypeError) as error:
        raise ValueError(f"the training checkpoint does not fit this run's model or optimizer ({str(error)[:200]}); "
                         "start the run again with --overwrite, or choose another --output") from None
    _set_rng_state(tensors, state["rng"])
    if "scaler" in state:
        scaler.load_state_dict(state["scaler"])


def _flatten_optimizer(optimizer: torch.optim.Optimizer) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """The optimizer's state dict split into tensors (`optimizer/<param>/<key>`) and JSON-able rest."""
    state = optimizer.state_dict()
    tensors, plain = {}, {"param_groups": state["param_groups"], "state": {}}
    for index, values in state["state"].items():
        for key, value in values.items():
            if isinstance(value, torch.Tensor):
                tensors[f"optimizer/{index}/{key}"] = value.detach().cpu().contiguous()
            else:
                plain["state"].setdefault(str(index), {})[key] = value
    return tensors, plain


def _unflatten_optimizer(tensors: dict[str, torch.Tensor], plain: dict[str, Any]) -> dict[str, Any]:
    """The inverse of `_flatten_optimizer`: an optimizer state dict."""
    state: dict[int, dict[str, Any]] = {int(index): dict(values) for index, values in plain["state"].items()}
    for name, value in tensors.items():
        if name.startswith("optimizer/"):
            _, index, key = name.split("/", 2)
            state.setdefault(int(index), {})[key] = value
    return {"state": state, "param_groups": plain["param_groups"]}


def _rng_state() -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """The torch (CPU and initialised CUDA), NumPy and Python global RNG states, as tensors and JSON-able rest."""
    tensors = {"rng/torch": torch.get_rng_state()}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        for index, state in enumerate(torch.cuda.get_rng_state_all()):
            tensors[f"rng/cuda/{index}"] = state
    kind, keys, position, has_gauss, gauss = np.random.get_state()
    tensors["rng/numpy"] = torch.from_numpy(keys.astype(np.int64))
    python_state = random.getstate()
    plain = {"numpy": [kind, int(position), int(has_gauss), float(gauss)],
             "python": [python_state[0], list(python_state[1]), python_state[2]]}
    return tensors, plain


def _set_rng_state(tensors: dict[str, torch.Tensor], plain: dict[str, Any]) -> None:
    """The inverse of `_rng_state`; CUDA states beyond this machine's devices are dropped."""
    torch.set_rng_state(tensors["rng/torch"])
    cuda_keys = sorted((key for key in tensors if key.startswith("rng/cuda/")), key=lambda key: int(key.rsplit("/", 1)[1]))
    cuda = [tensors[key] for key in cuda_keys]  # in device order: "rng/cuda/10" sorts before "rng/cuda/2" as text
    if cuda and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(cuda[: torch.cuda.device_count()])
    kind, position, has_gauss, gauss = plain["numpy"]
    np.random.set_state((kind, tensors["rng/numpy"].numpy().astype(np.uint32), position, has_gauss, gauss))
    version, internal, gauss_next = plain["python"]
    random.setstate((version, tuple(internal), gauss_next))


# ---------------------------------------------------------------------------------------------------------------
# The run directory: lock, stale temporaries.


class RunLock:
    """`.lock` created with O_EXCL holding `pid host`; a lock left by a dead process on this host is taken over."""

    def __init__(self, directory: Path):
        self.path = directory / LOCK_NAME
        self.owned = False

    def __enter__(self) -> RunLock:
        host = socket.gethostname()
        for _ in range(2):
            try:
                handle = os.open(self.path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
            except FileExistsError:
                owner = self._owner()
                if owner is not None and owner[1] == host and not is_alive(owner[0]):
                    logger.warning("taking over the stale lock %s of dead process %d", self.path, owner[0])
                    self.path.unlink(missing_ok=True)
                    continue
                who = f"process {owner[0]} on {owner[1]}" if owner else "another process"
                raise RunLockedError(
                    f"{self.path.parent} is in use by {who} (lock file {self.path}); wait for it, choose another "
                    "output directory, or delete the lock if that process is gone"
                ) from None
            with os.fdopen(handle, "w") as file:
                file.write(f"{os.getpid()} {host}\n")
            self.owned = True
            return self
        raise RunLockedError(f"could not take the lock {self.path}")

    def _owner(self) -> tuple[int, str] | None:
        """(pid, host) written in the lock file, or None when it is missing or unreadable."""
        try:
            pid, host = self.path.read_text().split()
            return int(pid), host
        except (OSError, ValueError):
            return None

    def __exit__(self, *exc) -> None:
        if self.owned and self._owner() == (os.getpid(), socket.gethostname()):
            self.path.unlink(missing_ok=True)


def remove_stale_temporaries(directory: Path, names: Iterable[str]) -> list[Path]:
    """Delete the temporaries `files.atomic_path` and `files.atomic_directory` left beside `directory/<name>` for
    each of `names`; returns them.

    Such a file outlives its writer only when the writer was killed mid-write (SIGKILL, power loss). Call this
    only while holding the run lock: then no live process is writing these names, so none of them is in use.
    """
    names = list(names)
    removed = []
    with os.scandir(directory) as entries:
        for entry in entries:
            if not any(is_atomic_temporary(entry.name, name) for name in names):
                continue
            if entry.is_dir(follow_symlinks=False):
                shutil.rmtree(entry.path, ignore_errors=True)
            elif entry.is_file(follow_symlinks=False):
                Path(entry.path).unlink(missing_ok=True)
            else:
                continue
            removed.append(Path(entry.path))
    for path in removed:
        logger.info("removed %s, left by a run killed while writing it", path)
    return removed


# ---------------------------------------------------------------------------------------------------------------
# Stopping on a signal.


class StopSignals:
    """The first SIGINT / SIGTERM sets a flag the loop checks after each step, and says so at once; a second one
    while a checkpoint is being written waits for the write; a second one at any other time interrupts at once
    (KeyboardInterrupt), keeping the last checkpoint written."""

    def __init__(self, announce: bool = True):
        self.received: int | None = None
        self.announce = announce
        self._saving = False
        self._previous: dict[int, Any] = {}

    def _say(self, text: str) -> None:
        if self.announce:
            os.write(2, text.encode())  # from a signal handler: no buffered stream, no logging locks

    def _handle(self, signum, frame) -> None:
        name = signal.Signals(signum).name
        if self.received is None:
            self.received = signum
            self._say(f"\nbigtransfer: {name}: stopping after this step and saving a checkpoint (send it again to "
                      "stop at once, keeping the last checkpoint)\n")
        elif self._saving:
            self._say(f"\nbigtransfer: {name}: the checkpoint is being written; stopping as soon as it is\n")
        else:
            raise KeyboardInterrupt(f"{name} received twice: stopped at once; the last checkpoint written is kept")

    @contextlib.contextmanager
    def saving(self) -> Iterator[None]:
        """While a checkpoint is written, a second signal does not interrupt it."""
        self._saving = True
        try:
            yield
        finally:
            self._saving = False

    def __enter__(self) -> StopSignals:
        for signum in (signal.SIGINT, signal.SIGTERM):
            try:
                self._previous[signum] = signal.signal(signum, self._handle)
            except ValueError:  # not the main thread: leave signals alone
                break
        return self

    def __exit__(self, *exc) -> None:
        for signum, handler in self._previous.items():
            signal.signal(signum, handler)
