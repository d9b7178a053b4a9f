"""`bigtransfer bench`'s timing core and this package's contenders; benchmarks/harness.py adds peers on top.

Each contender runs in its own worker process (none runs a graph compiled for another), built from the same
seeded weights; the parent drives the workers in interleaved rounds (A B C, B C A, ...) through pipes, each sample
repeating steps for about half a second, and reports medians. Frozen contenders compile with inductor's freezing
set the documented way (its config patched around compilation and the first call); the worker watches the
freezing pass and refuses a contender that expects frozen weights and got none.
"""

from __future__ import annotations

import contextlib
import dataclasses
import multiprocessing
import os
import statistics
import time
from collections.abc import Callable, Iterator
from typing import Any
from unittest import mock

import torch
import torch.nn.functional as F
from torch import nn

from .config import VARIANTS, BitConfig
from .inference import optimize, prepare_for_training
from .modeling import BitForImageClassification
from .precision import REDUCED_PRECISION, autocast_for

WORKLOADS = {"infer-b1": (1, 224, False), "infer-b16": (16, 224, False), "train-b16": (16, 128, True)}
PRECISIONS = ("fp32", "bf16", "fp16", "tf32")  # tf32 / fp16: GPUs only
SAMPLE_SECONDS, QUIET_LIMIT = 0.5, 0.1  # quiet: other processes used under 10 % of the CPUs during a sample


@dataclasses.dataclass
class BenchConfig:
    """What `run_bench` times; `contenders` keeps the names containing one of these strings (None: all)."""

    variant: str = "BiT-S-R50x1"
    workloads: tuple[str, ...] = tuple(WORKLOADS)
    precisions: tuple[str, ...] = ("fp32",)
    rounds: int = 5
    device: str = "cpu"
    compile: bool = True
    threads: int | None = None
    contenders: tuple[str, ...] | None = None
    parallel_builds: bool = False  # build a workload's contenders at once (large machines: compiles overlap)


@dataclasses.dataclass
class Contender:
    """`factory(**kwargs)`, called in the worker, returns one step; `frozen`: it must run inductor-frozen weights."""

    name: str
    factory: Callable[..., Callable[[], Any]]
    kwargs: dict[str, Any]
    ours: bool = True
    frozen: bool = False


def reference_model(variant: str) -> nn.Module:
    """Seeded weights with non-trivial norms and head: every process builds the same model."""
    torch.manual_seed(0)
    model = BitForImageClassification(BitConfig.from_variant(variant))
    with torch.no_grad():
        for module in model.modules():
            if isinstance(module, nn.GroupNorm):
                module.weight.uniform_(0.5, 1.5), module.bias.uniform_(-0.1, 0.1)
        nn.init.normal_(model.classifier[1].weight, std=0.01)
    return model.eval()


def pixels(workload: str, device: str, channels_last: bool = True) -> torch.Tensor:
    batch, size, _ = WORKLOADS[workload]
    x = torch.randn(batch, 3, size, size, generator=torch.Generator().manual_seed(0)).to(device)
    return x.contiguous(memory_format=torch.channels_last) if channels_last else x


@contextlib.contextmanager
def watch_freezing(enable: bool = True) -> Iterator[list[int]]:
    """Inductor's freezing on, the documented way (unless not `enable`); yields a list that receives, for each
    graph the freezing pass runs on, how many parameters it made constants (0: it froze nothing, as
    `torch.compile(options={"freezing": True})` does on torch 2.14)."""
    import torch._inductor.config  # the compiler: loaded only where a compiled contender is built
    from torch._inductor import freezing

    inlined, freezing_pass = [], freezing.freeze

    def spy(dynamo_graph, aot_graph, example_inputs):
        inputs = len(aot_graph.graph.find_nodes(op="placeholder"))
        graph, kept = freezing_pass(dynamo_graph, aot_graph, example_inputs)
        inlined.append(inputs - len(kept))
        return graph, kept

    with mock.patch.object(freezing, "freeze", spy), torch._inductor.config.patch(freezing=enable):
        yield inlined


def inference_step(model: nn.Module, x: torch.Tensor, precision: str, compiled: bool = False):
    """A forward pass under inference_mode and the precision's autocast (`compiled`: by torch.compile)."""
    call, dtype = torch.compile(model, dynamic=False) if compiled else model, REDUCED_PRECISION.get(precision)

    def step():
        with torch.inference_mode(), autocast_for(x.device, dtype):
            return call(x)

    return step


def training_step(model: nn.Module, workload: str, precision: str, device: str, channels_last: bool = True):
    """One SGD step (forward, cross-entropy, backward, update) under the precision's autocast."""
    x, dtype = pixels(workload, device, channels_last), REDUCED_PRECISION.get(precision)
    labels = torch.randint(0, 10, (x.shape[0],), generator=torch.Generator().manual_seed(2)).to(device)
    optimizer = torch.optim.SGD(model.to(device).train().parameters(), lr=0.003, momentum=0.9)

    def step():
        optimizer.zero_grad(set_to_none=True)
        with autocast_for(x.device, dtype):
            output = model(x)
            loss = F.cross_entropy(output if isinstance(output, torch.Tensor) else output.logits, labels)
        loss.backward()
        optimizer.step()

    return step


