"""The full bench: `bigtransfer.bench`'s timing core and this package's contenders, plus transformers and timm
(`peers.py`), ONNX Runtime in fp32 and int8, the machine's measured peaks (`peaks.py`), peak memory and profiles
from each contender's worker, the JPEG-to-top-5 pipeline, and a JSON report that records the machine.

What it measures: for each workload (batch-1 and batch-16 inference at 224 px, a batch-16 training step at 128 px)
and precision, images/s (median of interleaved rounds, each contender in its own process), the ratio to the best
peer, peak memory per step, GFLOP/s and the fraction of the peak of the kernels that run it (oneDNN convolutions
in fp32 / bf16, ONNX Runtime's QLinearConv for int8). Frozen contenders are verified frozen by their workers.
Tests never time anything; bench_models.py and gpu_check.sh run this.
"""

from __future__ import annotations

import dataclasses
import os
import platform
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
import PIL.Image
import torch
from peaks import measure_peaks
from peers import parity, peer_contenders, versions

from bigtransfer import BitImageProcessor, optimize, predict_images, quantize
from bigtransfer.bench import (
    WORKLOADS,
    BenchConfig,
    Contender,
    check_config,
    pixels,
    reference_model,
    run_bench,
)
from bigtransfer.export import onnx_session
from bigtransfer.images import decode_image, load_image
from bigtransfer.machine import cpu_description


@dataclasses.dataclass
class Extras:
    """What the harness adds to `BenchConfig`'s run."""

    peers: bool = True
    onnx: bool = True  # ONNX Runtime fp32 and int8 (CPU, fp32 sections)
    pipeline: bool = True
    profile: bool = False  # torch.profiler's top operators for each contender (printed for the best ones)


def onnx_runtime(int8: bool, workload: str, precision: str, variant: str, device: str):
    """A worker's factory: this package's model exported to ONNX (`int8`: quantized by `bigtransfer.quantize`,
    calibrated on the bench's own pixels: the timing does not depend on their content), run by ONNX Runtime."""
    directory = tempfile.TemporaryDirectory()
    path = Path(directory.name) / "model.onnx"
    if int8:
        quantize(reference_model(variant), path, pixels("infer-b16", "cpu", False)[:8].numpy())
    session = onnx_session(path if int8 else reference_model(variant), spinning=False)
    x, name = pixels(workload, "cpu", False).numpy(), session.get_inputs()[0].name
    return lambda: (directory, session.run(None, {name: x}))[1]  # the closure keeps the directory alive


def peak_memory_mb(step) -> float | None:
    """Memory one step allocates on top of what is held: CUDA's allocator peak, or on CPU torch's allocations
    replayed from the profiler's memory events (None for runtimes that allocate on their own, as ONNX Runtime)."""
    if torch.cuda.is_initialized():
        torch.cuda.synchronize()
        before = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
        step()
        torch.cuda.synchronize()
        return (torch.cuda.max_memory_allocated() - before) / 2**20
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as profiler:
        step()
    events = sorted((e.start_ns(), e.nbytes()) for e in profiler.profiler.kineto_results.events() if e.name() == "[memory]")
    held = peak = 0
    for _, nbytes in events:
        held += nbytes
        peak = max(peak, held)
    return peak / 2**20 if events else None


def profile_table(step, rows: int = 15) -> str:
    """Top operators by self time for one step (torch.profiler); generated kernels appear by their names."""
    from torch.profiler import ProfilerActivity, profile

    cuda = torch.cuda.is_initialized()
    with profile(activities=[ProfilerActivity.CPU] + [ProfilerActivity.CUDA] * cuda) as profiler:
        step()
        if cuda:
            torch.cuda.synchronize()
    return profiler.key_averages().table(sort_by="self_cuda_time_total" if cuda else "self_cpu_time_total",
                                         row_limit=rows, max_name_column_width=60)


def flops_per_image(variant: str, workload: str) -> float:
    """Convolution and matmul FLOPs (multiply-adds counted twice) per image, forward (and backward)."""
    from torch.utils.flop_counter import FlopCounterMode

    _, size, training = WORKLOADS[workload]
    model = reference_model(variant).train(training)
    counter = FlopCounterMode(display=False)
    with counter, torch.set_grad_enabled(training):
        output = model(torch.randn(1, 3, size, size)).logits
        if training:
            output.sum().backward()
    return float(counter.get_total_flops())


