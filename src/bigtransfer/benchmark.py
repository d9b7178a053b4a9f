"""Speed of this package's paths on the user's machine (`bigtransfer bench`), and the timing harness that
benchmarks/bench_models.py extends with transformers and timm.

What it measures: for each workload (batch-1 and batch-16 inference at 224 px, a batch-16 training step at 128 px)
and precision, images/s, peak memory, GFLOP/s and the fraction of the machine's measured peak for the kernels
that run it (`bigtransfer.peaks`: oneDNN convolutions in fp32 / bf16, ONNX Runtime's int8 convolutions), for this
package's paths: the default eager model, `optimize()` with and without torch.compile, ONNX Runtime in fp32 and
int8, and the training step in both layouts, eager and compiled. The report records the machine: CPU model,
instruction sets, usable cores, threads, torch version and the peaks. Optionally, where the time goes
(torch.profiler) and the end-to-end JPEG-to-top-5 pipeline, the plain way and through `predict_images`.

How: every contender gets the same R50x1-shaped weights, the same inputs and the same optimizer. After warm-up,
contenders are timed interleaved (A B C, B C A, ...), each sample repeating fast steps to last about half a second;
the median of the rounds is reported, with each result's ratio to the reference (the best peer when peers take
part, else this package's default eager model). Every compiled contender is compiled by its own `torch.compile`
call with its settings as compile options (inductor freezing included), so that none runs a graph compiled for
another; the report counts the graphs each compiled and compares it with its eager form. On a shared machine each
sample first waits (within a budget) for other processes to go quiet, and samples during which they were busy
anyway are marked and left out of the medians.

Benchmarks are never timed tests: tests check this module's pure parts (ratios, the report table, config
validation); the timing itself is run by hand and reports speed.
"""

from __future__ import annotations

import copy
import dataclasses
import gc
import os
import platform
import statistics
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import numpy as np
import PIL.Image
import torch
import torch.nn.functional as F
from torch import nn

from .config import VARIANTS, BitConfig
from .export import onnx_session
from .images import decode_image, load_image
from .inference import optimize, predict_images, prepare_for_training
from .machine import cpu_description
from .modeling import BitForImageClassification
from .peaks import Peak, measure_peaks
from .precision import PRECISIONS as INFERENCE_PRECISIONS
from .precision import REDUCED_PRECISION, autocast_for
from .processing import BitImageProcessor
from .quantize import quantize

# name -> (batch, image size, training step?)
WORKLOADS: dict[str, tuple[int, int, bool]] = {
    "infer-b1": (1, 224, False),
    "infer-b16": (16, 224, False),
    "train-b16": (16, 128, True),
}
# The training precisions but "auto", and tf32 (fp32 with TF32 matmuls, GPUs only).
PRECISIONS = tuple(name for name in INFERENCE_PRECISIONS if name != "auto") + ("tf32",)


@dataclasses.dataclass
class BenchConfig:
    """What `run_bench` measures. `contenders` filters by substring of the contender names (None: all)."""

    variant: str = "BiT-S-R50x1"
    workloads: tuple[str, ...] = ("infer-b1", "infer-b16", "train-b16")
    rounds: int = 5
    device: str = "cpu"
    precisions: tuple[str, ...] = ("fp32",)
    compile: bool = True
    onnx: bool = True
    pipeline: bool = True
    contenders: tuple[str, ...] | None = None
    seed: int = 0
    threads: int | None = None
    json_path: str | None = None
    profile: bool = False
    quiet_wait: float = 300.0  # seconds per workload the bench may wait for other processes to go quiet
    verbose: bool = True


@dataclasses.dataclass
class Contender:
    name: str
    ours: bool
    build: Callable[[tuple[int, int, bool], str], Callable[[], Any]]  # (workload spec, precision) -> one step
    informational: bool = False  # shown, but not counted as a peer (not what users run by default)
    eager_form: str | None = None  # a compiled contender: the contender it compiles (it should be no slower)
    peak: str | None = None  # the peak its kernels are measured against (default: the workload's precision)


