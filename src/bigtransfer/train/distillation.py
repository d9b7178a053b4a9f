"""Distillation by function matching (Beyer et al. 2022, "Knowledge distillation: a good teacher is patient and
consistent"), as a recipe of the training loop: `distill_recipe(DistillConfig, source, context)` and the
measurements its evaluations add (`DistillMeasure`).

Consistency is by construction: the training transform (`DistillViews`) returns every view an example needs as one
tensor, the loop's MixUp mixes that tensor once, and the student and the teachers are fed slices of the mixed result,
each resized on the device to its own resolution. With `teacher_views="consistent"` there is one view, so both see
the same inception crop, flip and mix; "independent" adds a second crop and flip for the teachers, "fixed" the
un-augmented image (whose teacher predictions are then mixed as the images were): the paper's weaker baselines.

The teachers are frozen: loaded in eval mode, folded into `optimize()`'s inference form (no gradient, the run's
reduced precision where it has one) and never checkpointed; only the student and its optimizer are.
"""

from __future__ import annotations

import dataclasses
import math
import time
from collections.abc import Sequence
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from ..checkpoints import loader
from ..data import EvalTransform, ImageSource
from ..data.transforms import InceptionCropTransform
from ..distributed import Context, all_sum
from ..inference.evaluate import inference_batches, processed_dataset
from ..inference.speed import OptimizedModel, optimize
from ..modeling import BitForImageClassification
from ..precision import REDUCED_PRECISION, resolve
from ..processing import BIT_MEAN, BIT_STD, BitImageProcessor
from .recipe import Mix, Recipe, training_model
from .settings import DistillConfig


def kl_divergence_sum(student_logits: torch.Tensor, teacher_probabilities: torch.Tensor,
                      temperature: float = 1.0) -> torch.Tensor:
    """T² KL(teacher || student) at temperature T, summed over the images: `teacher_probabilities` are the
    teachers' softmax at T (their mean for an ensemble), the student's logits are divided by T here. The T² keeps
    the gradient's scale independent of T (Hinton et al.; big_vision's `dist(kind="kl")`)."""
    log_student = F.log_softmax(student_logits.float() / temperature, dim=-1)
    p = teacher_probabilities.float()
    return temperature**2 * (torch.xlogy(p, p) - p * log_student).sum()


def resized(images: torch.Tensor, size: int) -> torch.Tensor:
    """(B, 3, H, W) resized to (size, size), bilinear with antialiasing (a no-op at that size already)."""
    if images.shape[-2:] == (size, size):
        return images
    return F.interpolate(images, size=(size, size), mode="bilinear", antialias=True, align_corners=False)


@dataclasses.dataclass(frozen=True)
class DistillViews:
    """The training transform: `(views, 3, size, size)` per image, view 0 the student's (an inception crop and
    flip) and, for "independent", view 1 a second crop and flip for the teachers, for "fixed" the whole image
    squashed (un-augmented). `size` is the largest resolution a model needs; each is resized from it."""

    size: int
    mean: tuple[float, ...]
    std: tuple[float, ...]
    teacher_views: str = "consistent"

    def __post_init__(self):
        object.__setattr__(self, "crop", InceptionCropTransform(self.size, self.mean, self.std))
        object.__setattr__(self, "whole", EvalTransform(self.size, self.mean, self.std))

    def __call__(self, image, generator: torch.Generator) -> torch.Tensor:
        views = [self.crop(image, generator)]
        if self.teacher_views == "independent":
            views.append(self.crop(image, generator))
        elif self.teacher_views == "fixed":
            views.append(self.whole(image))
        return torch.stack(views)


