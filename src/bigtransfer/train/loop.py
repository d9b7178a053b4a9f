"""Fine-tuning with the BiT-HyperRule and upstream pre-training: the training loop.

`finetune` and `pretrain` (the commands of the same names) are one call each::

    from bigtransfer.train import FinetuneConfig, finetune
    result = finetune(FinetuneConfig(model="runs/upstream/model", data="fashion-mnist", output="runs/ft",
                                     classes=[5, 6, 7, 8, 9], shots=10, max_steps=100, batch_size=64))
    result.report.top1

What a run directory holds (only rank 0 writes; every file is written atomically except the append-only log):
`metrics.jsonl` (one record per step: step, loss, lr, images/s, epoch, seconds; and evaluation records),
`model/` (config.json, model.safetensors, preprocessor_config.json: loadable here and by transformers),
`report.json` (top-1, top-5, loss, per-class accuracy, confusion matrix, skipped images), the PNG plots,
`checkpoint.safetensors` (model, optimizer, step, RNG states and the run's settings, for `resume`),
`run.json` (the settings) and, while running, `.lock`. The checkpoint, the lock and stopping on a signal are
`bigtransfer.run_state`; the torch.distributed helpers are `bigtransfer.distributed`; weights are loaded by
`bigtransfer.checkpoints.loader`, and the run's evaluation is `bigtransfer.inference.evaluate_dataset`.

Reproducibility: the order of examples is a function of (seed, epoch), each example's augmentation of
(seed, epoch, position) and MixUp of (seed, step), so a resumed run replays exactly what an uninterrupted one
would have done, and a global batch is the same whether one process or N (DistributedDataParallel under
`torchrun`) computes it: each rank takes a contiguous shard of every global batch, and micro-batches
(`batch_split`) only bound memory.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import logging
import math
import os
import shutil
import time
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from . import hub, hyperrule, machine
from .checkpoints import loader
from .checkpoints.writers import save_transformers
from .config import BitConfig, is_variant, variant_names
from .data import (
    EvalTransform,
    ImageSource,
    TrainTransform,
    TransformedDataset,
    check_shots,
    collate_skip_bad,
    few_shot_indices,
    open_train_eval,
    spec_paths,
)
from .distributed import Context, all_gather, all_sum, barrier, cuda_devices, distributed, gather_paths
from .errors import OutOfMemoryError, SourceNotFoundError
from .fewshot import DEFAULT_L2, DEFAULT_SEEDS, DEFAULT_SHOTS, check_arguments, evaluate_representation
from .files import atomic_directory, claim_output, read_json, write_text_atomic
from .inference import (
    PRECISIONS,
    BadImagePolicy,
    bad_image_policy,
    evaluate_dataset,
    precision_autocast,
    squash_processor,
)
from .modeling import BitForImageClassification
from .processing import BIT_MEAN, BIT_STD
from .report import (
    METRICS_NAME,
    PLOT_NAMES,
    REPORT_NAME,
    EvaluationReport,
    plot_run,
    progress_bar,
    read_metrics,
    write_report,
)
from .run_state import (  # the checkpoint names and RunLockedError are public here too
    CHECKPOINT_NAME,
    LOCK_NAME,  # noqa: F401 (re-exported)
    RunLock,
    RunLockedError,  # noqa: F401 (re-exported)
    StopSignals,
    load_run_state,
    remove_stale_temporaries,
    restore_run_state,
    save_run_state,
)
from .tracking import Trackers, check_trackers

logger = logging.getLogger("bigtransfer")

MODEL_DIRNAME = "model"
RUN_NAME = "run.json"



class NonFiniteLossError(RuntimeError):
    """The training loss became NaN or infinite; the run stopped without taking that step."""


# ---------------------------------------------------------------------------------------------------------------
# Settings.


@dataclasses.dataclass
class _RunSettings:
    """Settings shared by fine-tuning and pre-training."""

    data: str | ImageSource = ""
    output: str | os.PathLike = ""
    classes: Sequence[int | str] | None = None  # keep only these classes of the data, relabelled 0..k-1
    eval_data: str | ImageSource | None = None  # evaluated whole; default: `val_fraction` of `data` held out
    val_fraction: float = 0.2  # without eval_data: the share of each class of `data` held out for evaluation
    batch_size: int = 512
    batch_split: int | str = "auto"  # micro-batches per step: same result, 1/batch_split of the activation memory;
    # "auto": the fewest that fit the memory this process may use (measured on a probe, see machine.py)
    max_steps: int | None = None
    seed: int = 0
    resize: int | None = None  # training squash-resize ("precrop"); default from the HyperRule
    crop: int | None = None  # training crop and evaluation size; default from the HyperRule
    save_every: int = 0  # steps between checkpoints (0: only at the end and on SIGINT/SIGTERM)
    eval_every: int = 0  # steps between evaluations recorded in metrics.jsonl (0: only at the end)
    resume: bool = False
    on_bad_image: BadImagePolicy = "fail"
    device: str | None = None  # default: cuda when available (cuda:LOCAL_RANK under torchrun), else cpu
    precision: str = "auto"  # one of inference.PRECISIONS; auto: bf16 autocast on GPUs that have it, fp16 on other GPUs, fp32 on CPU; bf16 runs on CPUs too
    workers: int = 0  # DataLoader worker processes (0: load in the training process)
    gradient_checkpointing: bool = False
    compile: bool = False  # compile the training step (prepare_for_training): same losses to rounding, see README
    progress: bool = True
    plots: bool = True
    log_every: int = 1  # steps between metrics.jsonl records
    overwrite: bool = False  # write into an existing folder that is not a run, or start an existing run afresh
    report_to: Sequence[str] = ()  # also log metrics to these trackers: tensorboard, wandb, mlflow (see tracking.py)


@dataclasses.dataclass
class FinetuneConfig(_RunSettings):
    """Transfer a BiT model to `data` with the BiT-HyperRule (see DESIGN.md and `bigtransfer.hyperrule`).

    `model` is a transformers-layout directory, a hub id (`google/bit-50`) or a variant name (`tiny`,
    `BiT-M-R50x1`: random initialisation). The head is always replaced by a zero-initialised one sized for the
    data's classes. SGD with momentum 0.9 and no weight decay; linear warmup then /10 steps at the rule's
    boundaries; `max_steps` rescales the whole schedule (warmup and decays) to that many steps; MixUp with one
    lambda per optimizer step (alpha from the rule unless `mixup_alpha` is given); `shots` trains on that many
    examples per class chosen with `seed`; `freeze_backbone` trains the head only (a linear probe).
    """

    model: str = "BiT-M-R50x1"
    base_lr: float = hyperrule.DEFAULT_BASE_LR
    shots: int | None = None
    preset: hyperrule.Preset = "code"
    freeze_backbone: bool = False
    mixup_alpha: float | None = None


@dataclasses.dataclass
class PretrainConfig(_RunSettings):
    """Upstream pre-training with the paper's recipe.

    SGD momentum 0.9, lr `base_lr * batch_size / 256` (0.03 per 256 images), linear warmup over `warmup_steps`
    (default 5 % of training), weight decay 1e-4, /10 decays at 30, 60 and 80 % of training, `epochs` passes over
    the data (or `max_steps`), softmax or sigmoid cross-entropy. `model` is a variant name (random init) or a
    directory to continue from.
    """

    model: str = "BiT-M-R50x1"
    batch_size: int = 4096
    epochs: float = 90.0
    base_lr: float = hyperrule.UPSTREAM_BASE_LR
    warmup_steps: int | None = None
    weight_decay: float = 1e-4
    loss: Literal["softmax", "sigmoid"] = "softmax"
    # Few-shot linear evaluation (bigtransfer.fewshot, big_vision's) every `fewshot_every` steps and at the end,
    # recorded in metrics.jsonl as fewshot_<k>shot (mean over seeds); support sets from the training part of
    # `fewshot_data`, tested on its test part (chosen as for eval_data-less runs). No effect on training.
    fewshot_every: int = 0
    fewshot_data: str | ImageSource | None = None
    fewshot_shots: Sequence[int] = DEFAULT_SHOTS
    fewshot_seeds: int = DEFAULT_SEEDS


@dataclasses.dataclass
class RunResult:
    """What a training run produced. `interrupted` is the signal number that stopped it early, or None."""

    output_dir: Path
    steps: int
    total_steps: int
    seconds: float
    report: EvaluationReport | None = None
    model_dir: Path | None = None
    interrupted: int | None = None
    skipped_images: list[str] = dataclasses.field(default_factory=list)


# Fields whose change would make a resumed run compute something else.
_RESUME_FIELDS = (
    "model", "data", "classes", "eval_data", "val_fraction", "batch_size", "max_steps", "seed", "resize", "crop", "base_lr",
    "shots", "preset", "freeze_backbone", "mixup_alpha", "epochs", "warmup_steps", "weight_decay", "loss",
)


# ---------------------------------------------------------------------------------------------------------------
# Library entry points.


def finetune(config: FinetuneConfig) -> RunResult:
    """Fine-tune with the BiT-HyperRule and write a run directory; see `FinetuneConfig` and the module doc.

    Returns a RunResult (interrupted runs return early with a checkpoint saved). Raises ValueError for bad
    settings, NonFiniteLossError when the loss diverges, RunLockedError when the output is in use.
    """
    _check_settings(config)
    with distributed(config.device) as context:
        source, eval_source, evaluated = _open_data(config)
        indices = (
            few_shot_indices(source.labels, config.shots, config.seed, source.classes)
            if config.shots else np.arange(len(source))
        )
        size = len(indices)
        model, mean, std = _training_model(config.model, source.classes, config.seed, fine_tune=True)
        precrop, crop = _resolution(config, source, config.model)
        schedule = hyperrule.schedule(size, config.preset)
        total = config.max_steps or schedule[-1]
        scale = schedule[-1] / total  # the rule's schedule stretched or squeezed to `total` steps

        def learning_rate(step: int) -> float | None:
            return hyperrule.lr(step * scale, size, config.base_lr, config.preset)

        if config.freeze_backbone:
            for parameter in model.bit.parameters():
                parameter.requires_grad_(False)
        alpha = hyperrule.mixup_alpha(size) if config.mixup_alpha is None else config.mixup_alpha
        job = _Job(
            settings=config, kind="finetune", model=model, source=source, indices=indices, eval_source=eval_source,
            precrop=precrop, crop=crop, mean=mean, std=std, total_steps=total, learning_rate=learning_rate,
            weight_decay=0.0, mixup_alpha=alpha, loss="softmax", context=context,
            description=dict(schedule=[round(b / scale, 3) for b in schedule], mixup_alpha=alpha, examples=size),
            evaluated=evaluated,
        )
        return _run(job)


def pretrain(config: PretrainConfig) -> RunResult:
    """Pre-train (upstream) with the paper's recipe and write a run directory; see `PretrainConfig`."""
    _check_settings(config)
    if not config.max_steps and not (math.isfinite(config.epochs) and config.epochs > 0):
        raise ValueError(f"epochs must be a finite number > 0, got {config.epochs}")
    with distributed(config.device) as context:
        source, eval_source, evaluated = _open_data(config)
        model, mean, std = _training_model(config.model, source.classes, config.seed, fine_tune=False)
        precrop, crop = _resolution(config, source, config.model)
        total = config.max_steps or max(1, math.ceil(config.epochs * len(source) / config.batch_size))
        warmup = config.warmup_steps if config.warmup_steps is not None else round(0.05 * total)
        if not 0 <= warmup < total:
            raise ValueError(f"warmup_steps must lie in [0, {total}), got {warmup}")

        def learning_rate(step: int) -> float | None:
            return hyperrule.upstream_lr(step, total, config.batch_size, warmup, config.base_lr)

        fewshot_sets = _fewshot_sets(config, crop, mean, std) if config.fewshot_every else None

        job = _Job(
            settings=config, kind="pretrain", model=model, source=source, indices=np.arange(len(source)),
            eval_source=eval_source, precrop=precrop, crop=crop, mean=mean, std=std, total_steps=total,
            learning_rate=learning_rate, weight_decay=config.weight_decay, mixup_alpha=0.0, loss=config.loss,
            context=context,
            description=dict(schedule=hyperrule.upstream_schedule(total, warmup), examples=len(source)),
            evaluated=evaluated, fewshot_sets=fewshot_sets,
        )
        return _run(job)


