"""Speed of this package against transformers and timm on the same weights, in one process (`bigtransfer bench`).

What it measures: for each workload (batch-1 and batch-16 inference at 224 px, a batch-16 training step at 128 px)
and precision, images/s, peak memory, GFLOP/s and the fraction of a measured matmul peak, for several contenders:
bigtransfer eager, `optimize()` (with and without torch.compile) and ONNX Runtime, against transformers and timm,
each also channels_last and (timm) compiled. Optionally, where the time goes (torch.profiler) and the end-to-end
JPEG-to-top-5 pipeline, the plain way and through `predict_images`.

How: every contender gets the same R50x1-shaped weights (checked: the logits agree), the same inputs and the same
optimizer. After warm-up, contenders are timed interleaved (A B C, B C A, ...), each sample repeating fast steps
to last about half a second; the median of the rounds is reported, with each result's ratio to the best peer.
On a shared machine each sample first waits (within a budget) for other processes to go quiet, and samples
during which they were busy anyway are marked and left out of the medians. transformers and timm are dev
dependencies: they are imported here only, lazily.

Benchmarks are never timed tests: tests check this module's pure parts (key mapping, ratios, the report table,
config validation); the timing itself is run by hand and reports speed.
"""

from __future__ import annotations

import copy
import dataclasses
import gc
import os
import platform
import statistics
import tempfile
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager, nullcontext
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from .inference import REDUCED_PRECISION, autocast_for, optimize
from .train import prepare_for_training

# name -> (batch, image size, training step?)
WORKLOADS: dict[str, tuple[int, int, bool]] = {
    "infer-b1": (1, 224, False),
    "infer-b16": (16, 224, False),
    "train-b16": (16, 128, True),
}
PRECISIONS = ("fp32", "tf32", "bf16", "fp16")
TIMM_NAMES = {"R50x1": "resnetv2_50x1_bit", "R50x3": "resnetv2_50x3_bit", "R101x1": "resnetv2_101x1_bit",
              "R101x3": "resnetv2_101x3_bit", "R152x2": "resnetv2_152x2_bit", "R152x4": "resnetv2_152x4_bit"}


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
    build: Callable[[tuple[int, int, bool], str], Callable[[], Any]]
    informational: bool = False  # shown, but not counted as a peer (not what users run by default)


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
    matmul_fraction: float
    ratio_to_best_peer: float | None = None
    setup_seconds: float = 0.0
    clean_rounds: int = 0  # rounds in which no other process was busy (the median uses those)
    error: str | None = None


# ---------------------------------------------------------------------------------------------------------------
# The library function.


def run_bench(config: BenchConfig) -> dict[str, Any]:
    """Build the contenders, time them interleaved, and return the report (also what `--json` writes)."""
    _check_config(config)
    transformers, timm = _import_peers()
    if config.threads:
        torch.set_num_threads(config.threads)
    device = torch.device(config.device)
    log = print if config.verbose else (lambda *a, **k: None)
    load_before = _load_average()
    reference = _build_ours(config.variant, config.seed)
    weights = {key: value.detach().clone() for key, value in reference.state_dict().items()}
    parity = _check_parity(reference, weights, transformers, timm, config.variant)
    log(f"same weights, max |difference| of logits vs bigtransfer: {_format_parity(parity)}")
    matmul_peaks: dict[str, _MatmulPeak] = {}
    results: list[Result] = []
    built: dict[str, Any] = {}
    for precision in config.precisions:
        matmul_peak = matmul_peaks[precision] = _MatmulPeak(device, REDUCED_PRECISION.get(precision, torch.float32))
        with _precision(precision, device):
            for workload in config.workloads:
                spec = WORKLOADS[workload]
                contenders = _contenders(config, spec, precision, weights, transformers, timm, built)
                flops = _flops_per_image(reference, spec)
                log(f"\n{workload} ({precision}): {len(contenders)} contenders, {config.rounds} rounds")
                results += _time_workload(config, workload, precision, spec, contenders, flops, matmul_peak, log)
    _add_ratios(results)
    report = {
        "environment": _environment(config, load_before, matmul_peaks),
        "parity_max_abs_logit_difference": parity,
        "results": [dataclasses.asdict(result) for result in results],
    }
    if config.pipeline:
        log("\nJPEG pipeline")
        report["pipeline"] = _bench_pipeline(reference, built, device, log)
    report["environment"]["load_average_after"] = _load_average()
    return report


def _check_config(config: BenchConfig) -> None:
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
    from .config import VARIANTS

    if config.variant not in VARIANTS or config.variant == "tiny":
        raise ValueError(f"unknown variant {config.variant!r}; choose e.g. BiT-S-R50x1")


