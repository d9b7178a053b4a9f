"""A VTAB-1k-style transfer protocol on any data (the Visual Task Adaptation Benchmark's 1,000-example setting,
google-research/task_adaptation).

Per task: `train800` and `val200` are drawn from the task's training data with the seed (or given as they are),
the HyperRule fine-tuning runs once per setting of a small sweep (learning rates x schedule lengths) on train800
and is scored on val200; the best setting is retrained on all 1,000 examples and evaluated on the task's test
data. The result is the test top-1 of each task, their mean, and the mean of each group (natural, specialized,
structured, as the task file names them). Every split is written to the task's folder (splits.json), every run is
an ordinary run directory (resumable: running the same command again continues where it stopped).

Tasks come from a JSON file::

    {"tasks": [
      {"name": "caltech101", "group": "natural", "data": "caltech101/train", "test": "caltech101/test"},
      {"name": "dsprites_loc", "group": "structured",
       "train800": "dsprites_loc/train800.csv", "val200": "dsprites_loc/val200.csv", "test": "dsprites_loc/test.csv"}
    ]}

`data` is any data spec (a folder, a CSV file, digits, fashion-mnist, cifar10:DIR); relative paths are relative
to the task file. Without `test`, the test data is chosen as fine-tuning chooses its evaluation data (the
published test split of Fashion-MNIST and CIFAR, else a held-out fraction of each class). To reproduce VTAB's own
splits, export TFDS `train[:800]`, `validation[:200]` (`train[800:1000]` where a task has no validation split)
and `test` to image folders or CSV files and give them as `train800`, `val200` and `test`.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import os
import re
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from . import hyperrule
from .data import (
    ImageSource,
    Selection,
    open_source,
    open_train_eval,
    spec_paths,
    whole_split,
)
from .fields import parse_classes
from .files import read_json, write_text_atomic
from .ownership import claim_output
from .report import printable
from .train.run import finetune
from .train.run_dir import CHECKPOINT_NAME
from .train.settings import FinetuneConfig

logger = logging.getLogger("bigtransfer")

RESULTS_NAME = "vtab1k.json"
SPLITS_NAME = "splits.json"
SAFE_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,99}")  # a task's folder name
TASK_FIELDS = ("name", "group", "data", "train800", "val200", "test", "classes")
# The sweep: the HyperRule's own learning rate and schedule for 1,000 examples, and a larger / longer one of each.
DEFAULT_LEARNING_RATES = (hyperrule.DEFAULT_BASE_LR, 0.01)
DEFAULT_SCHEDULES = (500, 2500)


class Stopped(KeyboardInterrupt):
    """A run of the protocol was stopped by SIGINT / SIGTERM (its checkpoint saved); running the same command again
    continues it, keeping every finished run."""


class _SameCommandResumes(logging.Filter):
    """The trainer's stop message advises `--resume`, a flag of finetune: here the same command resumes."""

    def filter(self, record: logging.LogRecord) -> bool:
        if isinstance(record.msg, str) and record.msg.endswith("; resume with --resume"):
            record.msg = record.msg.replace("; resume with --resume", "; run the same vtab1k command again to continue")
        return True


@dataclasses.dataclass
class VtabTask:
    """One task: `data` to draw train800 / val200 from, or `train800` and `val200` as they are; `test` optional."""

    name: str
    data: str | None = None
    train800: str | None = None
    val200: str | None = None
    test: str | None = None
    group: str | None = None
    classes: list[int | str] | None = None


@dataclasses.dataclass
class Vtab1kConfig:
    """The protocol's settings; `finetune` is the template of every run (batch_size, crop, device, precision, ...):
    each run takes its model, data, output, learning rate, steps, seed and resumption from the protocol."""

    model: str
    tasks: list[VtabTask]
    output: str | os.PathLike
    train_examples: int = 800
    val_examples: int = 200
    learning_rates: Sequence[float] = DEFAULT_LEARNING_RATES
    schedules: Sequence[int] = DEFAULT_SCHEDULES
    seed: int = 0
    val_fraction: float = 0.2
    overwrite: bool = False
    finetune: FinetuneConfig = dataclasses.field(default_factory=FinetuneConfig)