def prepare_for_training(model: nn.Module, channels_last: bool = True, compile: bool = False) -> nn.Module:
    """Put `model` (in place) in the form that trains fastest: channels_last weights, so every convolution and
    GroupNorm runs NHWC whatever the input layout, and with `compile` its forward and backward compiled by
    TorchInductor (`nn.Module.compile`: the module itself, so its parameters, state_dict and saving are
    unchanged). Parameters keep their identity (create the optimizer before or after) and values; losses and
    gradients equal the default form's up to rounding. A compiled model compiles on its first step (about a
    minute for R50x1 on two CPU cores), again for a new batch shape, and for evaluation; whether it pays depends
    on the machine (`bigtransfer bench` times both).

    Returns:
        `model`, for chaining.
    """
    if channels_last:
        model.to(memory_format=torch.channels_last)
    if compile:
        model.compile()
    return model


# ---------------------------------------------------------------------------------------------------------------
# Models, data and preprocessing.


def _check_settings(config: _RunSettings) -> None:
    if not str(config.output):
        raise ValueError("an output directory is required")
    if Path(config.output).exists() and not Path(config.output).is_dir():
        raise ValueError(f"output {config.output} is a file: a run needs a directory (new or a previous run's)")
    if isinstance(config.data, ImageSource) and config.eval_data is None:
        raise ValueError("data is an ImageSource object: pass the evaluation set as eval_data too")
    if not (isinstance(config.batch_size, int) and config.batch_size >= 1):
        raise ValueError(f"batch_size must be an integer >= 1, got {config.batch_size!r}")
    if config.batch_split != "auto" and not (isinstance(config.batch_split, int) and config.batch_split >= 1):
        raise ValueError(f"batch_split must be 'auto' or an integer >= 1, got {config.batch_split!r}")
    if not (isinstance(config.val_fraction, (int, float)) and 0 <= config.val_fraction < 1):
        raise ValueError(f"val_fraction must lie in [0, 1), got {config.val_fraction!r}")
    if config.max_steps is not None and config.max_steps < 1:
        raise ValueError(f"max_steps must be >= 1, got {config.max_steps}")
    check_trackers(config.report_to)
    if config.on_bad_image not in ("fail", "skip"):
        raise ValueError(f"on_bad_image must be 'fail' or 'skip', got {config.on_bad_image!r}")
    if config.precision not in PRECISIONS:
        raise ValueError(f"precision must be {', '.join(PRECISIONS)}, got {config.precision!r}")
    if getattr(config, "fewshot_every", 0):
        if config.fewshot_data is None:
            raise ValueError("fewshot_every needs fewshot_data (--fewshot-data): the data the few-shot evaluator "
                             "draws its support and test sets from")
        check_arguments(config.fewshot_shots, config.fewshot_seeds, DEFAULT_L2)
    if getattr(config, "shots", None) is not None and config.shots < 1:
        raise ValueError(f"shots must be >= 1, got {config.shots}")
    for name, low, inclusive in (("base_lr", 0.0, False), ("weight_decay", 0.0, True), ("mixup_alpha", 0.0, True)):
        value = getattr(config, name, None)
        if value is not None and not (math.isfinite(value) and (value >= low if inclusive else value > low)):
            raise ValueError(f"{name} must be a finite number {'>=' if inclusive else '>'} {low:g}, got {value}")