def _import_peers():
    missing = []
    try:
        import transformers
    except ImportError:
        transformers, missing = None, missing + ["transformers"]
    try:
        import timm
    except ImportError:
        timm, missing = None, missing + ["timm"]
    if missing:
        raise ImportError(
            f"bigtransfer bench compares against {' and '.join(missing)}, which {'is' if len(missing) == 1 else 'are'}"
            " not installed: pip install 'bigtransfer[dev]' (or pip install transformers timm torchvision)"
        )
    return transformers, timm


# ---------------------------------------------------------------------------------------------------------------
# The same weights in the three implementations.


def _build_ours(variant: str, seed: int) -> nn.Module:
    from . import BitConfig, BitForImageClassification

    torch.manual_seed(seed)
    model = BitForImageClassification(BitConfig.from_variant(variant))
    with torch.no_grad():  # a non-trivial head and norms, so the parity check compares something
        for module in model.modules():
            if isinstance(module, nn.GroupNorm):
                module.weight.uniform_(0.5, 1.5)
                module.bias.uniform_(-0.1, 0.1)
        nn.init.normal_(model.classifier[1].weight, std=0.01)
    return model.eval()


def _build_transformers(transformers, weights: dict[str, torch.Tensor], variant: str) -> nn.Module:
    from .config import BitConfig

    ours = BitConfig.from_variant(variant)
    config = transformers.BitConfig(
        embedding_size=ours.embedding_size, hidden_sizes=list(ours.hidden_sizes), depths=list(ours.depths),
        width_factor=ours.width_factor, layer_type="preactivation", global_padding=None, num_groups=ours.num_groups,
        num_labels=ours.num_labels,
    )
    model = transformers.BitForImageClassification(config)
    model.load_state_dict(weights, strict=True)
    return model.eval()


def _build_timm(timm, weights: dict[str, torch.Tensor], variant: str) -> nn.Module:
    from .config import BitConfig

    name = TIMM_NAMES[variant.split("-", 2)[-1]]
    model = timm.create_model(name, pretrained=False, num_classes=BitConfig.from_variant(variant).num_labels)
    model.load_state_dict(_timm_state_dict(weights), strict=True)
    return model.eval()