def read_tasks(path: str | os.PathLike) -> list[VtabTask]:
    """The tasks of a task file (see the module doc); errors name the file, the task and the field."""
    path = Path(path)
    content = read_json(path)
    tasks = content.get("tasks") if isinstance(content, dict) else None
    if not isinstance(tasks, list) or not tasks:
        raise ValueError(f"{path}: expected {{\"tasks\": [{{\"name\": ..., \"data\": ...}}, ...]}} with one task or more")
    result = []
    for position, entry in enumerate(tasks):
        where = f"{path}: task {position + 1}"
        if not isinstance(entry, dict) or not isinstance(entry.get("name"), str) or not entry["name"].strip():
            raise ValueError(f"{where}: expected an object with a \"name\" string")
        unknown = sorted(set(entry) - set(TASK_FIELDS))
        if unknown:
            raise ValueError(f"{where} ({entry['name']}): unknown field(s) {unknown}; the fields are {list(TASK_FIELDS)}")
        for field in ("data", "train800", "val200", "test", "group"):
            if entry.get(field) is not None and not isinstance(entry[field], str):
                raise ValueError(f"{where} ({entry['name']}): \"{field}\" must be a string, got {entry[field]!r}")
        specs = {field: _relative_to(path.parent, entry.get(field)) for field in ("data", "train800", "val200", "test")}
        classes = _task_classes(entry.get("classes"), f"{where} ({entry['name']})")
        result.append(VtabTask(name=entry["name"], group=entry.get("group"), classes=classes, **specs))
        _check_task(result[-1])
    names = [task.name for task in result]
    if len(set(names)) != len(names):
        raise ValueError(f"{path}: task names repeat: {names}")
    return result


_SCHEME = re.compile(r"(?P<scheme>(?:wds|hf|fashion-mnist|fashion_mnist|cifar10|cifar-10|cifar100|cifar-100):)(?P<path>.+)")
_BUILT_IN = ("digits", "fashion-mnist", "fashion_mnist")


def _relative_to(folder: Path, spec: str | None) -> str | None:
    """A data spec with its local path taken relative to the task file's folder (`wds:shards/x-{0..3}.tar` ->
    `wds:FOLDER/shards/x-{0..3}.tar`); built-in names, absolute paths and URLs are kept."""
    if spec is None or spec.strip().lower() in _BUILT_IN:
        return spec
    scheme = _SCHEME.fullmatch(spec.strip())
    prefix, path = (scheme["scheme"], scheme["path"]) if scheme else ("", spec)
    if os.path.isabs(path) or "://" in path:
        return spec
    return prefix + str(folder / path)


def _task_classes(value: Any, where: str) -> list[int | str] | None:
    """A task's "classes": a list of class indices or names, or a range string as --classes takes ("0-4,7")."""
    if value is None:
        return None
    if isinstance(value, str):
        try:
            return parse_classes(value)
        except (ValueError, argparse.ArgumentTypeError) as error:
            raise ValueError(f"{where}: \"classes\": {error}") from None
    if (not isinstance(value, list) or not value
            or not all(isinstance(item, str) or (isinstance(item, int) and not isinstance(item, bool)) for item in value)):
        raise ValueError(f"{where}: \"classes\" must be a non-empty list of class indices or names, or a string such "
                         f"as \"0-4\", got {json.dumps(value)[:80]}")
    return value


def _check_task(task: VtabTask) -> None:
    if not SAFE_NAME.fullmatch(task.name):
        raise ValueError(f"task name {task.name!r}: it names the task's folder, so letters, digits, '.', '_' and '-' "
                         "only, not starting with '.'")
    given = task.train800 is not None, task.val200 is not None
    if task.data is None and not all(given):
        raise ValueError(f"task {task.name}: give \"data\" (train800 and val200 are drawn from it) or both "
                         "\"train800\" and \"val200\"")
    if task.data is not None and any(given):
        raise ValueError(f"task {task.name}: give either \"data\" or \"train800\" and \"val200\", not both")
    if task.data is None and task.test is None:
        raise ValueError(f"task {task.name}: with train800 and val200 given, \"test\" is needed too")