def _open_data(config: _RunSettings) -> tuple[ImageSource, ImageSource, dict[str, Any]]:
    """(training source, evaluation source, which images are evaluated): see `data.open_train_eval`."""
    source, eval_source, described = open_train_eval(config.data, config.eval_data, val_fraction=config.val_fraction,
                                                     classes=config.classes)
    if len(source.classes) == 1 and int(os.environ.get("RANK", "0")) == 0:
        logger.warning("the training data has one class (%s): every prediction will be that class and accuracy "
                       "will read 100 %%; a classifier needs two or more classes (sub-folders)", source.classes[0])
    return source, eval_source, described["test"]


def _fewshot_sets(config: PretrainConfig, crop: int, mean, std) -> tuple[TransformedDataset, TransformedDataset]:
    """The few-shot evaluator's support pool and test set, preprocessed as the run evaluates (squash to `crop`)."""
    pool, test, _ = open_train_eval(config.fewshot_data, val_fraction=config.val_fraction)
    check_shots(pool.labels, max(config.fewshot_shots), pool.classes, f"--fewshot-data {config.fewshot_data}")
    transform = EvalTransform(crop, mean, std)
    policy = bad_image_policy(config.on_bad_image)
    return (TransformedDataset(pool, transform, on_bad_image=policy),
            TransformedDataset(test, transform, on_bad_image=policy))


def _is_random_init(name: str, google_names_are_weights: bool) -> bool:
    """Whether `--model` names an architecture to build at random rather than weights to load.

    Variant names (`tiny`, `R50x1`, `BiT-S-R50x1`) build at random; for fine-tuning, Google's checkpoint names
    (`BiT-M-R50x1`, `BiT-S-R101x3-ILSVRC2012`) mean their pretrained weights, as in the original code.
    """
    if Path(name).exists() or (google_names_are_weights and hub.is_google_name(name)):
        return False
    return is_variant(name)


def _seeded_init(build: Callable[[], nn.Module], seed: int) -> nn.Module:
    """Build a model with weights drawn from `seed`, leaving the caller's global RNG untouched."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return build()


def _name_labels(config: BitConfig, classes: Sequence[str]) -> None:
    """Name a freshly built head's classes (loaded heads are named by the loader)."""
    config.id2label = {index: str(name) for index, name in enumerate(classes)}
    config.label2id = {str(name): index for index, name in enumerate(classes)}


