"""The transfer demonstration on Fashion-MNIST (and scikit-learn's digits), end to end (`bigtransfer demo`).

1. Upstream: pre-train (`train.pretrain`) `tiny` and `tiny-wide` (twice the width) on the training images of the
   first 2, 3 and 5 Fashion-MNIST classes (T-shirt/top, Trouser, Pullover, Dress, Coat).
2. Few-shot linear evaluation (`bigtransfer.fewshot`, big_vision's) of every upstream model and of randomly
   initialised ones (one per seed) on the five unseen classes 5-9, at 1-25 examples per class; the main
   (`tiny`, 5 classes) model and random `tiny` also on scikit-learn's digits.
3. HyperRule fine-tuning (`train.finetune`) of the main model and of random `tiny` on classes 5-9.
4. Both arms of a comparison see the same examples for a seed (paired); results.json holds every cell, the
   settings, the equivalent commands and the time taken, and the plots go beside it. docs/make_results.py turns
   it into docs/RESULTS.md with paired margins and 95 % confidence intervals.

`DemoConfig.quick_version()` (`--quick`) is the short version (one architecture and upstream, fewer seeds and shot
counts, a short upstream run) into runs/demo-quick. Finished runs are reused when the demo is started again.
"""

from __future__ import annotations

import dataclasses
import json
import platform
import shlex
import shutil
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from .config import BitConfig
from .data import BIT_MEAN, BIT_STD, EvalTransform, Selection, TransformedDataset, open_source
from .distributed import distributed
from .fewshot import fewshot_accuracy
from .files import read_json, write_text_atomic
from .inference.evaluate import dataset_features
from .inference.predict import load_for_inference
from .machine import cpu_description
from .modeling import BitForImageClassification, BitModel
from .report import plot_accuracy_vs_shots, plot_series, read_report
from .train.run import finetune, pretrain
from .train.settings import FinetuneConfig, PretrainConfig

SOURCE_CLASSES = (0, 1, 2, 3, 4)  # T-shirt/top, Trouser, Pullover, Dress, Coat
TARGET_CLASSES = (5, 6, 7, 8, 9)  # Sandal, Shirt, Sneaker, Bag, Ankle boot
ARCHITECTURES = {  # BitConfig.from_variant("tiny", **overrides)
    "tiny": {},
    "tiny-wide": dict(embedding_size=64, hidden_sizes=(128, 256, 512, 1024)),
}
RANDOM = "random init"
RESULTS_NAME = "results.json"
LINEAR_NAME = "linear.json"  # the linear protocol's results, reused while its models are unchanged


@dataclasses.dataclass
class DemoConfig:
    """The experiment's settings; `quick_version()` gives the short version."""

    runs_dir: Path = Path("runs/demo")
    shots: tuple[int, ...] = (1, 2, 5, 10, 25)
    finetune_seeds: int = 10  # seeds 0..n-1 per fine-tuning cell of up to 5 shots
    finetune_seeds_many: int = 5  # per cell above 5 shots, where seeds vary less
    linear_seeds: int = 10
    linear_pool: int | None = None  # support pool of the linear protocol: the first N per class (None: all 6,000)
    upstream_classes: tuple[int, ...] = (2, 3, 5)  # the first k of SOURCE_CLASSES; the largest is the main model's
    architectures: tuple[str, ...] = ("tiny", "tiny-wide")  # the first is the main model's
    # Images are 28x28 (digits 8x8): squash to 36, random 32x32 crop (the HyperRule's 160/128 is too slow here).
    resize: int = 36
    crop: int = 32
    upstream_epochs: float = 8.0
    upstream_batch: int = 128
    finetune_steps: int = 100  # the HyperRule's 500-step schedule, scaled down to this many steps
    finetune_batch: int = 64
    finetune_lr: float = 0.01
    threads: int | None = None
    quick: bool = False

    @classmethod
    def quick_version(cls, **overrides: Any) -> DemoConfig:
        values = dict(runs_dir=Path("runs/demo-quick"), shots=(1, 5, 10), finetune_seeds=1, finetune_seeds_many=1,
                      linear_seeds=3, upstream_classes=(5,), architectures=("tiny",), upstream_epochs=2.0, quick=True)
        values.update(overrides)
        return cls(**values)

    def seeds_for(self, shots: int) -> range:
        return range(self.finetune_seeds if shots <= 5 else self.finetune_seeds_many)

    @property
    def main(self) -> str:
        return upstream_name(self.architectures[0], max(self.upstream_classes))