@dataclasses.dataclass
class Result:
    workload: str
    precision: str
    contender: str
    ours: bool
    informational: bool
    images_per_second: float
    seconds_per_step: float
    rounds: list[float]
    peak_memory_mb: float | None
    gflops: float
    peak_fraction: float
    peak: str = "fp32"
    ratio_to_best_peer: float | None = None
    setup_seconds: float = 0.0
    clean_rounds: int = 0  # rounds in which no other process was busy (the median uses those)
    error: str | None = None
    eager_form: str | None = None
    ratio_to_eager_form: float | None = None
    graphs_compiled: int | None = None  # by a compiled contender in its build and warm-up (0: it reused a graph)


class Peers:
    """Other implementations to time beside this package's paths (benchmarks/bench_models.py gives transformers
    and timm): contenders built from the same weights, a check that they compute the same logits, versions."""

    def contenders(self, config: BenchConfig, spec: tuple[int, int, bool], precision: str,
                   weights: dict[str, torch.Tensor]) -> list[Contender]:
        return []

    def parity(self, reference: nn.Module, weights: dict[str, torch.Tensor], variant: str) -> dict[str, float]:
        return {}

    def versions(self) -> dict[str, str]:
        return {}


# ---------------------------------------------------------------------------------------------------------------
# The library function.


def run_bench(config: BenchConfig, peers: Peers | None = None) -> dict[str, Any]:
    """Build the contenders, time them interleaved, and return the report (also what `--json` writes)."""
    check_config(config)
    peers = peers or Peers()
    if config.threads:
        torch.set_num_threads(config.threads)
    device = torch.device(config.device)
    log = print if config.verbose else (lambda *a, **k: None)
    load_before = _load_average()
    reference = build_reference(config.variant, config.seed)
    weights = {key: value.detach().clone() for key, value in reference.state_dict().items()}
    parity = peers.parity(reference, weights, config.variant)
    if parity:
        log(f"same weights, max |difference| of logits vs bigtransfer: {_format_parity(parity)}")
    peaks = measure_peaks(device, config.precisions, int8=config.onnx)
    results: list[Result] = []
    built: dict[str, Any] = {}
    for precision in config.precisions:
        with _precision(precision, device):
            for workload in config.workloads:
                spec = WORKLOADS[workload]
                contenders = _ours(config, spec, weights, built) + peers.contenders(config, spec, precision, weights)
                contenders = _selected(contenders, config.contenders)
                flops = _flops_per_image(reference, spec)
                log(f"\n{workload} ({precision}): {len(contenders)} contenders, {config.rounds} rounds")
                results += _time_workload(config, workload, precision, spec, contenders, flops, peaks, log)
    _add_ratios(results)
    report = {
        "environment": _environment(config, load_before, peaks, peers.versions()),
        "parity_max_abs_logit_difference": parity,
        "results": [dataclasses.asdict(result) for result in results],
    }
    if config.pipeline:
        log("\nJPEG pipeline")
        report["pipeline"] = _bench_pipeline(reference, built, device, log)
    report["environment"]["load_average_after"] = _load_average()
    return report