def _training_model(name: str, classes: Sequence[str], seed: int, fine_tune: bool):
    """(model with a head for `classes`, mean, std): a variant at random (seeded), or loaded weights of any format.

    Fine-tuning always starts from a zero-initialised head (BiT), even when the old head had the same shape.
    """
    if _is_random_init(name, google_names_are_weights=fine_tune):
        config = BitConfig.from_variant(name, num_labels=len(classes))
        model = _seeded_init(lambda: BitForImageClassification(config), seed)
        if fine_tune:  # the recipe's zero head, as a loaded model gets it
            nn.init.zeros_(model.classifier[1].weight)
            nn.init.zeros_(model.classifier[1].bias)
        mean, std = BIT_MEAN, BIT_STD
        _name_labels(model.config, classes)
    else:
        checkpoint = _read_weights(name)
        # float32 master weights (--precision autocasts); a pre-training run continues with its own head.
        model = loader.build(BitForImageClassification, checkpoint, labels=list(classes), new_head=fine_tune)
        model.float()
        # A directory says how it was trained; converted files (timm, .npz, original code) all expect [-1, 1].
        processor = checkpoint.preprocessor_config or {}
        mean = tuple(processor.get("image_mean", BIT_MEAN))
        std = tuple(processor.get("image_std", BIT_STD))
    model.config.problem_type = "single_label_classification"
    return model.train(), mean, std


def _read_weights(name: str):
    """loader.read, with the variant names (random weights) among what a missing name could have been."""
    try:
        return loader.read(name)
    except SourceNotFoundError:
        if loader.looks_local(name) or hub.is_google_name(name):
            raise
        architectures = ["tiny", *dict.fromkeys(key.split("-")[-1] for key in variant_names() if key != "tiny")]
        also = f", a variant name for random weights ({', '.join(architectures)})"
        raise SourceNotFoundError(loader.missing_source_message(name, also, (*variant_names(), *architectures))) from None


def _resolution(config: _RunSettings, source: ImageSource, model_name: str) -> tuple[int, int]:
    """(precrop, crop): the HyperRule's for the data's image size unless `resize` / `crop` are given."""
    if config.resize is not None and config.crop is not None:
        precrop, crop = config.resize, config.crop
    else:
        height, width = source.image_size()
        rule_precrop, rule_crop = hyperrule.resolution(
            height, width, getattr(config, "preset", "code"), model_name if isinstance(model_name, str) else None
        )
        crop = config.crop or rule_crop
        precrop = config.resize or max(crop, round(rule_precrop * crop / rule_crop))
    if not 0 < crop <= precrop:
        raise ValueError(f"need 0 < crop <= resize, got crop {crop} and resize {precrop}")
    return precrop, crop


# ---------------------------------------------------------------------------------------------------------------
# Which examples each step sees.


class BatchPlan:
    """The examples of every optimizer step, as `(epoch, position)` keys of a TransformedDataset.

    The data is an endless stream of per-epoch permutations (permutation `e` drawn from `(seed, e)`); step `s`
    takes stream items `[s * batch_size, (s + 1) * batch_size)`. Rank `r` of `world_size` takes the `r`-th
    contiguous shard of that global batch and splits it into `batch_split` micro-batches.
    """

    def __init__(self, num_examples: int, batch_size: int, seed: int, world_size: int = 1, rank: int = 0,
                 batch_split: int = 1):
        if num_examples < 1:
            raise ValueError("no training examples")
        if batch_size % (world_size * batch_split):
            raise ValueError(
                f"batch_size {batch_size} must be divisible by processes x batch_split = {world_size} x {batch_split}"
            )
        self.num_examples, self.batch_size, self.seed = num_examples, batch_size, seed
        self.world_size, self.rank, self.batch_split = world_size, rank, batch_split
        self.per_rank = batch_size // world_size
        self.micro_batch_size = self.per_rank // batch_split
        self._permutations: dict[int, np.ndarray] = {}

    def permutation(self, epoch: int) -> np.ndarray:
        if epoch not in self._permutations:
            if len(self._permutations) > 4:
                self._permutations.pop(min(self._permutations))
            self._permutations[epoch] = np.random.default_rng([self.seed, epoch]).permutation(self.num_examples)
        return self._permutations[epoch]

    def global_batch(self, step: int) -> list[tuple[int, int]]:
        start = step * self.batch_size
        keys = []
        for item in range(start, start + self.batch_size):
            epoch, offset = divmod(item, self.num_examples)
            keys.append((epoch, int(self.permutation(epoch)[offset])))
        return keys

    def micro_batches(self, step: int) -> list[list[tuple[int, int]]]:
        """This rank's micro-batches of `step`, in order."""
        keys = self.global_batch(step)[self.rank * self.per_rank : (self.rank + 1) * self.per_rank]
        size = self.micro_batch_size
        return [keys[index : index + size] for index in range(0, len(keys), size)]

    def micro_batch_offset(self, index: int) -> int:
        """Position in the global batch where this rank's micro-batch `index` starts."""
        return self.rank * self.per_rank + index * self.micro_batch_size

    def epoch(self, steps: int) -> float:
        return steps * self.batch_size / self.num_examples


class _StepSampler(torch.utils.data.Sampler):
    """Yields this rank's micro-batches of keys for steps `start..total-1`: a DataLoader `batch_sampler`."""

    def __init__(self, plan: BatchPlan, start: int, total: int):
        self.plan, self.start, self.total = plan, start, total

    def __iter__(self):
        for step in range(self.start, self.total):
            yield from self.plan.micro_batches(step)

    def __len__(self) -> int:
        return (self.total - self.start) * self.plan.batch_split


def _mixup(seed: int, step: int, alpha: float) -> float | None:
    """The step's MixUp lambda ~ Beta(alpha, alpha), shared by all its micro-batches; None without MixUp."""
    if alpha <= 0:
        return None
    return float(np.random.default_rng([seed, 0x6D6978, step]).beta(alpha, alpha))


def _mixup_partners(seed: int, step: int, offset: int, count: int) -> torch.Tensor:
    """Which image each image of a micro-batch is mixed with; fixed by its place in the global batch."""
    return torch.from_numpy(np.random.default_rng([seed, 0x706172, step, offset]).permutation(count))


