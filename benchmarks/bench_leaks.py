"""Resident memory under load: `predict` over 5,000 image files and a 1,000-step fine-tuning run.

Each workload runs in a child process (`python -m bigtransfer.cli ...`, as a user would run it) whose
resident set size (VmRSS, plus that of its own children such as DataLoader workers) is sampled every
0.1 s. After a warm-up (the first 20 % of the run: imports, model build, allocator pools, the first
epoch) memory must stay flat: the growth reported is the median RSS of the last 10 % of samples over
the median of the 10 % right after warm-up. A leak of a few kB per image or step shows up as several
percent over 5,000 images or 1,000 steps.

    python benchmarks/bench_leaks.py [--images 5000] [--steps 1000] [--json leaks.json] [--check]

`--check` exits 1 when a workload grows by 10 % or more. Results (JSON) include the RSS timeline.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
from PIL import Image

WARM_UP = 0.2  # fraction of the samples (by time) treated as warm-up
WINDOW = 0.1  # fraction of the samples averaged at each end
LIMIT = 0.10  # the bound: less than 10 % growth after warm-up


def rss_bytes(pid: int) -> int:
    """VmRSS of `pid` and of all its descendants, in bytes (0 when it has exited)."""
    total = 0
    for process in [pid, *_descendants(pid)]:
        try:
            for line in Path(f"/proc/{process}/status").read_text().splitlines():
                if line.startswith("VmRSS:"):
                    total += int(line.split()[1]) * 1024
        except OSError:
            pass
    return total


def _descendants(pid: int) -> list[int]:
    children: dict[int, list[int]] = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            parent = int(stat.read_text().rsplit(")", 1)[1].split()[1])
        except (OSError, IndexError, ValueError):
            continue
        children.setdefault(parent, []).append(int(stat.parent.name))
    found, pending = [], list(children.get(pid, []))
    while pending:
        child = pending.pop()
        found.append(child)
        pending.extend(children.get(child, []))
    return found


def watch(command: list[str], interval: float = 0.1) -> dict:
    """Run `command`, sampling its memory; the summary says how much it grew after warm-up."""
    environment = dict(os.environ, OMP_NUM_THREADS=os.environ.get("OMP_NUM_THREADS", "1"))
    started = time.perf_counter()
    process = subprocess.Popen(command, env=environment, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    samples: list[tuple[float, int]] = []
    while process.poll() is None:
        rss = rss_bytes(process.pid)
        if rss:
            samples.append((time.perf_counter() - started, rss))
        time.sleep(interval)
    stderr = process.stderr.read()
    if process.returncode != 0:
        raise RuntimeError(f"{' '.join(command)} failed ({process.returncode}): {stderr.strip()[-2000:]}")
    return summarise(samples)


def summarise(samples: list[tuple[float, int]]) -> dict:
    duration = samples[-1][0]
    steady = [rss for seconds, rss in samples if seconds >= WARM_UP * duration]
    window = max(1, int(len(steady) * WINDOW / (1 - WARM_UP)))
    after_warm_up, at_end = statistics.median(steady[:window]), statistics.median(steady[-window:])
    return {
        "seconds": round(duration, 1),
        "samples": len(samples),
        "rss_after_warm_up_mib": round(after_warm_up / 2**20, 1),
        "rss_at_end_mib": round(at_end / 2**20, 1),
        "rss_peak_mib": round(max(rss for _, rss in samples) / 2**20, 1),
        "growth": round(at_end / after_warm_up - 1, 4),
        "timeline_mib": [[round(seconds, 1), round(rss / 2**20, 1)] for seconds, rss in samples[:: max(1, len(samples) // 100)]],
    }


def make_images(directory: Path, count: int, classes: int = 1, size: int = 48) -> Path:
    rng = np.random.default_rng(0)
    for index in range(count):
        folder = directory / f"class{index % classes}"
        folder.mkdir(parents=True, exist_ok=True)
        pixels = rng.integers(0, 256, (size, size, 3), dtype=np.uint8)
        pixels[..., index % classes % 3] //= 2
        Image.fromarray(pixels).save(folder / f"{index:05d}.png")
    return directory


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=5000, help="image files for predict")
    parser.add_argument("--steps", type=int, default=1000, help="fine-tuning steps")
    parser.add_argument("--workers", type=int, default=0, help="DataLoader workers of the fine-tuning run")
    parser.add_argument("--json", help="write the results here")
    parser.add_argument("--check", action="store_true", help="exit 1 when a workload grows by 10 % or more")
    args = parser.parse_args()

    cli = [sys.executable, "-m", "bigtransfer.cli"]
    train = ["--batch-size", "8", "--resize", "36", "--crop", "32", "--device", "cpu", "--no-progress", "--no-plots"]
    results = {"machine": platform.platform(), "cpus": os.cpu_count(), "python": platform.python_version()}
    with tempfile.TemporaryDirectory() as scratch:
        scratch = Path(scratch)
        folder = make_images(scratch / "train", 60, classes=3)
        print(f"fine-tune: {args.steps} steps, batch 8, 32x32, tiny model, {args.workers} workers", flush=True)
        results["finetune"] = watch([*cli, "finetune", "--model", "tiny", "--data", str(folder), "--output",
                                     str(scratch / "run"), "--max-steps", str(args.steps), "--workers",
                                     str(args.workers), *train])
        results["finetune"]["steps"] = args.steps
        print(_line(results["finetune"]), flush=True)

        images = sorted(str(path) for path in make_images(scratch / "predict", args.images).rglob("*.png"))
        print(f"predict: {len(images)} image files with the fine-tuned model", flush=True)
        results["predict"] = watch([*cli, "predict", "--model", str(scratch / "run" / "model"), "--top-k", "3",
                                    "--device", "cpu", *images])
        results["predict"]["images"] = len(images)
        print(_line(results["predict"]), flush=True)

    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=2) + "\n")
    failed = [name for name in ("finetune", "predict") if results[name]["growth"] >= LIMIT]
    return 1 if args.check and failed else 0


def _line(result: dict) -> str:
    return (f"  {result['seconds']} s; RSS after warm-up {result['rss_after_warm_up_mib']} MiB, at the end "
            f"{result['rss_at_end_mib']} MiB ({result['growth']:+.1%}), peak {result['rss_peak_mib']} MiB")


if __name__ == "__main__":
    sys.exit(main())