class Teachers:
    """Frozen teachers in their inference form: `probabilities(images, temperature)` is the mean of their
    softmaxes on images normalised with the student's mean and std (renormalised here for a teacher trained with
    others), at `crop` pixels."""

    def __init__(self, models: Sequence[OptimizedModel], means: Sequence[tuple[float, ...]],
                 stds: Sequence[tuple[float, ...]], crop: int, student_mean: Sequence[float],
                 student_std: Sequence[float]):
        self.models, self.crop = list(models), crop
        device = self.models[0].device
        column = dict(device=device, dtype=torch.float32)
        # x_teacher = (x_student * std_s + mean_s - mean_t) / std_t, per channel.
        self._affine = [
            ((torch.tensor(student_std, **column) / torch.tensor(std, **column)).view(1, 3, 1, 1),
             ((torch.tensor(student_mean, **column) - torch.tensor(mean, **column)) / torch.tensor(std, **column)
              ).view(1, 3, 1, 1))
            for mean, std in zip(means, stds, strict=True)
        ]

    def probabilities(self, images: torch.Tensor, temperature: float = 1.0) -> torch.Tensor:
        """(B, classes) mean teacher softmax at `temperature`; an ordinary tensor autograd may use as a target."""
        images = resized(images.float(), self.crop)
        with torch.inference_mode():
            total = None
            for model, (scale, shift) in zip(self.models, self._affine, strict=True):
                logits = model(images * scale + shift).logits.float()
                probabilities = F.softmax(logits / temperature, dim=-1)
                total = probabilities if total is None else total + probabilities
            mean = total / len(self.models)
        return mean.clone()  # out of inference mode: a tensor autograd may save

    def parameters(self):
        """Every teacher's parameters (all frozen)."""
        for model in self.models:
            yield from model.model.parameters()


def load_teachers(sources: Sequence[str], device: torch.device, precision: str,
                  compile: bool) -> tuple[list[OptimizedModel], list[tuple], list[tuple], list[str]]:
    """(inference-form teachers, their means, their stds, their class names): each source loaded with its own
    head; all must have the same classes."""
    models, means, stds, classes = [], [], [], None
    dtype = REDUCED_PRECISION.get(resolve(device, precision))
    for source in sources:
        checkpoint = loader.read(source)
        model = loader.build(BitForImageClassification, checkpoint).float()
        names = [model.config.id2label[index] for index in range(model.config.num_labels)]
        if classes is not None and names != classes:
            raise ValueError(f"teacher {source} has classes {_shown(names)} but teacher {sources[0]} has "
                             f"{_shown(classes)}: an ensemble needs the same classes in the same order")
        classes = names
        processor = checkpoint.preprocessor_config or {}
        means.append(tuple(processor.get("image_mean", BIT_MEAN)))
        stds.append(tuple(processor.get("image_std", BIT_STD)))
        models.append(optimize(model, device=device, dtype=dtype, compile="auto" if compile else False,
                               micro_batch=None, inplace=True))
    return models, means, stds, classes


def _shown(names: Sequence[str]) -> str:
    return ", ".join(map(str, names[:6])) + (f", ... ({len(names)})" if len(names) > 6 else "")


def check_classes(teacher_classes: Sequence[str], data_classes: Sequence[str], source: str) -> None:
    """The data must be labelled as the teachers are (same names, same order; unnamed heads: the same count)."""
    data = [str(name) for name in data_classes]
    unnamed = all(name == f"LABEL_{index}" for index, name in enumerate(teacher_classes))
    if len(teacher_classes) != len(data) or not (unnamed or list(teacher_classes) == data):
        raise ValueError(f"the teacher {source} predicts {len(teacher_classes)} classes ({_shown(teacher_classes)}) "
                         f"but --data has {len(data)} ({_shown(data)}); distil on data labelled as the teacher is "
                         "(--classes selects and orders classes)")