# ---------------------------------------------------------------------------------------------------------------
# The loop.


@dataclasses.dataclass
class _Job:
    settings: _RunSettings
    kind: str
    model: BitForImageClassification
    source: ImageSource
    indices: np.ndarray
    eval_source: ImageSource
    precrop: int
    crop: int
    mean: tuple[float, ...]
    std: tuple[float, ...]
    total_steps: int
    learning_rate: Callable[[int], float | None]
    weight_decay: float
    mixup_alpha: float
    loss: str
    context: Context
    description: dict[str, Any]
    evaluated: dict[str, Any] = dataclasses.field(default_factory=dict)  # which images the evaluation uses
    batch_split: int = 1  # as chosen when the loop is set up (the settings may say "auto")
    fewshot_sets: tuple[TransformedDataset, TransformedDataset] | None = None  # (support pool, test) for fewshot_every


def run_signature(settings: _RunSettings) -> dict[str, Any]:
    """The settings a resumed run must share with its checkpoint (JSON-ready)."""
    values = dataclasses.asdict(settings)
    signature = {}
    for name in _RESUME_FIELDS:
        if name in values:
            value = values[name]
            signature[name] = list(value) if isinstance(value, (tuple, range)) else value
            if not isinstance(signature[name], (str, int, float, bool, list, type(None))):
                signature[name] = repr(signature[name])
    return json.loads(json.dumps(signature))


def _loss_sum(logits: torch.Tensor, labels: torch.Tensor, kind: str) -> torch.Tensor:
    """Per-image losses of a micro-batch, summed: softmax cross-entropy or sigmoid cross-entropy (summed over classes)."""
    logits = logits.float()
    if kind == "sigmoid":
        targets = F.one_hot(labels, logits.shape[-1]).to(logits.dtype)
        return F.binary_cross_entropy_with_logits(logits, targets, reduction="sum")
    return F.cross_entropy(logits, labels, reduction="sum")


def _out_of_memory_message(loop: _Loop, requested: int) -> str:
    plan, device = loop.plan, loop.job.context.device
    available = machine.available_memory(device)
    return (
        f"out of memory with micro-batches of {plan.micro_batch_size} images"
        + (f": {machine.human_size(requested)} could not be allocated" if requested else "")
        + (f" ({machine.human_size(available)} free on {device.type} now)" if available is not None else "")
        + f"; raise --batch-split (e.g. {plan.batch_split * 2}) or pass --gradient-checkpointing (the global batch "
        "and the result stay the same), or lower --crop"
    )


def _run(job: _Job) -> RunResult:
    settings, context = job.settings, job.context
    # Every rank checks (so a refusal stops them all, not only rank 0); rank 0 creates the directory.
    output = claim_output(settings.output, "bigtransfer run directory", is_run_directory, _inputs(settings),
                          settings.overwrite, create=context.is_main)
    barrier(context)
    lock = RunLock(output) if context.is_main else contextlib.nullcontext()
    with lock, StopSignals() as signals, torch.random.fork_rng(devices=cuda_devices(context)):
        if context.is_main:  # holds the lock: no live process writes these files
            remove_stale_temporaries(output, (CHECKPOINT_NAME, RUN_NAME, METRICS_NAME, MODEL_DIRNAME))
            if settings.overwrite and not settings.resume:
                _remove_run_files(output)
        barrier(context)
        torch.manual_seed(settings.seed + context.rank)  # only stochastic layers (drop path) draw from it
        return _loop(job, output, signals)


RUN_FILES = (CHECKPOINT_NAME, RUN_NAME, METRICS_NAME, REPORT_NAME, MODEL_DIRNAME, *PLOT_NAMES)


def is_run_directory(path: Path) -> bool:
    """Whether `path` is a directory a run wrote: its run.json describes a finetune or pretrain run, or it holds
    nothing but a run's lock (a run stopped before writing anything)."""
    names = {entry.name for entry in path.iterdir()}
    if names <= {LOCK_NAME}:
        return True
    try:
        description = read_json(path / RUN_NAME)
    except (OSError, ValueError):
        return False
    return description.get("kind") in ("finetune", "pretrain") and isinstance(description.get("settings"), dict)


def _inputs(settings: _RunSettings) -> list[Any]:
    """The local paths a run reads (the model, the data), which its output must not be, hold or lie in."""
    model = getattr(settings, "model", None)
    return [model, *spec_paths(settings.data), *spec_paths(settings.eval_data)]


def _remove_run_files(output: Path) -> None:
    """--overwrite: the previous run's files go, so the new run starts afresh (nothing else is touched)."""
    for name in RUN_FILES:
        path = output / name
        if path.is_dir() and not path.is_symlink():
            shutil.rmtree(path)
        else:
            path.unlink(missing_ok=True)


@dataclasses.dataclass
class _Loop:
    """What the loop carries from step to step, in one process: the optimizer and its scaler, which examples each
    step sees, where the run resumed, and the open metrics log and progress bar (rank 0 only)."""

    job: _Job
    output: Path
    network: nn.Module  # the model, or its DistributedDataParallel wrapper
    optimizer: torch.optim.Optimizer
    scaler: torch.amp.GradScaler
    autocast: Any
    plan: BatchPlan
    signature: dict[str, Any]
    has_checkpoint: bool
    start_step: int = 0
    skipped: list[str] = dataclasses.field(default_factory=list)
    elapsed_before: float = 0.0
    started: float = dataclasses.field(default_factory=time.perf_counter)
    batches: Iterator | None = None
    metrics_file: Any = None
    progress: Any = None
    trackers: Trackers = dataclasses.field(default_factory=lambda: Trackers((), Path(), {}, 0))

    @property
    def checkpoint_path(self) -> Path:
        return self.output / CHECKPOINT_NAME

    def seconds(self) -> float:
        """Training time so far, the resumed run's included."""
        return self.elapsed_before + time.perf_counter() - self.started

    def record(self, values: dict[str, Any]) -> None:
        """A metrics.jsonl line (rank 0), and the same values to the trackers `report_to` names."""
        if self.metrics_file is not None:
            self.metrics_file.write(json.dumps(values) + "\n")
            self.metrics_file.flush()
        self.trackers.log(values)


