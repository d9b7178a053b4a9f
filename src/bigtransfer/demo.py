"""The transfer demonstration on Fashion-MNIST (and scikit-learn's digits), end to end (`bigtransfer demo`).

1. Pre-train the `tiny` BiT on the 30,000 training images of Fashion-MNIST classes 0-4 (`train.pretrain`).
2. Fine-tune it (`train.finetune`) on 1, 2, 5, 10 and 25 examples per class of the five unseen classes 5-9,
   and the same fine-tuning from random initialisation, 3 seeds each; evaluate on all 5,000 test images of
   those classes.
3. The same transfer across domains to scikit-learn's 8x8 digits (10 classes, the seeded 20 % test split).
4. Print the tables, and write `results.json` (every cell, the settings, the equivalent commands, the time taken)
   and accuracy-against-shots plots into the runs directory. docs/make_results.py turns results.json into
   docs/RESULTS.md.

`DemoConfig.quick_version()` (`--quick`) is a short version (one seed, three shot counts, a shorter upstream run)
into runs/demo-quick. Finished runs are reused when the demo is started again with the same settings.
"""

from __future__ import annotations

import dataclasses
import json
import platform
import shlex
import shutil
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

from .files import read_json, write_text_atomic
from .report import plot_accuracy_vs_shots, read_report
from .train import FinetuneConfig, PretrainConfig, finetune, pretrain, run_signature

SOURCE_CLASSES = (0, 1, 2, 3, 4)  # T-shirt/top, Trouser, Pullover, Dress, Coat
TARGET_CLASSES = (5, 6, 7, 8, 9)  # Sandal, Shirt, Sneaker, Bag, Ankle boot
TASKS = {
    "fashion-mnist": dict(data="fashion-mnist", classes=TARGET_CLASSES,
                          title="Fashion-MNIST 0-4 upstream -> Fashion-MNIST 5-9"),
    "digits": dict(data="digits", classes=None, title="Fashion-MNIST 0-4 upstream -> scikit-learn digits"),
}
RESULTS_NAME = "results.json"


@dataclasses.dataclass
class DemoConfig:
    """The experiment's settings; `quick_version()` gives the short version."""

    runs_dir: Path = Path("runs/demo")
    seeds: tuple[int, ...] = (0, 1, 2)
    shots: tuple[int, ...] = (1, 2, 5, 10, 25)
    # Images are 28x28 (digits 8x8): squash to 36, random 32x32 crop (the HyperRule's 160/128 is too slow here).
    resize: int = 36
    crop: int = 32
    upstream_epochs: float = 24.0
    upstream_batch: int = 128
    finetune_steps: int = 100  # the HyperRule's 500-step schedule, scaled down to this many steps
    finetune_batch: int = 64
    finetune_lr: float = 0.01
    threads: int | None = None
    quick: bool = False

    @classmethod
    def quick_version(cls, **overrides: Any) -> DemoConfig:
        values = dict(runs_dir=Path("runs/demo-quick"), seeds=(0,), shots=(1, 5, 10), upstream_epochs=3.0, quick=True)
        values.update(overrides)
        return cls(**values)


def upstream_config(config: DemoConfig) -> PretrainConfig:
    return PretrainConfig(
        model="tiny", data="fashion-mnist", classes=list(SOURCE_CLASSES), output=config.runs_dir / "upstream",
        batch_size=config.upstream_batch, epochs=config.upstream_epochs, resize=config.resize, crop=config.crop,
        resume=True, progress=True,
    )


def finetune_config(config: DemoConfig, task: str, model: str, shots: int, seed: int, output: Path) -> FinetuneConfig:
    classes = TASKS[task]["classes"]
    return FinetuneConfig(
        model=model, data=TASKS[task]["data"], classes=None if classes is None else list(classes), output=output,
        shots=shots, seed=seed, max_steps=config.finetune_steps, batch_size=config.finetune_batch,
        base_lr=config.finetune_lr, resize=config.resize, crop=config.crop, resume=True, progress=False, plots=False,
    )


def command(name: str, settings, defaults) -> str:
    """The CLI command equivalent to a config (options left at their defaults are omitted)."""
    words = ["bigtransfer", name]
    names = ["model", "data", "classes", "output", "epochs", "shots", "seed", "max_steps", "batch_size", "base_lr",
             "resize", "crop"]
    for field in names:
        if not hasattr(settings, field):
            continue
        value = getattr(settings, field)
        if value is None or (field not in ("model", "data", "output") and value == getattr(defaults, field, None)):
            continue
        if field == "classes":
            value = f"{value[0]}-{value[-1]}"
        words += [f"--{field.replace('_', '-')}", str(value)]
    return shlex.join(words)