@dataclasses.dataclass(kw_only=True)
class DistillRecipe(Recipe):
    """Function matching on the loop: the student's loss is KL to the teachers on the very view it sees."""

    teachers: Teachers
    temperature: float
    label_weight: float
    teacher_views: str
    peak_lr: float
    decay: float  # big_vision's wd: per step, decay x schedule x weight on kernels
    teacher_seconds: float = 0.0  # of the current step
    timing: dict[str, float] = dataclasses.field(default_factory=lambda: dict(steps=0, teacher=0.0, student=0.0))

    def train_transform(self) -> DistillViews:
        size = max(self.crop, self.teachers.crop)
        return DistillViews(size, self.mean, self.std, self.teacher_views)

    def decode_size(self) -> int | None:
        return None  # an inception crop may take 5 % of the image: decode it whole

    def optimizer(self) -> torch.optim.Optimizer:
        """Adam with decoupled weight decay on the kernels (convolution and dense weights), as big_vision's
        `scale_by_adam` + `wd`: AdamW multiplies its decay by the step's lr, so it gets `decay / peak_lr`."""
        parameters = [p for p in self.model.parameters() if p.requires_grad]
        kernels = [p for p in parameters if p.ndim > 1]
        others = [p for p in parameters if p.ndim <= 1]
        groups = [dict(params=kernels, weight_decay=self.decay / self.peak_lr), dict(params=others, weight_decay=0.0)]
        return torch.optim.AdamW([group for group in groups if group["params"]], lr=0.0)

    def micro_batch_loss(self, network: nn.Module, images: torch.Tensor, labels: torch.Tensor, mix: Mix | None,
                         autocast) -> torch.Tensor:
        """KL of the student to the teachers on the mixed views (one mix for every view), plus the label term."""
        fixed = self.teacher_views == "fixed"
        mixed = images if mix is None else mix.apply(images if not fixed else images[:, :1])
        teacher_view = images[:, 1] if fixed else mixed[:, -1]
        started = _synchronized_clock(images.device)
        targets = self.teachers.probabilities(teacher_view, self.temperature)
        if fixed and mix is not None:  # predictions on the un-augmented images, mixed as those images were
            targets = mix.apply(targets)
        self.teacher_seconds += _synchronized_clock(images.device) - started
        student_view = resized(mixed[:, 0], self.crop)  # in float32, as the data: autocast is for the network
        with autocast:
            logits = network(student_view).logits
        loss = kl_divergence_sum(logits, targets, self.temperature)
        if self.label_weight:
            loss = loss + self.label_weight * self.loss_sum(logits, labels, mix)
        return loss

    def step_record(self, seconds: float) -> dict[str, Any]:
        """The step's time split: the teachers' forward passes and the rest (the student's step, data included)."""
        teacher, self.teacher_seconds = self.teacher_seconds, 0.0
        self.timing["steps"] += 1
        self.timing["teacher"] += teacher
        self.timing["student"] += seconds - teacher
        return dict(teacher_seconds=round(teacher, 5), student_seconds=round(seconds - teacher, 5))


def _synchronized_clock(device: torch.device) -> float:
    if device.type == "cuda":  # kernels run asynchronously: time what has finished
        torch.cuda.synchronize(device)
    return time.perf_counter()


def warmup_cosine(peak: float, warmup: int, total: int):
    """lr(step): linear from 0 over `warmup` steps, then cosine to 0 at `total`; None from `total` on (big_vision's
    `warmup_steps` + `decay_type="cosine"`)."""

    def learning_rate(step: int) -> float | None:
        if step >= total:
            return None
        if step < warmup:
            return peak * step / warmup
        return peak * 0.5 * (1 + math.cos(math.pi * (step - warmup) / (total - warmup)))

    return learning_rate


