"""The settings of a training run, as typed configs: `FinetuneConfig` (the BiT-HyperRule) and `PretrainConfig`
(the paper's upstream recipe), both `RunSettings`. Each field carries its command-line help (`fields.option`), so
the commands are built from these classes; `check()` validates a config before anything is read or written.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any, Literal

from .. import hyperrule
from ..data import ImageSource
from ..fewshot import DEFAULT_L2, DEFAULT_SEEDS, DEFAULT_SHOTS, check_arguments
from ..fields import (
    BAD_IMAGE_HELP,
    DATA_HELP,
    DEVICE_HELP,
    TRAIN_MODEL_HELP,
    VAL_FRACTION_HELP,
    batch_split,
    fraction,
    name_list,
    non_negative_int,
    option,
    parse_classes,
    positive_int,
    positive_int_list,
)
from ..precision import PRECISIONS, check_precision
from .tracking import TRACKERS, check_trackers

BadImagePolicy = Literal["fail", "skip"]


@dataclasses.dataclass
class RunSettings:
    """Settings shared by every training recipe."""

    data: str | ImageSource = option("", DATA_HELP, metavar="SPEC", required=True)
    output: str | os.PathLike = option("", "run directory (metrics, model, report, plots, checkpoint)",
                                       metavar="RUN_DIR", required=True)
    classes: Sequence[int | str] | None = option(None, "keep only these classes of the data, relabelled 0..k-1, "
                                                 "e.g. 5-9 or 0,1,2 or Sandal,Shirt", parse=parse_classes,
                                                 metavar="LIST")
    eval_data: str | ImageSource | None = option(
        None, "evaluation data, used whole (default: --val-fraction of each class of --data held out; Fashion-MNIST "
        "and CIFAR use their published test split)", metavar="SPEC")
    val_fraction: float = option(0.2, VAL_FRACTION_HELP, parse=fraction, metavar="F")
    batch_size: int = option(512, "global batch size (default %(default)s)", parse=positive_int)
    batch_split: int | str = option(
        "auto", "compute each batch in N micro-batches (same result, 1/N of the activation memory); auto (the "
        "default): the fewest that fit the memory this process may use, measured on a small probe",
        parse=batch_split, metavar="N|auto")
    max_steps: int | None = option(None, "train for N optimizer steps (the whole learning-rate schedule is scaled "
                                   "to fit)", parse=positive_int, metavar="N")
    seed: int = option(0, "seeds the initialisation of a variant, the data order, crops, flips and MixUp, and which "
                       "--shots examples are drawn (default %(default)s)", parse=int)
    resize: int | None = option(None, "training squash-resize before the random crop (default: the HyperRule's)",
                                parse=positive_int, metavar="PX")
    crop: int | None = option(None, "training crop and evaluation size (default: the HyperRule's)",
                              parse=positive_int, metavar="PX")
    save_every: int = option(0, "checkpoint every N steps (always at the end and on SIGINT / SIGTERM)",
                             parse=non_negative_int, metavar="N")
    eval_every: int = option(0, "evaluate every N steps, recorded in metrics.jsonl (always at the end)",
                             parse=non_negative_int, metavar="N")
    resume: bool = option(False, "continue the run in --output from its checkpoint")
    on_bad_image: BadImagePolicy = option("fail", BAD_IMAGE_HELP, choices=("fail", "skip"))
    device: str | None = option(None, DEVICE_HELP)
    precision: str = option("auto", "auto: bf16 (or fp16) mixed precision on GPUs, fp32 on CPUs; bf16 also runs on "
                            "CPUs (fast with AVX512-BF16 or AMX); fp16 needs a GPU", choices=PRECISIONS)
    workers: int = option(0, "data loading processes (default %(default)s: load in the training process)",
                          parse=non_negative_int)
    gradient_checkpointing: bool = option(False, "recompute activations in the backward pass: less memory")
    compile: bool = option(False, "compile the training step with TorchInductor (the first step and the first "
                           "evaluation compile for a minute or more; see the README's speed section for when it pays)")
    progress: bool = option(True, "no progress: no bar on a terminal, no progress lines in a log")
    plots: bool = option(True, "write no PNG plots")
    log_every: int = 1  # steps between metrics.jsonl records
    overwrite: bool = option(False, "start the run in --output again (its previous files are replaced), or write "
                             "into an existing folder that is not a run directory")
    report_to: Sequence[str] = option((), f"also log the metrics to {', '.join(TRACKERS)} (comma-separated; "
                                      "tensorboard writes RUN_DIR/tensorboard, wandb runs offline, mlflow to "
                                      "RUN_DIR/mlruns unless configured)", parse=name_list, metavar="LIST")

    # Fields whose change would make a resumed run compute something else.
    RESUME_FIELDS = ("model", "data", "classes", "eval_data", "val_fraction", "batch_size", "max_steps", "seed",
                     "resize", "crop")

    def check(self) -> None:
        """ValueError naming the first setting that cannot work (ImportError for a tracker's missing package)."""
        if not str(self.output):
            raise ValueError("an output directory is required")
        if Path(self.output).exists() and not Path(self.output).is_dir():
            raise ValueError(f"output {self.output} is a file: a run needs a directory (new or a previous run's)")
        if isinstance(self.data, ImageSource) and self.eval_data is None:
            raise ValueError("data is an ImageSource object: pass the evaluation set as eval_data too")
        if not (isinstance(self.batch_size, int) and self.batch_size >= 1):
            raise ValueError(f"batch_size must be an integer >= 1, got {self.batch_size!r}")
        if self.batch_split != "auto" and not (isinstance(self.batch_split, int) and self.batch_split >= 1):
            raise ValueError(f"batch_split must be 'auto' or an integer >= 1, got {self.batch_split!r}")
        if not (isinstance(self.val_fraction, (int, float)) and 0 <= self.val_fraction < 1):
            raise ValueError(f"val_fraction must lie in [0, 1), got {self.val_fraction!r}")
        if self.max_steps is not None and self.max_steps < 1:
            raise ValueError(f"max_steps must be >= 1, got {self.max_steps}")
        check_trackers(self.report_to)
        if self.on_bad_image not in ("fail", "skip"):
            raise ValueError(f"on_bad_image must be 'fail' or 'skip', got {self.on_bad_image!r}")
        check_precision(self.precision)

    def signature(self) -> dict[str, Any]:
        """The settings a resumed run must share with its checkpoint (JSON-ready)."""
        values = dataclasses.asdict(self)
        signature = {}
        for name in self.RESUME_FIELDS:
            value = values[name]
            signature[name] = list(value) if isinstance(value, (tuple, range)) else value
            if not isinstance(signature[name], (str, int, float, bool, list, type(None))):
                signature[name] = repr(signature[name])
        return json.loads(json.dumps(signature))


def _check_number(name: str, value: float | None, low: float, inclusive: bool) -> None:
    if value is not None and not (math.isfinite(value) and (value >= low if inclusive else value > low)):
        raise ValueError(f"{name} must be a finite number {'>=' if inclusive else '>'} {low:g}, got {value}")


@dataclasses.dataclass
class FinetuneConfig(RunSettings):
    """Transfer a BiT model to `data` with the BiT-HyperRule (see DESIGN.md and `bigtransfer.hyperrule`).

    `model` is a transformers-layout directory, a hub id (`google/bit-50`) or a variant name (`tiny`,
    `BiT-M-R50x1`: random initialisation). The head is always replaced by a zero-initialised one sized for the
    data's classes. SGD with momentum 0.9 and no weight decay; linear warmup then /10 steps at the rule's
    boundaries; `max_steps` rescales the whole schedule (warmup and decays) to that many steps; MixUp with one
    lambda per optimizer step (alpha from the rule unless `mixup_alpha` is given); `shots` trains on that many
    examples per class chosen with `seed`; `freeze_backbone` trains the head only (a linear probe).
    """

    model: str = option("BiT-M-R50x1", TRAIN_MODEL_HELP, metavar="SOURCE", required=True)
    base_lr: float = option(hyperrule.DEFAULT_BASE_LR, "peak learning rate (default %(default)s)", parse=float)
    shots: int | None = option(None, "train on K examples per class (chosen with --seed)", parse=positive_int,
                               metavar="K")
    preset: hyperrule.Preset = option("code", "HyperRule tables: code (the released code's, default) or paper (its "
                                      "schedules: decays at 30, 60, 90 %%)", choices=sorted(hyperrule.PRESETS))
    freeze_backbone: bool = option(False, "train the head only (a linear probe)")
    mixup_alpha: float | None = option(None, "override the rule's MixUp alpha (0 disables)", parse=float)

    RESUME_FIELDS = (*RunSettings.RESUME_FIELDS, "base_lr", "shots", "preset", "freeze_backbone", "mixup_alpha")

    def check(self) -> None:
        super().check()
        if self.shots is not None and self.shots < 1:
            raise ValueError(f"shots must be >= 1, got {self.shots}")
        _check_number("base_lr", self.base_lr, 0.0, inclusive=False)
        _check_number("mixup_alpha", self.mixup_alpha, 0.0, inclusive=True)


@dataclasses.dataclass
class PretrainConfig(RunSettings):
    """Upstream pre-training with the paper's recipe.

    SGD momentum 0.9, lr `base_lr * batch_size / 256` (0.03 per 256 images), linear warmup over `warmup_steps`
    (default 5 % of training), weight decay 1e-4, /10 decays at 30, 60 and 80 % of training, `epochs` passes over
    the data (or `max_steps`), softmax or sigmoid cross-entropy. `model` is a variant name (random init) or a
    directory to continue from. With `fewshot_every`, big_vision's few-shot linear evaluation (see
    `bigtransfer.fewshot`) runs every that many steps and at the end, recorded in metrics.jsonl as
    fewshot_<k>shot; it has no effect on training.
    """

    model: str = option("BiT-M-R50x1", TRAIN_MODEL_HELP + " (default %(default)s)", metavar="SOURCE")
    batch_size: int = option(4096, "global batch size (default %(default)s)", parse=positive_int)
    epochs: float = option(90.0, "passes over the data (default %(default)s; --max-steps wins)", parse=float)
    base_lr: float = option(hyperrule.UPSTREAM_BASE_LR, "learning rate per 256 images (default %(default)s)",
                            parse=float)
    warmup_steps: int | None = option(None, "linear warmup steps (default 5 %% of training)",
                                      parse=non_negative_int)
    weight_decay: float = option(1e-4, "L2 weight decay of SGD (default %(default)s)", parse=float)
    loss: Literal["softmax", "sigmoid"] = option("softmax", "cross-entropy kind", choices=("softmax", "sigmoid"))
    fewshot_every: int = option(0, "every N steps and at the end, the few-shot linear evaluator (bigtransfer "
                                "fewshot) on --fewshot-data, logged to metrics.jsonl and fewshot.png (default 0: "
                                "never)", parse=non_negative_int, metavar="N")
    fewshot_data: str | ImageSource | None = option(
        None, "data for it: support sets from its training part, tested on its test split or the held-out "
        f"--val-fraction; {DATA_HELP}", metavar="SPEC")
    fewshot_shots: Sequence[int] = option(DEFAULT_SHOTS, "examples per class (default "
                                          f"{','.join(map(str, DEFAULT_SHOTS))})", parse=positive_int_list,
                                          metavar="LIST")
    fewshot_seeds: int = option(DEFAULT_SEEDS, "support sets drawn with seeds 0..N-1 (default %(default)s)",
                                parse=positive_int, metavar="N")

    RESUME_FIELDS = (*RunSettings.RESUME_FIELDS, "base_lr", "epochs", "warmup_steps", "weight_decay", "loss")

    def check(self) -> None:
        super().check()
        if not self.max_steps and not (math.isfinite(self.epochs) and self.epochs > 0):
            raise ValueError(f"epochs must be a finite number > 0, got {self.epochs}")
        _check_number("base_lr", self.base_lr, 0.0, inclusive=False)
        _check_number("weight_decay", self.weight_decay, 0.0, inclusive=True)
        if self.fewshot_every:
            if self.fewshot_data is None:
                raise ValueError("fewshot_every needs fewshot_data (--fewshot-data): the data the few-shot "
                                 "evaluator draws its support and test sets from")
            check_arguments(self.fewshot_shots, self.fewshot_seeds, DEFAULT_L2)


@dataclasses.dataclass(frozen=True)
class DistillPreset:
    """One of the paper's distillation settings (big_vision configs/proj/distill): Adam, these rates, gradient
    clipping at 1.0, linear warmup then cosine decay to zero. `warmup_steps` of `reference_steps` (`epochs` over the
    paper's `examples` at `batch_size`) give the warmup's share of training, kept when the schedule is scaled."""

    lr: float
    weight_decay: float  # big_vision's: decoupled, scaled by the schedule but not by lr, on kernels only
    temperature: float
    epochs: float
    batch_size: int
    crop: int
    warmup_steps: int
    examples: int  # training images of the paper's data set

    @property
    def warmup_fraction(self) -> float:
        return self.warmup_steps / (self.epochs * self.examples / self.batch_size)


# bit_i1k.py (ImageNet train[:98%]) and bigsweep_flowers_pet.py (Pets train[:90%], Flowers train).
DISTILL_PRESETS = {
    "imagenet": DistillPreset(0.03, 3e-4, 1.0, 1200, 4096, 224, 5000, 1_255_544),
    "pets-fast": DistillPreset(0.01, 1e-3, 5.0, 1000, 512, 128, 1500, 3312),
    "pets-medium": DistillPreset(0.003, 3e-4, 10.0, 3000, 512, 128, 1500, 3312),
    "pets-long": DistillPreset(0.003, 1e-5, 2.0, 30_000, 512, 128, 1500, 3312),
    "flowers-fast": DistillPreset(0.003, 3e-4, 10.0, 10_000, 512, 128, 1500, 1020),
    "flowers-medium": DistillPreset(0.001, 1e-4, 1.0, 100_000, 512, 128, 1500, 1020),
    "flowers-long": DistillPreset(0.0003, 1e-5, 1.0, 1_000_000, 512, 128, 1500, 1020),
}
TEACHER_VIEWS = ("consistent", "fixed", "independent")


def _preset_help() -> str:
    rows = [f"{name} (lr {p.lr:g}, wd {p.weight_decay:g}, T {p.temperature:g}, {p.epochs:g} epochs, batch "
            f"{p.batch_size}, crop {p.crop}, warmup {100 * p.warmup_fraction:.1f} %%)" for name, p in DISTILL_PRESETS.items()]
    return ("the paper's setting the defaults below come from (big_vision configs/proj/distill): " + "; ".join(rows)
            + "; default %(default)s")


@dataclasses.dataclass
class DistillConfig(RunSettings):
    """Distil one or several frozen teachers into a student by function matching (Beyer et al. 2022, "Knowledge
    distillation: a good teacher is patient and consistent"; see DESIGN.md).

    Every training image gets one inception crop and flip, and MixUp (Beta(`mixup_alpha`, `mixup_alpha`), every
    step) mixes it once; the student and every teacher see that very view (each at its own resolution, resized
    from the same crop). The loss is `temperature`² KL(teacher || student) at `temperature`, against the mean of
    the teachers' softmaxes, plus `label_weight` x the label cross-entropy. Adam with decoupled weight decay,
    gradient clipping at 1.0, linear warmup and cosine decay, `epochs` passes over the data (or `max_steps`);
    `None` values come from `preset`. `teacher_views` "fixed" and "independent" are the paper's weaker baselines.
    `student` is a variant name (random weights) or a checkpoint; its head is sized to the teachers' classes.
    """

    teacher: Sequence[str] = option((), "the teacher: a model directory, hub id, Google name or .npz / timm file; "
                                    "several, comma-separated, are an ensemble (the mean of their softmaxes, as in "
                                    "the paper)", parse=name_list, metavar="SOURCE[,SOURCE]", required=True)
    student: str = option("", TRAIN_MODEL_HELP + "; its head is sized to the teacher's classes (the paper: R50x1 "
                          "from scratch)", metavar="SOURCE|VARIANT", required=True)
    preset: str = option("imagenet", _preset_help(), choices=sorted(DISTILL_PRESETS))
    batch_size: int | None = option(None, "global batch size (default: the preset's; the paper: 4096 on ImageNet, "
                                    "512 on Pets and Flowers)", parse=positive_int)
    crop: int | None = option(None, "the student's inception crop and evaluation size (default: the preset's; the "
                              "paper: 224 on ImageNet, 160 for its faster student, 128 on Pets and Flowers)",
                              parse=positive_int, metavar="PX")
    teacher_crop: int | None = option(None, "the teachers' resolution, resized from the student's crop (default: "
                                      "--crop; the paper's best ImageNet teacher ran at 384 for a 224 student)",
                                      parse=positive_int, metavar="PX")
    epochs: float | None = option(None, "passes over the data (default: the preset's; the paper: 1,200 on ImageNet, "
                                  "and on Pets up to 30,000: patience pays); --max-steps wins", parse=float)
    lr: float | None = option(None, "peak Adam learning rate (default: the preset's; ImageNet 0.03)", parse=float)
    weight_decay: float | None = option(None, "decoupled weight decay of the kernels, scaled by the schedule, as "
                                        "big_vision's wd (default: the preset's; ImageNet 3e-4)", parse=float)
    warmup_steps: int | None = option(None, "linear warmup steps (default: the preset's share of training; ImageNet "
                                      "5,000 of 368k steps)", parse=non_negative_int)
    temperature: float | None = option(None, "softmax temperature T of the KL loss, scaled by T² (default: the "
                                       "preset's; the paper's ImageNet run and function matching use 1; timm's "
                                       "generic distillation uses 4)", parse=float)
    label_weight: float = option(0.0, "weight of a label cross-entropy added to the KL (default 0: the paper "
                                 "uses no label loss; timm's generic distillation does)", parse=float)
    mixup_alpha: float = option(1.0, "MixUp Beta(alpha, alpha) on every step (default 1: the paper's uniform "
                                "mixing ratio; 0 disables)", parse=float)
    teacher_views: str = option("consistent", "consistent: teacher and student see the same crop, flip and mix "
                                "(function matching); the paper's weaker baselines: fixed (the teacher sees the "
                                "un-augmented image, its predictions mixed as the images are) and independent "
                                "(teacher and student get separate crops and flips; same MixUp)",
                                choices=TEACHER_VIEWS)

    RESUME_FIELDS = (*(name for name in RunSettings.RESUME_FIELDS if name not in ("model", "resize")), "teacher",
                     "student", "preset", "teacher_crop", "epochs", "lr", "weight_decay", "warmup_steps",
                     "temperature", "label_weight", "mixup_alpha", "teacher_views")

    def __post_init__(self):
        if isinstance(self.teacher, str):  # one source given as a string
            self.teacher = (self.teacher,)
        if self.batch_size is None and self.preset in DISTILL_PRESETS:
            self.batch_size = DISTILL_PRESETS[self.preset].batch_size

    def resolved_preset(self) -> DistillPreset:
        """The preset with this config's own values put in."""
        preset = DISTILL_PRESETS[self.preset]
        given = dict(lr=self.lr, weight_decay=self.weight_decay, temperature=self.temperature, epochs=self.epochs,
                     crop=self.crop)
        return dataclasses.replace(preset, **{key: value for key, value in given.items() if value is not None})

    def check(self) -> None:
        if self.preset not in DISTILL_PRESETS:
            raise ValueError(f"preset must be one of {', '.join(DISTILL_PRESETS)}, got {self.preset!r}")
        super().check()
        if not self.teacher or not all(isinstance(name, str) and name for name in self.teacher):
            raise ValueError(f"teacher must name one or more models, got {self.teacher!r}")
        if not (isinstance(self.student, str) and self.student):
            raise ValueError("student must name a model or a variant (e.g. tiny, R50x1)")
        if self.resize is not None:
            raise ValueError("resize does not apply to distillation: its inception crop takes any part of the image "
                             "and resizes it to crop")
        if self.teacher_views not in TEACHER_VIEWS:
            raise ValueError(f"teacher_views must be one of {', '.join(TEACHER_VIEWS)}, got {self.teacher_views!r}")
        for name in ("lr", "temperature"):
            _check_number(name, getattr(self, name), 0.0, inclusive=False)
        for name in ("weight_decay", "label_weight", "mixup_alpha"):
            _check_number(name, getattr(self, name), 0.0, inclusive=True)
        if not self.max_steps:
            _check_number("epochs", self.epochs, 0.0, inclusive=False)