def ours(kind: str, workload: str, precision: str, variant: str, device: str):
    """A worker's factory for this package's paths: "eager" (the default model), "optimize" / "optimize-eager"
    (compile=True / False), "train" (prepare_for_training) and "train-compiled" (its compile=True)."""
    model = reference_model(variant).to(device)
    if kind.startswith("train"):
        return training_step(prepare_for_training(model, compile=kind == "train-compiled"), workload, precision, device)
    x = pixels(workload, device, channels_last=kind != "eager")
    if kind == "eager":
        return inference_step(model, x, precision)
    fast = optimize(model, dtype=REDUCED_PRECISION.get(precision), compile=kind == "optimize", inplace=True)
    return lambda: fast(x)


def our_contenders(config: BenchConfig, workload: str, precision: str) -> list[Contender]:
    """This package's paths, the default first: the default model, optimize(compile=False) and optimize() (frozen)
    for inference; prepare_for_training() and its compile=True for the training step."""
    common = dict(workload=workload, precision=precision, variant=config.variant, device=config.device)
    dtype = f'dtype="{precision}"' if precision in REDUCED_PRECISION else ""
    kinds = {"bigtransfer prepare_for_training()": "train", "bigtransfer prepare_for_training(compile=True)":
             "train-compiled"} if WORKLOADS[workload][2] else {
        "bigtransfer": "eager", f"bigtransfer optimize({dtype}{', ' * bool(dtype)}compile=False)": "optimize-eager",
        f"bigtransfer optimize({dtype})": "optimize"}
    return [Contender(name, ours, dict(common, kind=kind), frozen=kind == "optimize")
            for name, kind in kinds.items() if config.compile or kind not in ("optimize", "train-compiled")]


# ---------------------------------------------------------------------------------------------------------------
# Workers: a process per contender, driven through a pipe.


def _serve(connection, contender: Contender, threads: int | None, precision: str) -> None:
    """The worker: build and warm up (compiling; frozen where asked), then answer ("time", n) and ("call", f)."""
    if threads:
        torch.set_num_threads(threads)
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = precision == "tf32"
    try:
        start = time.perf_counter()
        with watch_freezing() if contender.frozen else contextlib.nullcontext([]) as inlined:
            step = contender.factory(**contender.kwargs)
            step(), step(), _sync()  # warm-up: compiles, allocator pools, oneDNN primitive caches
        if contender.frozen and not (inlined and all(inlined)):
            raise RuntimeError(f"freezing did not take effect (parameters made constants, per graph: {inlined})")
        connection.send(("ready", {"setup_seconds": time.perf_counter() - start, "frozen_constants": sum(inlined)}))
    except Exception as error:  # a peer or backend that cannot run here is reported, not fatal
        connection.send(("error", f"{type(error).__name__}: {error}"))
        return
    while (message := connection.recv())[0] != "quit":
        if message[0] == "time":
            cpu, start = time.process_time(), time.perf_counter()
            for _ in range(message[1]):
                step()
            _sync()
            connection.send((time.perf_counter() - start, time.process_time() - cpu))
        else:
            connection.send(message[1](step))


def _sync() -> None:
    if torch.cuda.is_initialized():
        torch.cuda.synchronize()


class Worker:
    """A contender's process, started on creation; `wait()` for its build (then `error` says why it failed)."""

    def __init__(self, contender: Contender, threads: int | None, precision: str):
        context = multiprocessing.get_context("spawn")  # a fresh interpreter: no compiled graph is inherited
        self.connection, child = context.Pipe()
        self.process = context.Process(target=_serve, args=(child, contender, threads, precision), daemon=True)
        self.process.start()
        child.close()

    def wait(self) -> Worker:
        try:
            kind, self.info = self.ask()
        except RuntimeError as error:
            kind, self.info = "error", str(error)
        self.error = self.info if kind == "error" else None
        return self

    def ask(self, *message: Any) -> Any:
        try:
            if message:
                self.connection.send(message)
            return self.connection.recv()
        except (EOFError, OSError) as error:
            self.process.join(5)
            raise RuntimeError(f"the worker process exited (code {self.process.exitcode})") from error

    def close(self) -> None:
        if self.process.is_alive() and not self.error:
            self.connection.send(("quit",))
        self.process.join(30)
        if self.process.is_alive():
            self.process.kill()


def _busy_seconds() -> float:
    """CPU time the machine has spent busy since boot (/proc/stat; 0 where there is none)."""
    try:
        with open("/proc/stat") as handle:
            ticks = [int(value) for value in handle.readline().split()[1:9]]
    except OSError:
        return 0.0
    return (sum(ticks) - ticks[3] - ticks[4]) / os.sysconf("SC_CLK_TCK")  # idle and iowait are not busy