def _timm_state_dict(weights: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """transformers / bigtransfer key names -> timm's (a pure rename, plus the 1x1-conv head shape)."""
    state = {}
    for key, value in weights.items():
        if key == "classifier.1.weight":
            state["head.fc.weight"] = value[:, :, None, None]
            continue
        key = key.replace("classifier.1.", "head.fc.").replace("bit.embedder.convolution.", "stem.conv.")
        key = key.replace("bit.encoder.stages.", "stages.").replace(".layers.", ".blocks.").replace("bit.norm.", "norm.")
        state[key] = value
    return state


def _logits(output: Any) -> torch.Tensor:
    return output if isinstance(output, torch.Tensor) else output.logits


def _check_parity(reference, weights, transformers, timm, variant) -> dict[str, float]:
    pixels = torch.randn(2, 3, 96, 96, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        expected = reference(pixels).logits
        peers = {"transformers": _build_transformers(transformers, weights, variant), "timm": _build_timm(timm, weights, variant)}
        differences = {name: (_logits(model(pixels)) - expected).abs().max().item() for name, model in peers.items()}
    differences["logit_scale"] = expected.abs().max().item()
    return differences


def _format_parity(parity: dict[str, float]) -> str:
    scale = parity["logit_scale"]
    return ", ".join(f"{name} {value:.1e}" for name, value in parity.items() if name != "logit_scale") + f" (logits up to {scale:.2f})"


# ---------------------------------------------------------------------------------------------------------------
# Contenders.


def _contenders(config, spec, precision, weights, transformers, timm, built) -> list[Contender]:
    _, _, training = spec
    device = torch.device(config.device)
    autocast = REDUCED_PRECISION.get(precision)

    def peer_model(kind: str, channels_last: bool) -> nn.Module:
        model = (_build_transformers(transformers, weights, config.variant) if kind == "transformers"
                 else _build_timm(timm, weights, config.variant))
        model = model.to(device)
        return model.to(memory_format=torch.channels_last) if channels_last else model

    def ours_model() -> nn.Module:
        model = _build_ours(config.variant, config.seed)
        model.load_state_dict(weights)
        return model.to(device)

    def inference(make: Callable[[], nn.Module], channels_last: bool = False, compiled: str | None = None):
        def build(spec, precision):
            model = make().eval()
            batch, size, _ = spec
            pixels = _pixels(batch, size, device, channels_last)
            call = model
            if compiled is not None:
                call = torch.compile(model, dynamic=False)
            freezing = _inductor_freezing if compiled == "frozen" else nullcontext

            def step():
                with torch.inference_mode(), autocast_for(device, autocast), freezing():
                    return call(pixels)

            return step

        return build

    def ours_optimized(compile_: bool):
        def build(spec, precision):
            key = f"optimized-{compile_}-{precision}"
            if key not in built:  # shared across workloads: compiled graphs are cached per input shape
                built[key] = optimize(ours_model(), dtype=autocast, compile=compile_, inplace=True)
            model = built[key]
            batch, size, _ = spec
            pixels = _pixels(batch, size, device, channels_last=True)
            return lambda: model(pixels)

        return build

    def ours_onnx(spec, precision):
        from .export import onnx_session

        if "onnx" not in built:
            built["onnx"] = onnx_session(ours_model(), device=device, spinning=False)  # no busy-wait in others' turns
        session = built["onnx"]
        batch, size, _ = spec
        pixels = _pixels(batch, size, torch.device("cpu"), False).numpy()
        name = session.get_inputs()[0].name
        return lambda: session.run(None, {name: pixels})

    def training_step(make: Callable[[], nn.Module], channels_last: bool, ours: bool = False):
        def build(spec, precision):
            model = make().train()
            if ours and channels_last:
                prepare_for_training(model)
            elif channels_last:
                model = model.to(memory_format=torch.channels_last)
            batch, size, _ = spec
            pixels = _pixels(batch, size, device, channels_last)
            labels = torch.randint(0, 1000, (batch,), generator=torch.Generator().manual_seed(2)).to(device)
            optimizer = torch.optim.SGD(model.parameters(), lr=0.003, momentum=0.9)

            def step():
                optimizer.zero_grad(set_to_none=True)
                with autocast_for(device, autocast):
                    loss = F.cross_entropy(_logits(model(pixels)), labels)
                loss.backward()
                optimizer.step()
                return loss

            return step

        return build

    if training:
        contenders = [
            Contender("bigtransfer", True, training_step(ours_model, False, ours=True)),
            Contender("bigtransfer channels_last", True, training_step(ours_model, True, ours=True)),
            Contender("transformers", False, training_step(lambda: peer_model("transformers", False), False)),
            Contender("transformers channels_last", False, training_step(lambda: peer_model("transformers", True), True)),
            Contender("timm", False, training_step(lambda: peer_model("timm", False), False)),
            Contender("timm channels_last", False, training_step(lambda: peer_model("timm", True), True)),
        ]
    else:
        contenders = [
            Contender("bigtransfer", True, inference(ours_model)),
            Contender("bigtransfer optimize(compile=False)", True, ours_optimized(False)),
            Contender("transformers", False, inference(lambda: peer_model("transformers", False))),
            Contender("transformers channels_last", False,
                      inference(lambda: peer_model("transformers", True), channels_last=True)),
            Contender("timm", False, inference(lambda: peer_model("timm", False))),
            Contender("timm channels_last", False, inference(lambda: peer_model("timm", True), channels_last=True)),
        ]
        if config.compile:
            contenders += [
                Contender("bigtransfer optimize()", True, ours_optimized(True)),
                Contender("timm channels_last compiled", False,
                          inference(lambda: peer_model("timm", True), channels_last=True, compiled="default")),
                Contender("timm channels_last compiled+freezing", False,
                          inference(lambda: peer_model("timm", True), channels_last=True, compiled="frozen"),
                          informational=True),
            ]
        if config.onnx and precision == "fp32" and device.type == "cpu":
            contenders.append(Contender("bigtransfer onnxruntime", True, ours_onnx))
    if config.contenders:  # an exact name selects that contender; any other entry, every name containing it
        names = {c.name for c in contenders}
        contenders = [c for c in contenders if c.name in config.contenders
                      or any(part in c.name for part in config.contenders if part not in names)]
    return contenders


def _pixels(batch: int, size: int, device: torch.device, channels_last: bool) -> torch.Tensor:
    pixels = torch.randn(batch, 3, size, size, generator=torch.Generator().manual_seed(0)).to(device)
    return pixels.contiguous(memory_format=torch.channels_last) if channels_last else pixels


@contextmanager
def _inductor_freezing() -> Iterator[None]:
    import torch._inductor.config as inductor_config

    with inductor_config.patch(freezing=True):
        yield


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


# ---------------------------------------------------------------------------------------------------------------
# Timing.


def _time_workload(config, workload, precision, spec, contenders, flops, matmul_peak, log) -> list[Result]:
    batch, _, training = spec
    device = torch.device(config.device)
    steps, setup, failed = {}, {}, {}
    for contender in contenders:
        start = time.perf_counter()
        try:
            step = contender.build(spec, precision)
            for _ in range(2):  # warm-up: compiles, allocator pools, oneDNN primitive caches
                step()
            _sync(device)
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
        matmul_peak.probe()
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
        results.append(Result(
            workload, precision, name, contender.ours, contender.informational, images_per_second, seconds,
            [batch / t for t, _ in samples[name]], memory.get(name), gflops,
            gflops / matmul_peak.gflops if matmul_peak.gflops else 0.0, setup_seconds=setup[name],
            clean_rounds=sum(quiet for _, quiet in samples[name]),
        ))
    steps.clear()
    gc.collect()
    return results


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


class _MatmulPeak:
    """A square matmul in the working dtype (2048 on CPU, 8192 on GPU), timed once per round: the reference
    "peak" for the fraction column."""

    def __init__(self, device: torch.device, dtype: torch.dtype = torch.float32):
        size = 8192 if device.type == "cuda" else 2048
        generator = torch.Generator().manual_seed(3)
        self.a = torch.randn(size, size, generator=generator).to(device, dtype)
        self.b = torch.randn(size, size, generator=generator).to(device, dtype)
        self.device, self.samples = device, []
        torch.mm(self.a, self.b)

    def probe(self) -> float:
        _sync(self.device)
        start = time.perf_counter()
        torch.mm(self.a, self.b)
        _sync(self.device)
        self.samples.append(2 * self.a.shape[0] ** 3 / (time.perf_counter() - start) / 1e9)
        return self.samples[-1]

    @property
    def best(self) -> float:
        return max(self.samples, default=0.0)

    @property
    def gflops(self) -> float:
        """Median of the probes within 15 % of the fastest (a busy machine only slows a probe down)."""
        clean = [value for value in self.samples if value >= 0.85 * self.best]
        return statistics.median(clean) if clean else 0.0


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
    for key in {(r.workload, r.precision) for r in results}:
        group = [r for r in results if (r.workload, r.precision) == key and not r.error]
        peers = [r.images_per_second for r in group if not r.ours and not r.informational]
        if peers:
            for result in group:
                result.ratio_to_best_peer = result.images_per_second / max(peers)


# ---------------------------------------------------------------------------------------------------------------
# JPEG -> prediction, end to end.


def _bench_pipeline(reference: nn.Module, built: dict[str, Any], device: torch.device, log) -> dict[str, Any]:
    """Images/s from JPEG files to top-5, the plain way and through `predict_images` with the fast model."""
    from .images import decode_image, load_image
    from .inference import predict_images
    from .processing import BitImageProcessor

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
    import numpy as np
    import PIL.Image

    photos = []
    try:
        from skimage import data

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


def _environment(config: BenchConfig, load_before, matmul_peaks: dict[str, _MatmulPeak]) -> dict[str, Any]:
    import timm
    import transformers

    device = torch.device(config.device)
    return {
        "variant": config.variant,
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else _cpu_name(),
        "threads": torch.get_num_threads(),
        "rounds": config.rounds,
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "timm": timm.__version__,
        "python": platform.python_version(),
        "matmul_peak_gflops": {precision: peak.gflops for precision, peak in matmul_peaks.items()},
        "matmul_size": next(iter(matmul_peaks.values())).a.shape[0] if matmul_peaks else None,
        "load_average_before": load_before,
    }


def _cpu_name() -> str:
    try:
        with open("/proc/cpuinfo") as handle:
            for line in handle:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip() + f" ({os.cpu_count()} logical cores)"
    except OSError:
        pass
    return platform.processor() or "cpu"


def _load_average() -> list[float] | None:
    try:
        return [round(value, 2) for value in os.getloadavg()]
    except OSError:
        return None


def format_report(report: dict[str, Any]) -> str:
    env = report["environment"]
    lines = [
        f"{env['variant']} on {env['device']}, {env['threads']} threads; torch {env['torch']}, transformers "
        f"{env['transformers']}, timm {env['timm']}; median of {env['rounds']} interleaved rounds",
        "matmul peak " + ", ".join(f"{p} {g:.1f}" for p, g in env["matmul_peak_gflops"].items())
        + f" GFLOP/s ({env.get('matmul_size')}x{env.get('matmul_size')}); load average "
        f"{env['load_average_before']} -> {env.get('load_average_after')}",
        "",
        f"{'workload':<10} {'prec':<5} {'contender':<38} {'img/s':>7} {'peak MB':>8} {'GFLOP/s':>8} "
        f"{'%peak':>6} {'vs best peer':>12} {'clean':>6}",
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
            f"{memory:>8} {result['gflops']:>8.1f} {100 * result['matmul_fraction']:>5.0f}% {ratio:>12} "
            f"{result.get('clean_rounds', 0):>3}/{len(result['rounds'])}"
        )
    lines.append("* not counted as a peer: timm with inductor freezing is this package's technique applied to timm")
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