def _finished(run_dir: Path, settings) -> float | None:
    """top-1 of a finished run with these settings, else None."""
    report, description = run_dir / "report.json", run_dir / "run.json"
    if not (report.is_file() and description.is_file()):
        return None
    stored = read_json(description)["settings"]
    current = json.loads(json.dumps(run_signature(settings), default=str))
    current["data"], current["model"] = str(settings.data), str(settings.model)
    if {key: stored.get(key) for key in current} != current:
        return None
    return read_json(report)["top1"]


def run_demo(config: DemoConfig) -> str:
    """Run the whole experiment (reusing finished runs), write results.json and the plots; returns the tables."""
    if config.threads:
        torch.set_num_threads(config.threads)
    config.runs_dir.mkdir(parents=True, exist_ok=True)
    started, timings, reused = time.perf_counter(), {}, 0
    upstream = upstream_config(config)
    print(f"[demo] upstream: {command('pretrain', upstream, PretrainConfig())}", flush=True)
    if _finished(upstream.output, upstream) is None:
        result = pretrain(upstream)
        if result.interrupted:
            raise KeyboardInterrupt
        upstream_report = result.report
    else:
        upstream_report, reused = read_report(upstream.output / "report.json"), reused + 1
    timings["upstream pre-training"] = time.perf_counter() - started
    print(f"[demo] upstream on held-out classes 0-4: {upstream_report.summary()}", flush=True)

    arms = {"transfer": str(upstream.output / "model"), "random init": "tiny"}
    results: dict[str, dict[str, dict[int, list[float]]]] = {}
    commands = [command("pretrain", upstream, PretrainConfig())]
    for task in TASKS:
        phase = time.perf_counter()
        results[task] = {arm: {} for arm in arms}
        for arm, model in arms.items():
            for shots in config.shots:
                for seed in config.seeds:
                    output = config.runs_dir / task / arm.replace(" ", "-") / f"{shots}shot-seed{seed}"
                    settings = finetune_config(config, task, model, shots, seed, output)
                    top1, was_reused = _run_arm(output, settings)
                    reused += was_reused
                    results[task][arm].setdefault(shots, []).append(top1)
                    print(f"[demo] {task:13s} {arm:11s} {shots:3d}-shot seed {seed}: {100 * top1:.1f} %", flush=True)
                    if seed == config.seeds[0] and shots == config.shots[0]:
                        commands.append(command("finetune", settings, FinetuneConfig()))
        timings[f"{task} fine-tuning ({len(arms) * len(config.shots) * len(config.seeds)} runs)"] = (
            time.perf_counter() - phase
        )
    timings["total"] = time.perf_counter() - started
    for task, spec in TASKS.items():
        plot_accuracy_vs_shots(results[task], config.runs_dir / plot_name(task, config.quick), title=spec["title"])
    record = dict(
        results=results, timings=timings, reused=reused, commands=commands, upstream=upstream_report.summary(),
        settings={key: str(value) if isinstance(value, Path) else value for key, value in dataclasses.asdict(config).items()},
        machine=dict(threads=torch.get_num_threads(), machine=platform.machine(), torch=torch.__version__),
    )
    write_text_atomic(config.runs_dir / RESULTS_NAME, json.dumps(record, indent=2) + "\n")
    return "\n\n".join(f"{task}\n{table(results[task])}" for task in TASKS)


def _run_arm(output: Path, settings: FinetuneConfig) -> tuple[float, bool]:
    """(top-1, whether a finished run was reused) of one fine-tuning run."""
    top1 = _finished(output, settings)
    if top1 is not None:
        return top1, True
    if output.exists():
        shutil.rmtree(output)  # a run with other settings or one that did not finish
    result = finetune(settings)
    if result.interrupted:
        raise KeyboardInterrupt
    return result.report.top1, False


def plot_name(task: str, quick: bool) -> str:
    return f"transfer_{task.replace('-', '_')}{'_quick' if quick else ''}.png"


def table(by_arm: dict[str, dict[Any, list[float]]]) -> str:
    """The Markdown table of one task: mean ± std per arm and shot count, the margin and whether it beats the spread."""
    transfer, random = by_arm["transfer"], by_arm["random init"]
    lines = [
        "| examples per class | transfer (mean ± std) | random init (mean ± std) | margin | margin > spread |",
        "|---:|---:|---:|---:|:---:|",
    ]
    for shots in sorted(transfer, key=int):
        a, b = np.asarray(transfer[shots]) * 100, np.asarray(random[shots]) * 100
        margin = a.mean() - b.mean()
        spread = a.std() + b.std()
        verdict = ("yes" if margin > spread else "no") if min(len(a), len(b)) > 1 else "n/a (1 seed)"
        lines.append(
            f"| {shots} | {a.mean():.1f} ± {a.std():.1f} | {b.mean():.1f} ± {b.std():.1f} | {margin:+.1f} | {verdict} |"
        )
    return "\n".join(lines)