def run(config: BenchConfig, extras: Extras, log=print) -> dict[str, Any]:
    """Time everything `config` and `extras` ask for; the report (also what --json writes)."""
    check_config(config)  # before the peaks and the peers are built
    if config.threads:
        torch.set_num_threads(config.threads)  # the peaks run in this process
    device = torch.device(config.device)
    load_before = _load_average()
    report: dict[str, Any] = {"parity_max_abs_logit_difference": parity(config.variant) if extras.peers else {}}
    peaks = measure_peaks(device, config.precisions, int8=extras.onnx)

    def contenders(workload: str, precision: str) -> list[Contender]:
        common = dict(workload=workload, precision=precision, variant=config.variant, device=config.device)
        extra = peer_contenders(config, workload, precision) if extras.peers else []
        if extras.onnx and device.type == "cpu" and precision == "fp32" and not WORKLOADS[workload][2]:
            extra += [Contender(f"bigtransfer onnxruntime{' int8' * int8}", onnx_runtime, dict(common, int8=int8))
                      for int8 in (False, True)]
        return extra

    calls = {"peak_memory_mb": peak_memory_mb} | ({"profile": profile_table} if extras.profile else {})
    rows = run_bench(config, contenders, log=log, calls=calls,
                     between_rounds=lambda: [peak.probe() for peak in peaks.values()])
    flops = {workload: flops_per_image(config.variant, workload) for workload in config.workloads}
    for row in rows:
        if not row["error"]:
            peak = peaks.get("int8" if "int8" in row["contender"] else row["precision"])
            row["gflops"] = flops[row["workload"]] * row["images_per_second"] / 1e9
            row["peak_fraction"] = row["gflops"] / peak.gflops if peak and peak.gflops else None
    report["results"] = rows
    report["environment"] = environment(config, peaks, load_before)
    if extras.pipeline:
        report["pipeline"] = pipeline(config.variant, device)
    report["environment"]["load_average_after"] = _load_average()
    return report


def environment(config: BenchConfig, peaks: dict, load_before) -> dict[str, Any]:
    """The machine and software a report was measured on."""
    device = torch.device(config.device)
    cpu = cpu_description()
    try:
        peer_versions = versions()
    except ImportError:
        peer_versions = {}
    return {
        "variant": config.variant, "rounds": config.rounds, "threads": config.threads or torch.get_num_threads(),
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else
        f"{cpu['model']} ({cpu['cpus']} usable of {os.cpu_count()} logical cores; {', '.join(cpu['flags']) or 'no AVX2'})",
        "cpu": cpu, "torch": torch.__version__, **peer_versions, "python": platform.python_version(),
        "cuda": torch.version.cuda if device.type == "cuda" else None,
        "peak_gflops": {name: peak.gflops for name, peak in peaks.items()},
        "peak_kernels": {name: peak.kernel for name, peak in peaks.items()},
        "load_average_before": load_before,
    }


def _load_average() -> list[float] | None:
    try:
        return [round(value, 2) for value in os.getloadavg()]
    except OSError:
        return None


def pipeline(variant: str, device: torch.device, count: int = 32) -> dict[str, Any]:
    """Images/s from JPEG files to top-5, the plain way (full decode, processor, eager model) and through
    `predict_images` with reduced-size decoding and `optimize()`; decoding and preprocessing alone."""
    processor, model, report = BitImageProcessor(), reference_model(variant).to(device), {"num_images": count}
    with tempfile.TemporaryDirectory() as directory:
        paths = write_jpegs(Path(directory), count)
        for name, decode in (("full", load_image), ("reduced", lambda p: decode_image(p, 224))):
            start = time.perf_counter()
            for path in paths:
                processor(decode(path), return_tensors="pt")
            report[f"decode_and_preprocess_{name}_images_per_second"] = count / (time.perf_counter() - start)
        start = time.perf_counter()
        for index in range(0, count, 16):
            batch = processor([load_image(p) for p in paths[index:index + 16]], return_tensors="pt")["pixel_values"]
            with torch.no_grad():
                model(batch.to(device)).logits.softmax(-1).topk(5)
        report["plain_images_per_second"] = count / (time.perf_counter() - start)
        fast = optimize(model)
        predict_images(fast, paths[:16], processor, batch_size=16)  # warm-up: the compile
        report["fast_images_per_second"] = predict_images(fast, paths, processor, batch_size=16).images_per_second
        report["fast_model_compiled"] = fast.is_compiled
    return report