def upstream_name(architecture: str, classes: int) -> str:
    return f"{architecture}-{classes}classes"


def upstream_config(config: DemoConfig, architecture: str, classes: int) -> PretrainConfig:
    return PretrainConfig(
        model=_initial_model(config, architecture, classes), data="fashion-mnist",
        classes=list(SOURCE_CLASSES[:classes]), output=config.runs_dir / "upstream" / upstream_name(architecture, classes),
        batch_size=config.upstream_batch, epochs=config.upstream_epochs, resize=config.resize, crop=config.crop,
        resume=True, progress=True,
    )


def _initial_model(config: DemoConfig, architecture: str, classes: int) -> str:
    """`tiny` by name; other widths as a directory holding their (seeded) random initialisation."""
    if not ARCHITECTURES[architecture]:
        return architecture
    directory = config.runs_dir / "initial" / f"{architecture}-{classes}"
    if not (directory / "config.json").is_file():
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(0)
            model = BitForImageClassification(
                BitConfig.from_variant("tiny", num_labels=classes, **ARCHITECTURES[architecture]))
        model.save_pretrained(directory)
    return str(directory)


def finetune_config(config: DemoConfig, model: str, shots: int, seed: int, output: Path) -> FinetuneConfig:
    return FinetuneConfig(
        model=model, data="fashion-mnist", classes=list(TARGET_CLASSES), output=output, shots=shots, seed=seed,
        max_steps=config.finetune_steps, batch_size=config.finetune_batch, base_lr=config.finetune_lr,
        resize=config.resize, crop=config.crop, resume=True, progress=False, plots=False,
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
    current = json.loads(json.dumps(settings.signature(), default=str))
    current["data"], current["model"] = str(settings.data), str(settings.model)
    if {key: stored.get(key) for key in current} != current:
        return None
    return read_json(report)["top1"]


def _run(settings, run: Any) -> tuple[float, bool, Any]:
    """(top-1, whether a finished run was reused, its report) of one training run."""
    top1 = _finished(Path(settings.output), settings)
    if top1 is not None:
        return top1, True, read_report(Path(settings.output) / "report.json")
    if Path(settings.output).exists():
        shutil.rmtree(settings.output)  # a run with other settings or one that did not finish
    result = run(settings)
    if result.interrupted:
        raise KeyboardInterrupt
    return result.report.top1, False, result.report


def run_demo(config: DemoConfig) -> str:
    """Run the whole experiment (reusing finished runs), write results.json and the plots; returns a summary."""
    if config.threads:
        torch.set_num_threads(config.threads)
    config.runs_dir.mkdir(parents=True, exist_ok=True)
    started, timings, reused = time.perf_counter(), {}, 0
    upstream, commands = {}, []
    for architecture in config.architectures:
        for classes in config.upstream_classes:
            settings = upstream_config(config, architecture, classes)
            name = upstream_name(architecture, classes)
            print(f"[demo] upstream {name}: {command('pretrain', settings, PretrainConfig())}", flush=True)
            _, was_reused, report = _run(settings, pretrain)
            reused += was_reused
            upstream[name] = dict(summary=report.summary(), top1=report.top1, architecture=architecture,
                                  classes=classes, model=str(settings.output / "model"))
            commands.append(command("pretrain", settings, PretrainConfig()))
    timings["upstream pre-training"] = time.perf_counter() - started

    phase = time.perf_counter()
    linear, was_reused = _cached_linear(config, upstream)
    reused += was_reused
    timings["few-shot linear evaluation"] = time.perf_counter() - phase

    phase = time.perf_counter()
    finetuned = {"transfer": {}, RANDOM: {}}
    for arm, model in (("transfer", upstream[config.main]["model"]), (RANDOM, config.architectures[0])):
        for shots in config.shots:
            for seed in config.seeds_for(shots):
                output = config.runs_dir / "finetune" / arm.replace(" ", "-") / f"{shots}shot-seed{seed}"
                settings = finetune_config(config, model, shots, seed, output)
                top1, was_reused, _ = _run(settings, finetune)
                reused += was_reused
                finetuned[arm].setdefault(shots, []).append(top1)
                print(f"[demo] fine-tuning {arm:11s} {shots:3d}-shot seed {seed}: {100 * top1:.1f} %", flush=True)
                if seed == 0 and shots == config.shots[0]:
                    commands.append(command("finetune", settings, FinetuneConfig()))
    runs = sum(len(values) for values in finetuned["transfer"].values())
    timings[f"HyperRule fine-tuning ({2 * runs} runs)"] = time.perf_counter() - phase
    timings["total"] = time.perf_counter() - started
    cpu = cpu_description()
    record = dict(
        upstream=upstream, linear=linear, finetune=finetuned, timings=timings, reused=reused, commands=commands,
        settings={key: str(value) if isinstance(value, Path) else value for key, value in dataclasses.asdict(config).items()},
        machine=dict(threads=torch.get_num_threads(), machine=platform.machine(), torch=torch.__version__,
                     processor=cpu["model"], flags=cpu["flags"]),
    )
    write_text_atomic(config.runs_dir / RESULTS_NAME, json.dumps(record, indent=2) + "\n")
    draw_plots(record, config.runs_dir)
    return summary(record)


# ---------------------------------------------------------------------------------------------------------------
# The few-shot linear protocol: features of every model on the downstream data, extracted once per model.


def _downstream(config: DemoConfig, task: str) -> tuple[TransformedDataset, TransformedDataset]:
    """(support pool, test set) of a downstream task, preprocessed as the upstream runs evaluate."""
    transform = EvalTransform(config.crop, BIT_MEAN, BIT_STD)
    classes = list(TARGET_CLASSES) if task == "fashion-mnist" else None
    pool, test = (open_source(task, split, classes=classes) for split in ("train", "test"))
    if config.linear_pool is not None:
        first = [np.flatnonzero(pool.labels == label)[: config.linear_pool] for label in range(pool.num_classes)]
        pool = Selection([(pool, np.sort(np.concatenate(first)))], f"{task} pool")
    return TransformedDataset(pool, transform), TransformedDataset(test, transform)


def _accuracy(backbone: BitModel, sets, shots: Sequence[int], seeds: Sequence[int]) -> dict[int, list[float]]:
    with distributed("cpu") as context:
        (train_x, train_y, _), (test_x, test_y, _) = (dataset_features(backbone, data, 256, context) for data in sets)
    return fewshot_accuracy(train_x, train_y, test_x, test_y, shots, seeds, num_classes=len(sets[0].classes))


def _random_backbone(architecture: str, seed: int) -> BitModel:
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return BitModel(BitConfig.from_variant("tiny", **ARCHITECTURES[architecture]))


def linear_protocol(config: DemoConfig, upstream: dict[str, dict[str, Any]]) -> dict[str, dict[str, Any]]:
    """{task: {model name or "random init <architecture>": {shots: [accuracy per seed]}}}; a random model per seed."""
    seeds = range(config.linear_seeds)
    results: dict[str, dict[str, Any]] = {}
    for task in ("fashion-mnist", "digits"):
        sets = _downstream(config, task)
        names = list(upstream) if task == "fashion-mnist" else [config.main]
        architectures = config.architectures if task == "fashion-mnist" else config.architectures[:1]
        results[task] = {}
        for name in names:
            backbone = load_for_inference(upstream[name]["model"], "cpu")[0].bit
            results[task][name] = _accuracy(backbone, sets, config.shots, seeds)
            print(f"[demo] linear {task} {name}: " + _means(results[task][name]), flush=True)
        for architecture in architectures:
            by_seed = [_accuracy(_random_backbone(architecture, seed), sets, config.shots, [seed]) for seed in seeds]
            results[task][f"{RANDOM} {architecture}"] = {k: [cell[k][0] for cell in by_seed] for k in config.shots}
            print(f"[demo] linear {task} {RANDOM} {architecture}: " + _means(results[task][f'{RANDOM} {architecture}']),
                  flush=True)
    return results


def _cached_linear(config: DemoConfig, upstream: dict[str, dict[str, Any]]) -> tuple[dict[str, Any], bool]:
    """The linear protocol's results, reused from linear.json when its settings and upstream models are unchanged."""
    path = config.runs_dir / LINEAR_NAME
    key = dict(settings={name: getattr(config, name) for name in ("shots", "linear_seeds", "linear_pool", "crop",
                                                                   "architectures", "upstream_classes")},
               models={name: _model_stamp(Path(entry["model"])) for name, entry in upstream.items()})
    key = json.loads(json.dumps(key))
    if path.is_file():
        stored = read_json(path)
        if stored.get("key") == key:
            return stored["results"], True
    results = linear_protocol(config, upstream)
    write_text_atomic(path, json.dumps(dict(key=key, results=results)) + "\n")
    return json.loads(json.dumps(results)), False


def _model_stamp(directory: Path) -> list[Any]:
    """Size and modification time of a model's weights: a retrained upstream model has others."""
    weights = sorted(directory.glob("*.safetensors")) or sorted(directory.glob("*.bin"))
    return [[item.name, item.stat().st_size, item.stat().st_mtime_ns] for item in weights]


def _means(by_shots: dict[int, list[float]]) -> str:
    return ", ".join(f"{k}-shot {100 * np.mean(values):.1f} %" for k, values in by_shots.items())


# ---------------------------------------------------------------------------------------------------------------
# Statistics, tables and plots (results.json keys are strings once read back; both forms are accepted).


def paired_margin(first: Sequence[float], second: Sequence[float]) -> dict[str, float | int | None]:
    """Mean of the per-seed differences first - second (in points) with its two-sided 95 % Student-t interval
    (None with one seed). The arms must be paired: entry i of both comes from seed i."""
    if len(first) != len(second):
        raise ValueError(f"paired arms need the same seeds, got {len(first)} and {len(second)} values")
    differences = 100 * (np.asarray(first, np.float64) - np.asarray(second, np.float64))
    count, mean = len(differences), float(differences.mean())
    if count < 2:
        return dict(mean=mean, low=None, high=None, seeds=count)
    from scipy import stats  # scikit-learn's dependency: the train extra has it

    half = float(stats.t.ppf(0.975, count - 1) * differences.std(ddof=1) / np.sqrt(count))
    return dict(mean=mean, low=mean - half, high=mean + half, seeds=count)


def _by_int(cells: dict[Any, list[float]]) -> dict[int, list[float]]:
    return {int(shots): values for shots, values in cells.items()}


def paired_table(first: dict[Any, list[float]], second: dict[Any, list[float]], names: tuple[str, str]) -> str:
    """Markdown: per shot count, both arms' mean ± std and the paired margin with its 95 % interval."""
    first, second = _by_int(first), _by_int(second)
    lines = [f"| examples per class | seeds | {names[0]} (mean ± std) | {names[1]} (mean ± std) | paired margin "
             "[95 % CI] | interval above 0 |", "|---:|---:|---:|---:|---:|:---:|"]
    for shots in sorted(first):
        a, b = 100 * np.asarray(first[shots]), 100 * np.asarray(second[shots])
        margin = paired_margin(first[shots], second[shots])
        interval = f" [{margin['low']:+.1f}, {margin['high']:+.1f}]" if margin["low"] is not None else ""
        verdict = ("yes" if margin["low"] > 0 else "no") if margin["low"] is not None else "n/a (1 seed)"
        lines.append(f"| {shots} | {len(a)} | {a.mean():.1f} ± {a.std():.1f} | {b.mean():.1f} ± {b.std():.1f} | "
                     f"{margin['mean']:+.1f}{interval} | {verdict} |")
    return "\n".join(lines)


def plot_names(quick: bool) -> dict[str, str]:
    suffix = "_quick" if quick else ""
    return {"finetune": f"transfer_finetune{suffix}.png", "linear": f"transfer_linear{suffix}.png",
            "breadth": f"transfer_breadth{suffix}.png"}


def draw_plots(record: dict[str, Any], directory: Path) -> list[Path]:
    """Accuracy against shots for both protocols (main model vs random init) and, with more than one upstream,
    the linear gain over random init against the number of upstream classes, per architecture."""
    names, settings = plot_names(record["settings"]["quick"]), record["settings"]
    main, architecture = _main(record), settings["architectures"][0]
    linear = record["linear"]["fashion-mnist"]
    written = [
        plot_accuracy_vs_shots({"transfer": _by_int(record["finetune"]["transfer"]),
                                RANDOM: _by_int(record["finetune"][RANDOM])}, directory / names["finetune"],
                               title="HyperRule fine-tuning, Fashion-MNIST 5-9"),
        plot_accuracy_vs_shots({"transfer": _by_int(linear[main]), RANDOM: _by_int(linear[f"{RANDOM} {architecture}"])},
                               directory / names["linear"], title="Few-shot linear evaluation, Fashion-MNIST 5-9"),
    ]
    if len(settings["upstream_classes"]) > 1:
        written.append(plot_series(breadth_gains(record), directory / names["breadth"],
                                   xlabel="upstream classes (Fashion-MNIST 0-4)",
                                   ylabel="gain over random init (points)",
                                   title="Linear few-shot gain against upstream breadth"))
    return written


def _main(record: dict[str, Any]) -> str:
    settings = record["settings"]
    return upstream_name(settings["architectures"][0], max(settings["upstream_classes"]))


def breadth_gains(record: dict[str, Any]) -> dict[str, dict[int, list[float]]]:
    """{"<architecture>, <k> shots": {upstream classes: [paired gain in points per seed]}} of the linear protocol."""
    linear, settings = record["linear"]["fashion-mnist"], record["settings"]
    series: dict[str, dict[int, list[float]]] = {}
    for architecture in settings["architectures"]:
        random = _by_int(linear[f"{RANDOM} {architecture}"])
        for shots in (1, 5, 25):
            if shots not in random:
                continue
            series[f"{architecture}, {shots}-shot"] = {
                classes: list(100 * (np.asarray(_by_int(linear[upstream_name(architecture, classes)])[shots])
                                     - np.asarray(random[shots])))
                for classes in settings["upstream_classes"]}
    return series


def summary(record: dict[str, Any]) -> str:
    """The two paired tables on the held-out classes, as printed at the end of the demo."""
    main, architecture = _main(record), record["settings"]["architectures"][0]
    linear = record["linear"]["fashion-mnist"]
    return "\n\n".join([
        "HyperRule fine-tuning, Fashion-MNIST 5-9\n"
        + paired_table(record["finetune"]["transfer"], record["finetune"][RANDOM], ("transfer", RANDOM)),
        "Few-shot linear evaluation, Fashion-MNIST 5-9\n"
        + paired_table(linear[main], linear[f"{RANDOM} {architecture}"], ("transfer", RANDOM)),
    ])