def _loop(job: _Job, output: Path, signals: StopSignals) -> RunResult:
    """setup -> resume -> (step -> record -> maybe save) until done or stopped -> finish."""
    loop = _setup(job, output)
    _resume(loop)
    _open_streams(loop)
    try:
        return _train(loop, signals)
    finally:
        loop.trackers.close()


def _train(loop: _Loop, signals: StopSignals) -> RunResult:
    job, step = loop.job, loop.start_step
    try:
        for step in range(loop.start_step, job.total_steps):
            lr = job.learning_rate(step)
            if lr is None:
                break
            started = time.perf_counter()
            mean_loss, images, stop = _step(loop, step, lr, signals)
            done = step + 1
            _record(loop, done, mean_loss, lr, images / max(time.perf_counter() - started, 1e-9))
            if stop:
                return _stopped(loop, done, int(signals.received or stop))
            if job.settings.save_every and done % job.settings.save_every == 0 and done < job.total_steps:
                _save(loop, done)
        else:
            step = job.total_steps
    except (RuntimeError, MemoryError) as error:
        requested = machine.failed_allocation(error)
        if requested is not None and not isinstance(error, NonFiniteLossError):
            raise OutOfMemoryError(_out_of_memory_message(loop, requested)) from error
        raise
    finally:
        _close_streams(loop)
    return _finish(loop, max(step, loop.start_step))


def _setup(job: _Job, output: Path) -> _Loop:
    """The model on its device, the optimizer, the precision, and the plan of which examples each step sees."""
    settings, context, model = job.settings, job.context, job.model
    model.to(context.device)
    if settings.gradient_checkpointing:
        model.gradient_checkpointing_enable()
    parameters = [parameter for parameter in model.parameters() if parameter.requires_grad]
    optimizer = torch.optim.SGD(parameters, lr=0.0, momentum=hyperrule.MOMENTUM, weight_decay=job.weight_decay)
    use_scaler = context.device.type == "cuda" and (
        settings.precision == "fp16" or (settings.precision == "auto" and not torch.cuda.is_bf16_supported())
    )
    autocast = precision_autocast(context.device, settings.precision)
    job.batch_split = _batch_split(job, autocast)
    if settings.compile:  # after the memory probe, which would otherwise compile for its own shape; before DDP
        prepare_for_training(model, compile=True)  # the form the bench times: channels_last, compiled
    network = model
    if context.world_size > 1:
        network = nn.parallel.DistributedDataParallel(
            model, device_ids=[context.device.index] if context.device.type == "cuda" else None
        )
    plan = BatchPlan(len(job.indices), settings.batch_size, settings.seed, context.world_size, context.rank,
                     job.batch_split)
    return _Loop(job, output, network, optimizer, torch.amp.GradScaler("cuda", enabled=use_scaler), autocast, plan,
                 dict(run_signature(settings), data_fingerprint=job.source.fingerprint()),
                 has_checkpoint=(output / CHECKPOINT_NAME).is_file())