def distill_recipe(config: DistillConfig, source: ImageSource, context: Context) -> DistillRecipe:
    """The recipe of `config` on `source`: teachers loaded onto the context's device, the student sized to them."""
    preset = config.resolved_preset()
    models, means, stds, classes = load_teachers(config.teacher, context.device, config.precision, config.compile)
    check_classes(classes, source.classes, config.teacher[0])
    student, mean, std = training_model(config.student, classes, config.seed, fine_tune=False,
                                        google_names_are_weights=True)
    teachers = Teachers(models, means, stds, config.teacher_crop or preset.crop, mean, std)
    indices = np.arange(len(source))
    total = config.max_steps or max(1, math.ceil(preset.epochs * len(indices) / config.batch_size))
    warmup = config.warmup_steps if config.warmup_steps is not None else round(preset.warmup_fraction * total)
    if not 0 <= warmup < total:
        raise ValueError(f"warmup_steps must lie in [0, {total}) (the run's steps), got {warmup}")
    return DistillRecipe(
        kind="distill", model=student, indices=indices, precrop=preset.crop, crop=preset.crop, mean=mean, std=std,
        total_steps=total, learning_rate=warmup_cosine(preset.lr, warmup, total), weight_decay=preset.weight_decay,
        mixup_alpha=config.mixup_alpha, loss="softmax", clip_grad_norm=1.0,
        description=dict(schedule=dict(warmup=warmup, total=total, decay="cosine"), lr=preset.lr,
                         temperature=preset.temperature, teachers=list(config.teacher), teacher_crop=teachers.crop,
                         teacher_views=config.teacher_views, label_weight=config.label_weight,
                         mixup_alpha=config.mixup_alpha, examples=len(indices), clip_grad_norm=1.0),
        teachers=teachers, temperature=preset.temperature, label_weight=config.label_weight,
        teacher_views=config.teacher_views, peak_lr=preset.lr, decay=preset.weight_decay,
    )


class DistillMeasure:
    """What every evaluation of a distillation run adds to the student's report: the teachers' top-1 (computed
    once: they are fixed), top-1 agreement and mean KL(teacher || student) at temperature 1 on the same images,
    and the mean step time split into the teachers' forward passes and the student's step."""

    def __init__(self, recipe: DistillRecipe, eval_source: ImageSource, settings: DistillConfig, context: Context):
        self.recipe, self.context, self.progress = recipe, context, settings.progress
        processor = BitImageProcessor.squash(recipe.teachers.crop, recipe.mean, recipe.std)
        self.dataset = processed_dataset(eval_source, processor, settings.on_bad_image, reduced_decode=True)
        self.targets: list[torch.Tensor] | None = None
        self.teacher_top1 = math.nan

    def start(self, batch_size: int) -> None:
        """Before an evaluation of the student in batches of `batch_size`: the teachers' predictions (once)."""
        if self.targets is None:
            self.targets, correct, count = [], 0, 0
            for images, labels, _ in inference_batches(self.dataset, batch_size, self.context, self.progress,
                                                       "teacher"):
                if len(labels):
                    probabilities = self.recipe.teachers.probabilities(images.to(self.context.device)).cpu()
                    correct += int((probabilities.argmax(-1) == labels).sum())
                    count += len(labels)
                    self.targets.append(probabilities)
            correct, count = all_sum(self.context, [float(correct), float(count)])
            self.teacher_top1 = correct / max(count, 1)
        self.batch, self.agree, self.kl, self.count = 0, 0, 0.0, 0

    def on_logits(self, logits: torch.Tensor) -> None:
        """Each evaluated batch's student logits, in the order `start` saw the teachers'."""
        targets = self.targets[self.batch].to(logits.device)
        self.batch += 1
        self.agree += int((logits.argmax(-1) == targets.argmax(-1)).sum())
        self.kl += float(kl_divergence_sum(logits, targets))
        self.count += len(logits)

    def finish(self) -> dict[str, float]:
        agree, kl, count = all_sum(self.context, [float(self.agree), self.kl, float(self.count)])
        timing = self.recipe.timing
        steps = max(timing["steps"], 1)
        return dict(teacher_top1=self.teacher_top1, agreement_top1=agree / max(count, 1), kl=kl / max(count, 1),
                    teacher_seconds_per_step=round(timing["teacher"] / steps, 5),
                    student_seconds_per_step=round(timing["student"] / steps, 5))