def task_splits(task: VtabTask, config: Vtab1kConfig) -> tuple[Selection, Selection, ImageSource, dict[str, Any]]:
    """(train800, val200, test source, the record written to splits.json) of one task."""
    _check_task(task)
    if task.data is None:
        train_source, val_source, test_source = (
            open_source(spec, whole_split(spec, published), classes=task.classes)
            for spec, published in ((task.train800, "train"), (task.val200, "train"), (task.test, "test")))
        train = Selection([(train_source, np.arange(len(train_source)))], f"{task.name} train800")
        val = Selection([(val_source, np.arange(len(val_source)))], f"{task.name} val200")
        record = dict(train800=dict(data=task.train800, images=len(train)), val200=dict(data=task.val200, images=len(val)))
    else:
        pool, test_source, described = open_train_eval(task.data, task.test, val_fraction=config.val_fraction,
                                                       classes=task.classes)
        need = config.train_examples + config.val_examples
        if len(pool) < need:
            raise ValueError(f"task {task.name}: {need} training examples are drawn ({config.train_examples} + "
                             f"{config.val_examples}) but {task.data} has {len(pool)} ({described['train']['split']}); "
                             "lower --train-examples / --val-examples")
        order = np.random.default_rng(config.seed).permutation(len(pool))
        picked = {"train800": order[: config.train_examples], "val200": order[config.train_examples : need]}
        train, val = (Selection([(pool, indices)], f"{task.name} {name}") for name, indices in picked.items())
        record = dict(pool=described["train"], seed=config.seed, **{
            name: dict(indices=indices.tolist(), paths=[pool.path(int(i)) for i in indices])
            for name, indices in picked.items()})
    if list(test_source.classes) != list(train.classes):
        raise ValueError(f"task {task.name}: test data classes {test_source.classes} differ from the training "
                         f"data's {train.classes}")
    _refuse_overlap(task, [train, val], test_source)
    record["test"] = dict(data=task.test or task.data, images=len(test_source))
    return train, val, test_source, record


def _refuse_overlap(task: VtabTask, training: list[Selection], test_source: ImageSource) -> None:
    """Test images that are also training images would make the test score a training score: refused, naming both."""
    seen = {os.path.normpath(part.path(index)) for part in training for index in range(len(part))}
    shared = [path for path in (os.path.normpath(test_source.path(i)) for i in range(len(test_source))) if path in seen]
    if shared:
        trained_on = task.data or f"{task.train800} + {task.val200}"
        raise ValueError(f"task {task.name}: {len(shared)} of the {len(test_source)} test images of {task.test or task.data} "
                         f"are also training images of {trained_on} (e.g. {shared[0]}); give test data of its own")


def _finetune(config: Vtab1kConfig, data: ImageSource, eval_data: ImageSource, lr: float, steps: int,
              output: Path) -> float:
    """One HyperRule run (resumed if an earlier one stopped); its top-1 on `eval_data`. A run stopped by SIGINT /
    SIGTERM stops the protocol (KeyboardInterrupt): the same command later continues from its checkpoint."""
    settings = dataclasses.replace(config.finetune, model=config.model, data=data, eval_data=eval_data,
                                   output=output, base_lr=lr, max_steps=steps, seed=config.seed,
                                   resume=(output / CHECKPOINT_NAME).is_file())
    result = finetune(settings)
    if result.interrupted is not None:
        raise Stopped(f"stopped in {output}; run the same vtab1k command again (same --output) to continue")
    return result.report.top1