def time_contenders(contenders: list[Contender], batch: int, rounds: int, threads: int | None = None,
                    precision: str = "fp32", calls: dict[str, Callable] | None = None, parallel_builds: bool = False,
                    between_rounds: Callable[[], Any] = lambda: None, log: Callable = print) -> list[dict[str, Any]]:
    """Each contender in its own worker (built one after another, or all at once), timed in interleaved rounds.
    One row per contender: median images/s over the quiet rounds (other processes used under 10 % of the CPUs;
    all rounds when fewer than two were quiet), the rounds, `add_ratios`' ratio, `calls`' answers from its worker."""
    workers = {c.name: Worker(c, threads, precision) for c in contenders} if parallel_builds else {}
    workers = {c.name: (workers.get(c.name) or Worker(c, threads, precision)).wait() for c in contenders}
    live = [name for name, worker in workers.items() if not worker.error]
    counts = {name: max(1, min(50, int(SAMPLE_SECONDS / max(workers[name].ask("time", 1)[0], 1e-4)))) for name in live}
    samples: dict[str, list[tuple[float, bool]]] = {name: [] for name in live}
    for index in range(rounds if live else 0):
        between_rounds()
        for name in live[index % len(live):] + live[:index % len(live)]:
            busy, (seconds, cpu) = _busy_seconds(), workers[name].ask("time", counts[name])
            foreign = _busy_seconds() - busy - cpu  # CPU time other processes used meanwhile
            samples[name].append((seconds / counts[name], foreign < QUIET_LIMIT * seconds * (os.cpu_count() or 1)))
        log(f"  round {index + 1}: " + ", ".join(f"{n} {batch / samples[n][-1][0]:.2f}" for n in live) + " img/s")
    rows = []
    for contender in contenders:
        worker, timed = workers[contender.name], samples.get(contender.name, [])
        row = {"contender": contender.name, "ours": contender.ours, "frozen": contender.frozen, "error": worker.error}
        if not worker.error:
            quiet = [seconds for seconds, ok in timed if ok]
            median = statistics.median(quiet if len(quiet) >= 2 else [seconds for seconds, _ in timed])
            row |= worker.info | {"images_per_second": batch / median, "clean_rounds": len(quiet),
                                  "rounds": [batch / seconds for seconds, _ in timed]}
            row |= {key: worker.ask("call", function) for key, function in (calls or {}).items()}
        worker.close()
        rows.append(row)
    return add_ratios(rows)


def add_ratios(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Each row's `ratio` of images/s to the best peer's (rows not `ours`); without peers, to the first row's."""
    speed = {row["contender"]: row["images_per_second"] for row in rows if not row.get("error")}
    peers = [speed[row["contender"]] for row in rows if not row["ours"] and row["contender"] in speed]
    reference = max(peers) if peers else speed.get(rows[0]["contender"]) if rows else None
    for row in rows:
        row["ratio"] = speed[row["contender"]] / reference if reference and row["contender"] in speed else None
    return rows


def check_config(config: BenchConfig) -> None:
    """Refuse what cannot be measured, before anything is built."""
    for name, values, allowed in (("workload", config.workloads, WORKLOADS), ("variant", (config.variant,), VARIANTS),
                                  ("precision", config.precisions, PRECISIONS)):
        if unknown := [value for value in values if value not in allowed]:
            raise ValueError(f"unknown {name} {', '.join(unknown)}; choose from {', '.join(allowed)}")
    if config.rounds < 1:
        raise ValueError(f"rounds must be at least 1, got {config.rounds}")
    if torch.device(config.device).type == "cpu" and {"tf32", "fp16"} & set(config.precisions):
        raise ValueError("tf32 / fp16 are measured on a GPU only (--device cuda); on a CPU use fp32 or bf16")


def run_bench(config: BenchConfig, peers: Callable[[str, str], list[Contender]] = lambda w, p: [],
              log: Callable = print, **timing: Any) -> list[dict[str, Any]]:
    """Each workload and precision of `config`: this package's contenders and `peers(workload, precision)`, timed
    by `time_contenders` (`timing`: its other options); one row per contender."""
    check_config(config)
    rows = []
    for precision in config.precisions:
        for workload in config.workloads:
            contenders = [c for c in our_contenders(config, workload, precision) + peers(workload, precision)
                          if not config.contenders or any(part in c.name for part in config.contenders)]
            log(f"{workload} ({precision}): {len(contenders)} contenders, {config.rounds} rounds")
            rows += [{"workload": workload, "precision": precision, **row} for row in time_contenders(
                contenders, WORKLOADS[workload][0], config.rounds, config.threads, precision,
                parallel_builds=config.parallel_builds, log=log, **timing)]
    return rows