def check_config(config: BenchConfig) -> None:
    """Refuse settings the bench cannot measure, before anything is built."""
    unknown = [name for name in config.workloads if name not in WORKLOADS]
    if unknown:
        raise ValueError(f"unknown workload(s) {', '.join(unknown)}; choose from {', '.join(WORKLOADS)}")
    bad = [name for name in config.precisions if name not in PRECISIONS]
    if bad:
        raise ValueError(f"unknown precision(s) {', '.join(bad)}; choose from {', '.join(PRECISIONS)}")
    if config.rounds < 1:
        raise ValueError(f"rounds must be at least 1, got {config.rounds}")
    device = torch.device(config.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise RuntimeError("--device cuda was asked for, but torch sees no CUDA device")
    if device.type == "cpu" and any(p in ("tf32", "fp16") for p in config.precisions):
        raise ValueError("tf32 / fp16 are measured on a GPU only (--device cuda); on a CPU use fp32 or bf16")
    if config.variant not in VARIANTS or config.variant == "tiny":
        raise ValueError(f"unknown variant {config.variant!r}; choose e.g. BiT-S-R50x1")


def build_reference(variant: str, seed: int) -> nn.Module:
    """The variant with seeded weights and a non-trivial head and norms (so parity checks compare something)."""
    torch.manual_seed(seed)
    model = BitForImageClassification(BitConfig.from_variant(variant))
    with torch.no_grad():
        for module in model.modules():
            if isinstance(module, nn.GroupNorm):
                module.weight.uniform_(0.5, 1.5)
                module.bias.uniform_(-0.1, 0.1)
        nn.init.normal_(model.classifier[1].weight, std=0.01)
    return model.eval()


def _format_parity(parity: dict[str, float]) -> str:
    scale = parity["logit_scale"]
    return ", ".join(f"{name} {value:.1e}" for name, value in parity.items() if name != "logit_scale") + f" (logits up to {scale:.2f})"


# ---------------------------------------------------------------------------------------------------------------
# This package's contenders, and the steps every contender is made of.


def _ours(config: BenchConfig, spec: tuple[int, int, bool], weights: dict[str, torch.Tensor],
          built: dict[str, Any]) -> list[Contender]:
    device = torch.device(config.device)

    def model() -> nn.Module:
        ours = BitForImageClassification(BitConfig.from_variant(config.variant))
        ours.load_state_dict(weights)
        return ours.to(device)

    def optimized(compile_: bool):
        def build(spec, precision):
            key = f"optimized-{compile_}-{precision}"
            if key not in built:  # shared across workloads: compiled graphs are cached per input shape
                built[key] = optimize(model(), dtype=REDUCED_PRECISION.get(precision), compile=compile_, inplace=True)
            pixels = bench_pixels(spec, device, channels_last=True)
            return lambda: built[key](pixels)

        return build

    def onnx(spec, precision):
        if "onnx" not in built:
            built["onnx"] = onnx_session(model(), device=device, spinning=False)  # no busy-wait in others' turns
        session = built["onnx"]
        pixels = bench_pixels(spec, torch.device("cpu"), False).numpy()
        name = session.get_inputs()[0].name
        return lambda: session.run(None, {name: pixels})

    def int8(spec, precision):
        if "int8" not in built:  # calibrated on the bench's own pixels: the timing does not depend on their content
            built["int8-directory"] = tempfile.TemporaryDirectory()
            path = Path(built["int8-directory"].name) / "int8.onnx"
            quantize(model(), path, bench_pixels((8, spec[1], False), torch.device("cpu"), False).numpy())
            built["int8"] = onnx_session(path, spinning=False)
        session = built["int8"]
        pixels = bench_pixels(spec, torch.device("cpu"), False).numpy()
        name = session.get_inputs()[0].name
        return lambda: session.run(None, {name: pixels})

    if spec[2]:
        contenders = [
            Contender("bigtransfer", True, training_step(model, device, False)),
            Contender("bigtransfer channels_last", True,
                      training_step(lambda: prepare_for_training(model()), device, True)),
        ]
        if config.compile:
            contenders.append(Contender(
                "bigtransfer channels_last compiled", True,
                training_step(lambda: prepare_for_training(model(), compile=True), device, True),
                eager_form="bigtransfer channels_last"))
        return contenders
    contenders = [
        Contender("bigtransfer", True, inference_step(model, device)),
        Contender("bigtransfer optimize(compile=False)", True, optimized(False)),
    ]
    if config.compile:
        contenders.append(Contender("bigtransfer optimize()", True, optimized(True),
                                    eager_form="bigtransfer optimize(compile=False)"))
    if config.onnx and device.type == "cpu":
        contenders.append(Contender("bigtransfer onnxruntime", True, onnx))
        contenders.append(Contender("bigtransfer onnxruntime int8", True, int8, peak="int8"))
    return contenders


def _selected(contenders: list[Contender], wanted: tuple[str, ...] | None) -> list[Contender]:
    """An exact name selects that contender; any other entry, every name containing it."""
    if not wanted:
        return contenders
    names = {c.name for c in contenders}
    return [c for c in contenders if c.name in wanted or any(part in c.name for part in wanted if part not in names)]


def inference_step(make: Callable[[], nn.Module], device: torch.device, channels_last: bool = False,
                   compiled: str | None = None):
    """A contender's build function: one forward pass under inference_mode and the precision's autocast;
    `compiled` is None, "default" (torch.compile) or "frozen" (torch.compile with inductor weight freezing, as a
    compile option: a context set around the call would not reach a graph dynamo had already compiled)."""
    def build(spec, precision):
        model = make().eval()
        pixels = bench_pixels(spec, device, channels_last)
        call = model
        if compiled is not None:
            call = torch.compile(model, dynamic=False, options={"freezing": True} if compiled == "frozen" else None)
        autocast = REDUCED_PRECISION.get(precision)

        def step():
            with torch.inference_mode(), autocast_for(device, autocast):
                return call(pixels)

        return step

    return build


def training_step(make: Callable[[], nn.Module], device: torch.device, channels_last: bool):
    """A contender's build function: one SGD step (forward, cross-entropy, backward, update); `make` may return
    a compiled model."""
    def build(spec, precision):
        model = make().train()
        batch = spec[0]
        pixels = bench_pixels(spec, device, channels_last)
        labels = torch.randint(0, 1000, (batch,), generator=torch.Generator().manual_seed(2)).to(device)
        optimizer = torch.optim.SGD(model.parameters(), lr=0.003, momentum=0.9)
        autocast = REDUCED_PRECISION.get(precision)

        def step():
            optimizer.zero_grad(set_to_none=True)
            with autocast_for(device, autocast):
                output = model(pixels)
                loss = F.cross_entropy(output if isinstance(output, torch.Tensor) else output.logits, labels)
            loss.backward()
            optimizer.step()
            return loss

        return step

    return build


def bench_pixels(spec: tuple[int, int, bool], device: torch.device, channels_last: bool) -> torch.Tensor:
    batch, size, _ = spec
    pixels = torch.randn(batch, 3, size, size, generator=torch.Generator().manual_seed(0)).to(device)
    return pixels.contiguous(memory_format=torch.channels_last) if channels_last else pixels


@contextmanager
def _precision(precision: str, device: torch.device) -> Iterator[None]:
    """TF32 on for the "tf32" section only (a benchmark setting, restored after)."""
    if device.type != "cuda":
        yield
        return
    saved = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = precision == "tf32"
    try:
        yield
    finally:
        torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = saved


def _time_workload(config, workload, precision, spec, contenders, flops, peaks: dict[str, Peak], log) -> list[Result]:
    batch, _, training = spec
    device = torch.device(config.device)
    steps, setup, failed, graphs = {}, {}, {}, {}
    for contender in contenders:
        start = time.perf_counter()
        try:
            compiled_before = _graphs_compiled()
            step = contender.build(spec, precision)
            for _ in range(2):  # warm-up: compiles, allocator pools, oneDNN primitive caches
                step()
            _sync(device)
            graphs[contender.name] = _graphs_compiled() - compiled_before
            steps[contender.name] = step
        except Exception as error:  # a peer or an optional backend that cannot run here is reported, not fatal
            failed[contender.name] = f"{type(error).__name__}: {error}"
            log(f"  {contender.name}: failed: {failed[contender.name][:200]}")
        setup[contender.name] = time.perf_counter() - start
    iterations = _iterations(steps, device)
    # The machine may be shared. Other processes only ever slow a sample down, and PyTorch's many short parallel
    # regions suffer far more than one long matmul (a busy core stalls every barrier): each sample records the CPU
    # time other processes used while it ran, waits first (within a budget) for the machine to be quiet, and the
    # medians use the quiet samples.
    monitor = _ForeignLoad(wait_budget=config.quiet_wait)
    samples: dict[str, list[tuple[float, bool]]] = {name: [] for name in steps}
    names = list(steps)
    for round_index in range(config.rounds):
        for peak in peaks.values():
            peak.probe()
        order = names[round_index % len(names):] + names[:round_index % len(names)] if names else []
        for name in order:
            monitor.wait_until_quiet()
            _sync(device)
            monitor.start()
            start = time.perf_counter()
            for _ in range(iterations[name]):
                steps[name]()
            _sync(device)
            seconds = (time.perf_counter() - start) / iterations[name]
            samples[name].append((seconds, monitor.quiet()))
        log(f"  round {round_index + 1}: " + ", ".join(
            f"{n} {batch / samples[n][-1][0]:.2f}{'' if samples[n][-1][1] else '*'}" for n in names
        ) + " img/s (* other processes were busy)")
    times = {name: _quiet_times(values) for name, values in samples.items()}
    memory = {name: None if "onnxruntime" in name else _peak_memory_mb(step, device) for name, step in steps.items()}
    if config.profile and times:
        speed = {name: statistics.median(values) for name, values in times.items()}
        ours = [c.name for c in contenders if c.ours and c.name in speed and "onnxruntime" not in c.name]
        peers = [c.name for c in contenders if not c.ours and not c.informational and c.name in speed]
        for name in [min(ours, key=speed.get, default=None), min(peers, key=speed.get, default=None)]:
            if name:
                log(f"\n  where the time goes: {name}, {workload} ({precision})\n" + _profile_table(steps[name], device))
    results = []
    for contender in contenders:
        name = contender.name
        if name in failed:
            results.append(Result(workload, precision, name, contender.ours, contender.informational, 0.0, 0.0, [], None,
                                  0.0, 0.0, setup_seconds=setup[name], error=failed[name]))
            continue
        seconds = statistics.median(times[name])
        images_per_second = batch / seconds
        gflops = flops * images_per_second / 1e9
        peak = contender.peak or precision
        peak_gflops = peaks[peak].gflops if peak in peaks else 0.0
        results.append(Result(
            workload, precision, name, contender.ours, contender.informational, images_per_second, seconds,
            [batch / t for t, _ in samples[name]], memory.get(name), gflops,
            gflops / peak_gflops if peak_gflops else 0.0, peak, setup_seconds=setup[name],
            clean_rounds=sum(quiet for _, quiet in samples[name]), eager_form=contender.eager_form,
            graphs_compiled=graphs[name] if contender.eager_form else None,
        ))
    steps.clear()
    gc.collect()
    return results


def _graphs_compiled() -> int:
    """Graphs torch.compile has compiled in this process so far (0 when nothing was compiled)."""
    if "torch._dynamo" not in sys.modules:  # the compiler's machinery: only looked at once something compiled
        return 0
    from torch._dynamo.utils import counters

    return int(counters["stats"]["unique_graphs"])


FOREIGN_LOAD_LIMIT = 0.1  # a sample is quiet when other processes used under 10 % of the machine's CPU time


class _ForeignLoad:
    """CPU time used by other processes, from /proc/stat and /proc/self/stat (Linux; elsewhere all is quiet)."""

    def __init__(self, wait_budget: float = 0.0):
        self.wait_budget = wait_budget
        self.available = os.path.exists("/proc/stat") and os.path.exists("/proc/self/stat")
        self._start: tuple[int, int] | None = None

    @staticmethod
    def _snapshot() -> tuple[int, int, int]:
        with open("/proc/stat") as handle:
            ticks = [int(value) for value in handle.readline().split()[1:9]]
        with open("/proc/self/stat") as handle:
            fields = handle.read().rsplit(")", 1)[1].split()
        own = int(fields[11]) + int(fields[12])  # utime + stime of this process (all its threads)
        return sum(ticks) - ticks[3] - ticks[4], own, sum(ticks)  # busy, own, total (idle and iowait excluded)

    def start(self) -> None:
        self._start = self._snapshot() if self.available else None

    def fraction(self) -> float:
        if self._start is None:
            return 0.0
        busy, own, total = self._snapshot()
        elapsed = total - self._start[2]
        return max(0.0, (busy - self._start[0]) - (own - self._start[1])) / elapsed if elapsed > 0 else 0.0

    def quiet(self) -> bool:
        return self.fraction() < FOREIGN_LOAD_LIMIT

    def wait_until_quiet(self, probe_seconds: float = 0.5) -> None:
        """Sleep while others are busy, up to what is left of the wait budget (then measure anyway)."""
        while self.available and self.wait_budget > 0:
            self.start()
            time.sleep(probe_seconds)
            if self.quiet():
                return
            self.wait_budget -= probe_seconds


def _quiet_times(samples: list[tuple[float, bool]]) -> list[float]:
    """The quiet samples' times, or all of them when fewer than two were quiet."""
    quiet = [seconds for seconds, ok in samples if ok]
    return quiet if len(quiet) >= 2 else [seconds for seconds, _ in samples]


def _iterations(steps: dict[str, Callable[[], Any]], device: torch.device) -> dict[str, int]:
    """Repeat fast steps so that each timed sample lasts about half a second on CPU, a quarter on GPU."""
    target = 0.25 if device.type == "cuda" else 0.5
    counts = {}
    for name, step in steps.items():
        _sync(device)
        start = time.perf_counter()
        step()
        _sync(device)
        counts[name] = max(1, min(50, int(target / max(time.perf_counter() - start, 1e-4))))
    return counts


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _peak_memory_mb(step: Callable[[], Any], device: torch.device) -> float | None:
    """Peak memory one step allocates on top of what is already held (activations, workspaces, temporaries).

    CUDA: the caching allocator's peak. CPU: torch's allocations and frees replayed from the profiler's memory
    events (the process's resident set says nothing once malloc keeps freed blocks). Memory that other
    runtimes allocate themselves (onnxruntime's arena) is not seen: None."""
    gc.collect()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        before = torch.cuda.memory_allocated(device)
        torch.cuda.reset_peak_memory_stats(device)
        step()
        torch.cuda.synchronize(device)
        return (torch.cuda.max_memory_allocated(device) - before) / 2**20
    from torch.profiler import ProfilerActivity, profile

    with _quiet_stderr(), profile(activities=[ProfilerActivity.CPU], profile_memory=True) as profiler:
        step()
    events = sorted(
        (event.start_ns(), event.nbytes()) for event in profiler.profiler.kineto_results.events()
        if event.name() == "[memory]"
    )
    if not events:
        return None
    held = peak = 0
    for _, nbytes in events:
        held += nbytes
        peak = max(peak, held)
    return peak / 2**20


def _profile_table(step: Callable[[], Any], device: torch.device, rows: int = 15) -> str:
    """Top operators by self time for one step (torch.profiler); generated kernels appear by their names."""
    from torch.profiler import ProfilerActivity, profile

    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    with _quiet_stderr(), profile(activities=activities) as profiler:
        step()
        _sync(device)
    sort = "self_cuda_time_total" if device.type == "cuda" else "self_cpu_time_total"
    return profiler.key_averages().table(sort_by=sort, row_limit=rows, max_name_column_width=60)


@contextmanager
def _quiet_stderr() -> Iterator[None]:
    """Silence the profiler's C++ start/stop lines (written straight to file descriptor 2)."""
    try:
        saved = os.dup(2)
    except OSError:
        yield
        return
    try:
        with open(os.devnull, "w") as devnull:
            os.dup2(devnull.fileno(), 2)
            yield
    finally:
        os.dup2(saved, 2)
        os.close(saved)


def _flops_per_image(model: nn.Module, spec: tuple[int, int, bool]) -> float:
    """Convolution and matmul FLOPs (multiply-adds counted twice) per image, forward (and backward)."""
    from torch.utils.flop_counter import FlopCounterMode

    batch, size, training = spec
    model = copy.deepcopy(model).train(training)
    pixels = torch.randn(1, 3, size, size)
    counter = FlopCounterMode(display=False)
    with counter:
        if training:
            model(pixels).logits.sum().backward()
        else:
            with torch.no_grad():
                model(pixels)
    return float(counter.get_total_flops())


def _add_ratios(results: list[Result]) -> None:
    """Each result's ratio to the best peer of its workload and precision (without peers: to this package's
    default eager model)."""
    for key in {(r.workload, r.precision) for r in results}:
        group = [r for r in results if (r.workload, r.precision) == key and not r.error]
        peers = [r.images_per_second for r in group if not r.ours and not r.informational]
        reference = max(peers) if peers else next((r.images_per_second for r in group if r.contender == "bigtransfer"), None)
        speed = {r.contender: r.images_per_second for r in group}
        for result in group:
            result.ratio_to_best_peer = result.images_per_second / reference if reference else None
            if result.eager_form in speed and speed[result.eager_form]:
                result.ratio_to_eager_form = result.images_per_second / speed[result.eager_form]



# ---------------------------------------------------------------------------------------------------------------
# JPEG -> prediction, end to end.


def _bench_pipeline(reference: nn.Module, built: dict[str, Any], device: torch.device, log) -> dict[str, Any]:
    """Images/s from JPEG files to top-5, the plain way and through `predict_images` with the fast model."""
    processor = BitImageProcessor()
    report: dict[str, Any] = {}
    with tempfile.TemporaryDirectory() as directory:
        paths = _write_jpegs(Path(directory), count=32)
        for name, decode in (("full", lambda p: load_image(p)), ("reduced", lambda p: decode_image(p, 224))):
            start = time.perf_counter()
            for path in paths:
                processor(decode(path), return_tensors="pt")
            report[f"decode_and_preprocess_{name}_images_per_second"] = len(paths) / (time.perf_counter() - start)
        model = reference.to(device).eval()
        start = time.perf_counter()
        for index in range(0, len(paths), 16):
            batch = processor([load_image(p) for p in paths[index:index + 16]], return_tensors="pt")["pixel_values"]
            with torch.no_grad():
                model(batch.to(device)).logits.softmax(-1).topk(5)
        report["plain_images_per_second"] = len(paths) / (time.perf_counter() - start)
        fast = built.get("optimized-True-fp32") or built.get("optimized-False-fp32") or optimize(reference, compile=False)
        predict_images(fast, paths[:16], processor, batch_size=16)  # warm-up (a compile if not yet done)
        result = predict_images(fast, paths, processor, batch_size=16)
        report["fast_images_per_second"] = result.images_per_second
        report["fast_model_compiled"] = getattr(fast, "is_compiled", False)
        report["num_images"] = len(paths)
    log("  " + ", ".join(f"{key} {value:.2f}" if isinstance(value, float) else f"{key} {value}" for key, value in report.items()))
    return report


def _write_jpegs(directory: Path, count: int) -> list[Path]:
    """1280x960 JPEGs (a web-sized photo): scikit-image's sample photos when installed, else synthetic ones."""
    photos = []
    try:
        from skimage import data  # a dev dependency: real photos when it is there

        photos = [np.asarray(getattr(data, name)()) for name in ("astronaut", "chelsea", "coffee", "rocket")]
    except Exception:
        pass
    rng = np.random.default_rng(0)
    paths = []
    for index in range(count):
        if photos:
            photo = photos[index % len(photos)]
            image = PIL.Image.fromarray(photo).resize((1280, 960), PIL.Image.Resampling.BICUBIC)
        else:
            y, x = np.mgrid[0:960, 0:1280]
            base = np.stack([x * 0.2, y * 0.25, (x + y) * 0.1], -1) + rng.normal(0, 8, (960, 1280, 3))
            image = PIL.Image.fromarray(np.clip(base, 0, 255).astype(np.uint8))
        path = directory / f"{index:03d}.jpg"
        image.save(path, quality=90)
        paths.append(path)
    return paths



# ---------------------------------------------------------------------------------------------------------------
# Report.


def _environment(config: BenchConfig, load_before, peaks: dict[str, Peak], versions: dict[str, str]) -> dict[str, Any]:
    device = torch.device(config.device)
    cpu = cpu_description()
    return {
        "variant": config.variant,
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else _cpu_name(cpu),
        "cpu": cpu,
        "threads": torch.get_num_threads(),
        "rounds": config.rounds,
        "torch": torch.__version__,
        **versions,
        "python": platform.python_version(),
        "peak_gflops": {name: peak.gflops for name, peak in peaks.items()},
        "peak_kernels": {name: peak.kernel for name, peak in peaks.items()},
        "load_average_before": load_before,
    }


def _cpu_name(cpu: dict[str, Any]) -> str:
    return (f"{cpu['model']} ({cpu['cpus']} usable of {os.cpu_count()} logical cores; "
            f"{', '.join(cpu['flags']) or 'no AVX2'})")


def _compiled_notes(results: list[dict[str, Any]]) -> list[str]:
    """A line for each compiled contender that compiled no graph of its own or ran slower than its eager form."""
    notes = []
    for result in results:
        where = f"{result['contender']} ({result['workload']}, {result['precision']})"
        if result.get("graphs_compiled") == 0:
            notes.append(f"note: {where} compiled no graph of its own: it ran one compiled for another contender")
        ratio = result.get("ratio_to_eager_form")
        if ratio is not None and ratio < 1.0:
            notes.append(f"note: {where} ran at {ratio:.2f}x its eager form, {result['eager_form']}: compiling "
                         "did not pay on this machine")
    return notes


def _load_average() -> list[float] | None:
    try:
        return [round(value, 2) for value in os.getloadavg()]
    except OSError:
        return None


def format_report(report: dict[str, Any]) -> str:
    env = report["environment"]
    lines = [
        f"{env['variant']} on {env['device']}, {env['threads']} threads; torch {env['torch']}"
        + "".join(f", {name} {env[name]}" for name in ("transformers", "timm") if name in env)
        + f"; median of {env['rounds']} interleaved rounds",
        "measured peaks " + ", ".join(f"{p} {g:.0f}" for p, g in env["peak_gflops"].items())
        + " GFLOP/s (" + "; ".join(env.get("peak_kernels", {}).values()) + "); load average "
        f"{env['load_average_before']} -> {env.get('load_average_after')}",
        "",
        f"{'workload':<10} {'prec':<5} {'contender':<38} {'img/s':>7} {'peak MB':>8} {'GFLOP/s':>8} "
        f"{'%peak':>6} {'vs ' + ('best peer' if any(not r['ours'] for r in report['results']) else 'eager'):>12} {'clean':>6}",
    ]
    for result in report["results"]:
        name = result["contender"] + (" *" if result["informational"] else "")
        if result["error"]:
            lines.append(f"{result['workload']:<10} {result['precision']:<5} {name:<38} failed: {result['error'][:60]}")
            continue
        memory = f"{result['peak_memory_mb']:.0f}" if result["peak_memory_mb"] is not None else "-"
        ratio = f"{result['ratio_to_best_peer']:.2f}x" if result["ratio_to_best_peer"] else "-"
        lines.append(
            f"{result['workload']:<10} {result['precision']:<5} {name:<38} {result['images_per_second']:>7.2f} "
            f"{memory:>8} {result['gflops']:>8.1f} {100 * result['peak_fraction']:>5.0f}% {ratio:>12} "
            f"{result.get('clean_rounds', 0):>3}/{len(result['rounds'])}"
        )
    if any(result["informational"] for result in report["results"]):
        lines.append("* shown, not counted as a peer")
    lines.append("%peak: of the measured peak of the precision's kernels (int8 contenders: of the int8 peak)")
    lines += _compiled_notes(report["results"])
    lines.append(f"clean: rounds in which other processes used < {FOREIGN_LOAD_LIMIT:.0%} of the CPU; medians use "
                 "those (all rounds when fewer than two)")
    if "pipeline" in report:
        pipe = report["pipeline"]
        lines.append(
            f"JPEG -> top-5, {pipe['num_images']} 1280x960 files, batch 16: plain (full decode, processor, eager "
            f"model) {pipe['plain_images_per_second']:.2f} img/s; predict_images (reduced decode, optimize()"
            f"{'' if pipe['fast_model_compiled'] else ' without compile'}) {pipe['fast_images_per_second']:.2f} img/s; "
            f"decode+preprocess alone {pipe['decode_and_preprocess_full_images_per_second']:.0f} -> "
            f"{pipe['decode_and_preprocess_reduced_images_per_second']:.0f} img/s"
        )
    return "\n".join(lines)