def write_jpegs(directory: Path, count: int) -> list[Path]:
    """1280x960 JPEGs (a web-sized photo): scikit-image's sample photos when installed, else synthetic ones."""
    try:
        from skimage import data  # a dev dependency: real photos when it is there

        photos = [np.asarray(getattr(data, name)()) for name in ("astronaut", "chelsea", "coffee", "rocket")]
    except ImportError:
        y, x = np.mgrid[0:960, 0:1280]
        noise = np.random.default_rng(0).normal(0, 8, (960, 1280, 3))
        photos = [np.clip(np.stack([x * 0.2, y * 0.25, (x + y) * 0.1], -1) + noise, 0, 255).astype(np.uint8)]
    paths = []
    for index in range(count):
        path = directory / f"{index:03d}.jpg"
        image = PIL.Image.fromarray(photos[index % len(photos)])
        image.resize((1280, 960), PIL.Image.Resampling.BICUBIC).save(path, quality=90)
        paths.append(path)
    return paths


def format_report(report: dict[str, Any]) -> str:
    """The report as a table, with the machine, the peaks, the best profiles and the pipeline."""
    env, rows = report["environment"], report["results"]
    peers = any(not row["ours"] for row in rows)
    lines = [
        f"{env['variant']} on {env['device']}, {env['threads']} threads; torch {env['torch']}"
        + "".join(f", {name} {env[name]}" for name in ("transformers", "timm") if name in env)
        + f"; each contender in its own process, median of {env['rounds']} interleaved rounds",
        "measured peaks " + ", ".join(f"{p} {g:.0f}" for p, g in env["peak_gflops"].items()) + " GFLOP/s ("
        + "; ".join(env["peak_kernels"].values()) + f"); load average {env['load_average_before']} -> "
        f"{env.get('load_average_after')}",
        "",
        f"{'workload':<10} {'prec':<5} {'contender':<50} {'img/s':>7} {'peak MB':>8} {'GFLOP/s':>8} {'%peak':>6} "
        f"{'vs ' + ('best peer' if peers else 'eager'):>12} {'quiet':>6}",
    ]
    for row in rows:
        head = f"{row['workload']:<10} {row['precision']:<5} {row['contender']:<50}"
        if row["error"]:
            lines.append(f"{head} failed: {row['error'][:100]}")
            continue
        memory = f"{row['peak_memory_mb']:.0f}" if row.get("peak_memory_mb") is not None else "-"
        fraction = f"{100 * row['peak_fraction']:.0f}%" if row.get("peak_fraction") else "-"
        ratio = f"{row['ratio']:.2f}x" if row["ratio"] else "-"
        lines.append(f"{head} {row['images_per_second']:>7.2f} {memory:>8} {row.get('gflops', 0):>8.1f} "
                     f"{fraction:>6} {ratio:>12} {row['clean_rounds']:>3}/{len(row['rounds'])}")
    frozen = [f"{r['contender']} {r['frozen_constants']}" for r in rows if r["frozen"] and not r["error"]]
    if frozen:
        lines.append(f"frozen rows: verified frozen by their workers (parameters made constants: {', '.join(frozen)})")
    lines.append("quiet: rounds in which other processes used < 10 % of the CPUs (medians use those)")
    for group in {(row["workload"], row["precision"]) for row in rows if "profile" in row}:
        # Runtimes torch.profiler cannot see (ONNX Runtime) have an empty profile: the best of the others is shown.
        timed = [r for r in rows if (r["workload"], r["precision"]) == group and r.get("profile") and not r["error"]]
        for side in (True, False):
            best = max((r for r in timed if r["ours"] == side), key=lambda r: r["images_per_second"], default=None)
            if best:
                lines += [f"\nwhere the time goes: {best['contender']}, {group[0]} ({group[1]})", best["profile"]]
    if "pipeline" in report:
        pipe = report["pipeline"]
        lines.append(
            f"JPEG -> top-5, {pipe['num_images']} 1280x960 files, batch 16: plain {pipe['plain_images_per_second']:.2f}"
            f" img/s; predict_images (reduced decode, optimize(){'' if pipe['fast_model_compiled'] else ' eager'}) "
            f"{pipe['fast_images_per_second']:.2f} img/s; decode+preprocess alone "
            f"{pipe['decode_and_preprocess_full_images_per_second']:.0f} -> "
            f"{pipe['decode_and_preprocess_reduced_images_per_second']:.0f} img/s")
    return "\n".join(lines)