def run_task(task: VtabTask, config: Vtab1kConfig, folder: Path) -> dict[str, Any]:
    """Sweep on train800 / val200, retrain the best setting on all 1,000, evaluate on the test data."""
    train, val, test_source, record = task_splits(task, config)
    folder.mkdir(parents=True, exist_ok=True)
    write_text_atomic(folder / SPLITS_NAME, json.dumps(record) + "\n")
    sweep = []
    for lr in config.learning_rates:
        for steps in config.schedules:
            top1 = _finetune(config, train, val, lr, steps, folder / "sweep" / f"lr{lr:g}-steps{steps}")
            sweep.append(dict(lr=lr, steps=steps, val_top1=top1))
            logger.info("%s: lr %g, %d steps: val200 top-1 %.2f %%", task.name, lr, steps, 100 * top1)
    best = max(sweep, key=lambda entry: entry["val_top1"])  # the first of equals
    everything = Selection([*train.parts, *val.parts], f"{task.name} train800+val200")
    test_top1 = _finetune(config, everything, test_source, best["lr"], best["steps"], folder / "final")
    return dict(name=task.name, group=task.group, sweep=sweep, chosen=dict(lr=best["lr"], steps=best["steps"]),
                test_top1=test_top1, test_images=len(test_source), train_images=len(everything),
                run=str(folder / "final"), splits=str(folder / SPLITS_NAME))


def summarise(results: list[dict[str, Any]]) -> dict[str, Any]:
    """The mean test top-1 over tasks and per group."""
    groups: dict[str, list[float]] = {}
    for result in results:
        if result["group"]:
            groups.setdefault(result["group"], []).append(result["test_top1"])
    return dict(mean=float(np.mean([r["test_top1"] for r in results])),
                groups={name: float(np.mean(values)) for name, values in groups.items()})


def is_vtab_directory(path: Path) -> bool:
    return (path / RESULTS_NAME).is_file()


def vtab1k(config: Vtab1kConfig) -> dict[str, Any]:
    """Run the protocol on every task and write vtab1k.json (after each task) in `config.output`; returns it."""
    if not config.learning_rates or not config.schedules:
        raise ValueError("the sweep needs at least one learning rate and one schedule")
    if min(config.train_examples, config.val_examples) < 1:
        raise ValueError(f"train_examples and val_examples must be >= 1, got {config.train_examples}, {config.val_examples}")
    for task in config.tasks:
        _check_task(task)
    inputs = [config.model, *(path for t in config.tasks for spec in (t.data, t.train800, t.val200, t.test)
                              for path in spec_paths(spec))]
    output = claim_output(config.output, "VTAB-1k run", is_vtab_directory, inputs, config.overwrite)
    started, results = time.perf_counter(), []
    summary: dict[str, Any] = dict(model=str(config.model), seed=config.seed, train_examples=config.train_examples,
                                   val_examples=config.val_examples, learning_rates=list(config.learning_rates),
                                   schedules=list(config.schedules), complete=False, tasks=results)
    if not (output / RESULTS_NAME).exists():  # from the start, so that a stopped protocol is recognised as one
        write_text_atomic(output / RESULTS_NAME, json.dumps(summary, indent=2) + "\n")
    advice = _SameCommandResumes()
    logger.addFilter(advice)
    try:
        for task in config.tasks:
            results.append(run_task(task, config, output / task.name))
            summary.update(summarise(results), complete=len(results) == len(config.tasks),
                           seconds=round(time.perf_counter() - started, 1))
            write_text_atomic(output / RESULTS_NAME, json.dumps(summary, indent=2) + "\n")
    finally:
        logger.removeFilter(advice)
    return summary


def table(summary: dict[str, Any]) -> str:
    """Per task: group, chosen setting, best validation and test top-1; then the group means and the mean."""
    lines = [f"{'task':<24} {'group':<12} {'lr':>7} {'steps':>6} {'val':>7} {'test':>7}"]
    for task in summary["tasks"]:
        best = max(entry["val_top1"] for entry in task["sweep"])
        lines.append(f"{printable(task['name']):<24} {printable(task['group'] or '-'):<12} {task['chosen']['lr']:>7g} "
                     f"{task['chosen']['steps']:>6} {100 * best:>6.2f}% {100 * task['test_top1']:>6.2f}%")
    for name, value in summary["groups"].items():
        lines.append(f"{'mean of ' + printable(name):<53} {100 * value:>6.2f}%")
    lines.append(f"{'mean over ' + str(len(summary['tasks'])) + ' task(s)':<53} {100 * summary['mean']:>6.2f}%")
    return "\n".join(lines)