def _batch_split(job: _Job, autocast: Any) -> int:
    """`batch_split`, or for "auto" the fewest micro-batches whose step fits this process's memory (the largest
    over the processes, so that every rank runs the same plan); says what it chose."""
    settings, context = job.settings, job.context
    if settings.batch_split != "auto":
        return settings.batch_split
    per_process = settings.batch_size // context.world_size
    need = machine.step_memory(job.model, job.crop, context.device, autocast)
    available = machine.available_memory(context.device)
    split = max(all_gather(context, machine.fit_batch_split(per_process, need, available)))
    if context.is_main:
        logger.info(
            "batch %d %s (a step needs about %s; %s available%s); --batch-split N sets it",
            settings.batch_size,
            "in one pass" if split == 1 else f"as {split} micro-batches of {per_process // split}",
            machine.human_size(need.for_micro_batch(per_process // split)), "?" if available is None else machine.human_size(available),
            f", per process of {context.world_size}" if context.world_size > 1 else "",
        )
    return split


def _resume(loop: _Loop) -> None:
    """Continue from the run's checkpoint (refusing one whose settings differ), or start fresh; write run.json."""
    job, output, context = loop.job, loop.output, loop.job.context
    if loop.has_checkpoint and not job.settings.resume:
        raise ValueError(
            f"{output} already holds a run ({CHECKPOINT_NAME}); pass --resume to continue it, --overwrite to start "
            "it again, or choose another --output"
        )
    if loop.has_checkpoint:
        tensors, state = load_run_state(loop.checkpoint_path)
        stored, signature = state["signature"], loop.signature
        # A key the checkpoint lacks was not recorded by the version that wrote it; it cannot be compared.
        differing = {key for key in set(signature) | set(stored)
                     if signature.get(key) != stored.get(key) and key in stored}
        if differing:
            changes = ", ".join(f"{key}: {stored.get(key)!r} -> {signature.get(key)!r}" for key in sorted(differing))
            raise ValueError(f"cannot resume {output}: settings differ from the checkpoint's ({changes})")
        restore_run_state(tensors, state, job.model, loop.optimizer, loop.scaler)
        loop.start_step, loop.skipped, loop.elapsed_before = state["step"], list(state["skipped_images"]), state["seconds"]
        if context.is_main:
            logger.info("resuming %s at step %d of %d", output, loop.start_step, job.total_steps)
    elif job.settings.resume and context.is_main:
        logger.info("nothing to resume in %s: starting a new run", output)
    if context.is_main:
        _truncate_metrics(output / METRICS_NAME, loop.start_step)
        write_text_atomic(output / RUN_NAME, json.dumps(_run_description(job), indent=2, default=str) + "\n")


def _open_streams(loop: _Loop) -> None:
    """The training batches from the resumed step on, the metrics log and the progress bar."""
    job, settings, context = loop.job, loop.job.settings, loop.job.context
    train_set = TransformedDataset(  # JPEGs decoded at the reduced size the squash to `precrop` allows
        job.source, TrainTransform(job.precrop, job.crop, job.mean, job.std), job.indices, seed=settings.seed,
        on_bad_image=bad_image_policy(settings.on_bad_image), min_size=(job.precrop, job.precrop),
    )
    loader = torch.utils.data.DataLoader(
        train_set, batch_sampler=_StepSampler(loop.plan, loop.start_step, job.total_steps),
        collate_fn=collate_skip_bad, num_workers=settings.workers, pin_memory=context.device.type == "cuda",
        generator=torch.Generator().manual_seed(settings.seed),  # keeps the global RNG untouched
        persistent_workers=False,
    )
    loop.batches = iter(loader)
    loop.progress = progress_bar(settings.progress and context.is_main, job.total_steps, loop.start_step, job.kind)
    if context.is_main:
        metrics = loop.output / METRICS_NAME
        if metrics.is_symlink():  # appending would write wherever it points
            raise ValueError(f"{metrics} is a symbolic link; a run writes its own metrics.jsonl")
        loop.metrics_file = open(metrics, "a", encoding="utf-8")
        loop.trackers = Trackers(settings.report_to, loop.output, _run_description(job), loop.start_step)


def _close_streams(loop: _Loop) -> None:
    if loop.progress is not None:
        loop.progress.close()
    if loop.metrics_file is not None:
        loop.metrics_file.close()
    loop.batches = None  # ends the DataLoader's workers


def _step(loop: _Loop, step: int, lr: float, signals: StopSignals) -> tuple[float, float, float]:
    """One optimizer step on the global batch: (mean loss, images seen, the stop signal any rank received)."""
    job, settings, context, optimizer, scaler = loop.job, loop.job.settings, loop.job.context, loop.optimizer, loop.scaler
    for group in optimizer.param_groups:
        group["lr"] = lr
    lam = _mixup(settings.seed, step, job.mixup_alpha)
    loss_sum, good, step_skipped = _train_step(loop, step, lam)
    loss_total, good_total, skipped_total, stop = all_sum(
        context, [loss_sum, float(good), float(len(step_skipped)), float(signals.received or 0)]
    )
    loop.skipped.extend(gather_paths(context, step_skipped) if skipped_total else [])
    if good_total == 0:
        raise RuntimeError(f"every image of step {step} was unreadable (skipped {int(skipped_total)})")
    mean_loss = loss_total / good_total
    if not math.isfinite(mean_loss):
        optimizer.zero_grad(set_to_none=True)
        raise NonFiniteLossError(_non_finite_message(mean_loss, step, lr, loop.checkpoint_path))
    if scaler.is_enabled():
        scaler.unscale_(optimizer)
    if good_total < settings.batch_size:  # unreadable images skipped: average over the ones seen
        for group in optimizer.param_groups:
            for parameter in group["params"]:
                if parameter.grad is not None:
                    parameter.grad.mul_(settings.batch_size / good_total)
    scaler.step(optimizer) if scaler.is_enabled() else optimizer.step()
    if scaler.is_enabled():
        scaler.update()
    optimizer.zero_grad(set_to_none=True)
    return mean_loss, good_total, stop


def _record(loop: _Loop, done: int, mean_loss: float, lr: float, images_per_second: float) -> None:
    """The step's line in metrics.jsonl and the progress bar; an evaluation when `eval_every` says so."""
    job, settings = loop.job, loop.job.settings
    if done % settings.log_every == 0 or done == job.total_steps:
        loop.record(dict(step=done, loss=mean_loss, lr=lr, images_per_second=images_per_second,
                         epoch=round(loop.plan.epoch(done), 4), seconds=round(loop.seconds(), 3)))
    if loop.progress is not None:
        loop.progress.update(1)
        loop.progress.set_postfix_str(f"loss={mean_loss:.4f} lr={lr:.2e} img/s={images_per_second:.0f}", refresh=False)
    if settings.eval_every and done % settings.eval_every == 0 and done < job.total_steps:
        with _rng_untouched(job.context.device):
            report = _evaluate_job(job, job.model)
        loop.record(dict(step=done, eval_top1=report.top1, eval_top5=report.top5, eval_loss=report.loss))
        job.model.train()
    if job.fewshot_sets is not None and (done % settings.fewshot_every == 0 or done == job.total_steps):
        _record_fewshot(loop, done)


def _rng_untouched(device: torch.device):
    """Side evaluations leave torch's random streams as they found them (a DataLoader draws its seed from the
    global generator), so training with and without them, and resumed or not, takes the same steps."""
    return torch.random.fork_rng(devices=[device] if device.type == "cuda" else [])


def _record_fewshot(loop: _Loop, done: int) -> None:
    """Few-shot linear accuracy of the current backbone, in metrics.jsonl as fewshot_<k>shot and in the log."""
    job, settings = loop.job, loop.job.settings
    with _rng_untouched(job.context.device):
        report = evaluate_representation(job.model.bit, *job.fewshot_sets, job.context,
                                         shots=settings.fewshot_shots, seeds=settings.fewshot_seeds,
                                         batch_size=_evaluation_batch(job))
    means = {f"fewshot_{shots}shot": report.mean(shots) for shots in report.shots}
    loop.record(dict(step=done, **means, fewshot_seconds=round(report.feature_seconds + report.solve_seconds, 3)))
    if job.context.is_main:
        logger.info("step %d: few-shot linear top-1 %s", done,
                    ", ".join(f"{shots}-shot {100 * report.mean(shots):.1f} %" for shots in report.shots))


def _save(loop: _Loop, step: int) -> None:
    """The training checkpoint after `step`, written by rank 0; every rank waits for it."""
    job, context = loop.job, loop.job.context
    # A finite loss can still be followed by an update that overflows the weights: never save those over the
    # last good checkpoint (every rank holds the same weights, so every rank stops here together).
    if not all(torch.isfinite(parameter).all() for parameter in job.model.parameters()):
        raise NonFiniteLossError(
            f"the weights became NaN or infinite by step {step}; stopped without saving them; "
            + _kept_checkpoint(loop.checkpoint_path) + ". Try a lower --base-lr or --precision fp32"
        )
    if context.is_main:
        state = dict(step=step, total_steps=job.total_steps, kind=job.kind, signature=loop.signature,
                     skipped_images=loop.skipped, seconds=loop.seconds(), epoch=loop.plan.epoch(step))
        save_run_state(loop.checkpoint_path, job.model, loop.optimizer, state, loop.scaler)
    barrier(context)


def _stopped(loop: _Loop, done: int, signal_number: int) -> RunResult:
    """A signal stopped the run: save the checkpoint, say how to resume."""
    _save(loop, done)
    if loop.job.context.is_main:
        logger.warning("stopped by signal %d at step %d; resume with --resume", signal_number, done)
    return RunResult(loop.output, done, loop.job.total_steps, loop.seconds(), interrupted=signal_number,
                     skipped_images=loop.skipped)


def _finish(loop: _Loop, completed: int) -> RunResult:
    """The last checkpoint, the evaluation, and the run's model/, report.json and plots."""
    job, context, output = loop.job, loop.job.context, loop.output
    if completed > loop.start_step or not loop.has_checkpoint:
        _save(loop, completed)
    model_dir = output / MODEL_DIRNAME
    if context.is_main:  # the model before its evaluation, so an evaluation that fails leaves the model saved
        job.model.eval()
        with atomic_directory(model_dir) as written:  # config, weights and processor replace the old as one
            save_transformers(job.model, written)
            squash_processor(job.crop, job.mean, job.std).save_pretrained(written)
    report = _evaluate_job(job, job.model)
    report.skipped_images = sorted(set(loop.skipped) | set(report.skipped_images))
    report.step = completed
    loop.trackers.log(dict(step=completed, eval_top1=report.top1, eval_top5=report.top5, eval_loss=report.loss))
    if context.is_main:
        write_report(report, output / REPORT_NAME)
        if job.settings.plots:
            plot_run(output, report)
    barrier(context)
    return RunResult(output, completed, job.total_steps, loop.seconds(), report, model_dir,
                     skipped_images=report.skipped_images)


def _train_step(loop: _Loop, step: int, lam: float | None) -> tuple[float, int, list[str]]:
    """Forward and backward over this rank's micro-batches of `step`; gradients accumulate (synced on the last)."""
    job, network, model, plan, scaler = loop.job, loop.network, loop.job.model, loop.plan, loop.scaler
    context = job.context
    loss_sum, good, skipped = 0.0, 0, []
    # Scale so that DDP's average over ranks of the per-rank sums is the mean over the whole global batch.
    scale = context.world_size / job.settings.batch_size
    for index in range(plan.batch_split):
        images, labels, bad = next(loop.batches)
        skipped.extend(sample.path for sample in bad)
        last = index == plan.batch_split - 1
        sync = contextlib.nullcontext() if last or context.world_size == 1 else network.no_sync()
        with sync:
            if len(labels) == 0:
                if context.world_size > 1 and last:
                    # DDP must still all-reduce on the last micro-batch: contribute zero gradients.
                    zero = sum(p.sum() * 0.0 for p in model.parameters() if p.requires_grad)
                    zero.backward()
                continue
            images = images.to(context.device, non_blocking=True)
            labels = labels.to(context.device, non_blocking=True)
            with loop.autocast:
                if lam is not None:
                    partners = _mixup_partners(job.settings.seed, step, plan.micro_batch_offset(index), len(labels))
                    partners = partners.to(context.device)
                    images = lam * images + (1 - lam) * images[partners]
                logits = network(images).logits
            if lam is not None:
                loss = lam * _loss_sum(logits, labels, job.loss) + (1 - lam) * _loss_sum(
                    logits, labels[partners], job.loss
                )
            else:
                loss = _loss_sum(logits, labels, job.loss)
            scaled = loss * scale
            (scaler.scale(scaled) if scaler.is_enabled() else scaled).backward()
            loss_sum += float(loss.detach())
            good += len(labels)
    return loss_sum, good, skipped


def _non_finite_message(loss: float, step: int, lr: float, checkpoint_path: Path) -> str:
    return (
        f"the training loss became {loss} at step {step + 1} (lr {lr:.3g}); stopped without taking that step; "
        f"{_kept_checkpoint(checkpoint_path)}. Try a lower --base-lr or --precision fp32"
    )


def _kept_checkpoint(checkpoint_path: Path) -> str:
    if checkpoint_path.is_file():
        return f"the last good checkpoint is {checkpoint_path} (resume from it with --resume)"
    return "no checkpoint was saved before it"


def _truncate_metrics(path: Path, steps: int) -> None:
    """Drop records past the checkpoint (written by a run that was killed after it) so steps never repeat."""
    if not path.is_file():
        return
    kept = [record for record in read_metrics(path) if record.get("step", 0) <= steps]
    if steps == 0:
        kept = []
    write_text_atomic(path, "".join(json.dumps(record) + "\n" for record in kept))


def _run_description(job: _Job) -> dict[str, Any]:
    settings = dataclasses.asdict(job.settings)
    settings["data"] = str(job.settings.data)
    settings["eval_data"] = None if job.settings.eval_data is None else str(job.settings.eval_data)
    return dict(
        kind=job.kind, settings=settings, batch_split=job.batch_split, total_steps=job.total_steps,
        resize=job.precrop, crop=job.crop,
        mean=list(job.mean), std=list(job.std), weight_decay=job.weight_decay, classes=list(job.source.classes),
        world_size=job.context.world_size, torch=torch.__version__, **job.description,
    )


# ---------------------------------------------------------------------------------------------------------------
# Evaluation.


def _evaluation_batch(job: _Job) -> int:
    """Images per forward pass in the run's evaluations: one training micro-batch per process, at least 32."""
    return max(job.settings.batch_size // job.batch_split // job.context.world_size, 32)


def _evaluate_job(job: _Job, model: nn.Module) -> EvaluationReport:
    settings = job.settings
    dataset = TransformedDataset(
        job.eval_source, EvalTransform(job.crop, job.mean, job.std), on_bad_image=bad_image_policy(settings.on_bad_image)
    )
    report = evaluate_dataset(model, dataset, _evaluation_batch(job), job.context, precision=settings.precision,
                              progress=settings.progress)
    report.data = dict(job.evaluated)
    return report
