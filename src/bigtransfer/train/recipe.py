"""What makes a training recipe: the model it starts from, its resolution, its learning-rate rule and its loss.

A `Recipe` is everything the loop (`train.loop.Trainer`) needs to know about one; `finetune_recipe` (the
BiT-HyperRule) and `pretrain_recipe` (the paper's upstream recipe) build one from their settings. A new recipe
(distillation, say) is one more `Recipe` with its own `loss`.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from .. import hub, hyperrule
from ..checkpoints import loader
from ..config import BitConfig, is_variant, variant_names
from ..data import ImageSource, TrainTransform, few_shot_indices
from ..errors import SourceNotFoundError
from ..modeling import BitForImageClassification
from ..processing import BIT_MEAN, BIT_STD
from .settings import FinetuneConfig, PretrainConfig, RunSettings


@dataclasses.dataclass
class Mix:
    """The MixUp of a micro-batch: image i became `lam * image[i] + (1 - lam) * image[partners[i]]`."""

    lam: float
    partners: torch.Tensor

    def apply(self, values: torch.Tensor) -> torch.Tensor:
        """`values` (images, or anything per image: a teacher's probabilities) mixed as the images are."""
        return self.lam * values + (1 - self.lam) * values[self.partners]


@dataclasses.dataclass
class Recipe:
    """One recipe's choices, as the loop uses them.

    `learning_rate(step)` is the step's rate, or None once the schedule ends; `micro_batch_loss` the summed loss
    of a micro-batch (by default: mix the images, run the network, `loss_sum(logits, labels, mix)`);
    `clip_grad_norm` the largest global gradient norm (None: no clipping); `description` goes into run.json.
    A recipe with other needs (a teacher, another optimizer) is a subclass overriding these methods.
    """

    kind: str
    model: BitForImageClassification
    indices: np.ndarray  # the training examples: positions in the source
    precrop: int
    crop: int
    mean: tuple[float, ...]
    std: tuple[float, ...]
    total_steps: int
    learning_rate: Callable[[int], float | None]
    weight_decay: float
    mixup_alpha: float
    loss: str  # "softmax" or "sigmoid" cross-entropy
    description: dict[str, Any]
    clip_grad_norm: float | None = None

    def train_transform(self) -> TrainTransform:
        """The training augmentation: squash to `precrop`, random `crop` window, random flip, normalise."""
        return TrainTransform(self.precrop, self.crop, self.mean, self.std)

    def decode_size(self) -> int | None:
        """The least size a training image must be decoded at (JPEGs decode reduced down to it); None: full size."""
        return self.precrop

    def optimizer(self) -> torch.optim.Optimizer:
        """SGD with momentum 0.9 over the trainable parameters (the rate is set by the loop at every step)."""
        parameters = [parameter for parameter in self.model.parameters() if parameter.requires_grad]
        return torch.optim.SGD(parameters, lr=0.0, momentum=hyperrule.MOMENTUM, weight_decay=self.weight_decay)

    def micro_batch_loss(self, network: nn.Module, images: torch.Tensor, labels: torch.Tensor, mix: Mix | None,
                         autocast) -> torch.Tensor:
        """The summed loss of one micro-batch: `images` as loaded (mixed here, once), `network` the trained model
        (wrapped for DistributedDataParallel under torchrun), `autocast` the run's precision context."""
        with autocast:
            if mix is not None:
                images = mix.apply(images)
            logits = network(images).logits
        return self.loss_sum(logits, labels, mix)

    def step_record(self, seconds: float) -> dict[str, Any]:
        """Values the recipe adds to each step's metrics.jsonl record, given the step's wall time (none here)."""
        return {}

    def loss_sum(self, logits: torch.Tensor, labels: torch.Tensor, mix: Mix | None) -> torch.Tensor:
        """The micro-batch's per-image losses summed; under MixUp, the same mix of the two labels' losses."""
        if mix is None:
            return cross_entropy_sum(logits, labels, self.loss)
        return (mix.lam * cross_entropy_sum(logits, labels, self.loss)
                + (1 - mix.lam) * cross_entropy_sum(logits, labels[mix.partners], self.loss))


def cross_entropy_sum(logits: torch.Tensor, labels: torch.Tensor, kind: str) -> torch.Tensor:
    """Softmax cross-entropy, or sigmoid cross-entropy summed over classes; summed over the images."""
    logits = logits.float()
    if kind == "sigmoid":
        targets = F.one_hot(labels, logits.shape[-1]).to(logits.dtype)
        return F.binary_cross_entropy_with_logits(logits, targets, reduction="sum")
    return F.cross_entropy(logits, labels, reduction="sum")


def finetune_recipe(config: FinetuneConfig, source: ImageSource) -> Recipe:
    """The BiT-HyperRule for `source`: its schedule (scaled to `max_steps`), resolution and MixUp."""
    indices = (few_shot_indices(source.labels, config.shots, config.seed, source.classes)
               if config.shots else np.arange(len(source)))
    size = len(indices)
    model, mean, std = training_model(config.model, source.classes, config.seed, fine_tune=True)
    if config.freeze_backbone:
        model.bit.requires_grad_(False)
    precrop, crop = resolution(config, source, config.preset)
    schedule = hyperrule.schedule(size, config.preset)
    total = config.max_steps or schedule[-1]
    scale = schedule[-1] / total  # the rule's schedule stretched or squeezed to `total` steps

    def learning_rate(step: int) -> float | None:
        return hyperrule.lr(step * scale, size, config.base_lr, config.preset)

    alpha = hyperrule.mixup_alpha(size) if config.mixup_alpha is None else config.mixup_alpha
    return Recipe(
        kind="finetune", model=model, indices=indices, precrop=precrop, crop=crop, mean=mean, std=std,
        total_steps=total, learning_rate=learning_rate, weight_decay=0.0, mixup_alpha=alpha, loss="softmax",
        description=dict(schedule=[round(b / scale, 3) for b in schedule], mixup_alpha=alpha, examples=size),
    )


def pretrain_recipe(config: PretrainConfig, source: ImageSource) -> Recipe:
    """The paper's upstream recipe: lr per 256 images, warmup, decays at 30/60/80 %, weight decay, no MixUp."""
    model, mean, std = training_model(config.model, source.classes, config.seed, fine_tune=False)
    precrop, crop = resolution(config, source, "code")
    total = config.max_steps or max(1, math.ceil(config.epochs * len(source) / config.batch_size))
    warmup = config.warmup_steps if config.warmup_steps is not None else round(0.05 * total)
    if not 0 <= warmup < total:
        raise ValueError(f"warmup_steps must lie in [0, {total}), got {warmup}")

    def learning_rate(step: int) -> float | None:
        return hyperrule.upstream_lr(step, total, config.batch_size, warmup, config.base_lr)

    return Recipe(
        kind="pretrain", model=model, indices=np.arange(len(source)), precrop=precrop, crop=crop, mean=mean,
        std=std, total_steps=total, learning_rate=learning_rate, weight_decay=config.weight_decay, mixup_alpha=0.0,
        loss=config.loss, description=dict(schedule=hyperrule.upstream_schedule(total, warmup), examples=len(source)),
    )


# ---------------------------------------------------------------------------------------------------------------
# The model a recipe starts from, and its resolution.


def resolution(config: RunSettings, source: ImageSource, preset: str) -> tuple[int, int]:
    """(precrop, crop): the HyperRule's for the data's image size unless `resize` / `crop` are given."""
    if config.resize is not None and config.crop is not None:
        precrop, crop = config.resize, config.crop
    else:
        height, width = source.image_size()
        model_name = config.model if isinstance(config.model, str) else None
        rule_precrop, rule_crop = hyperrule.resolution(height, width, preset, model_name)
        crop = config.crop or rule_crop
        precrop = config.resize or max(crop, round(rule_precrop * crop / rule_crop))
    if not 0 < crop <= precrop:
        raise ValueError(f"need 0 < crop <= resize, got crop {crop} and resize {precrop}")
    return precrop, crop


def is_random_init(name: str, google_names_are_weights: bool) -> bool:
    """Whether `--model` names an architecture to build at random rather than weights to load.

    Variant names (`tiny`, `R50x1`, `BiT-S-R50x1`) build at random; for fine-tuning, Google's checkpoint names
    (`BiT-M-R50x1`, `BiT-S-R101x3-ILSVRC2012`) mean their pretrained weights, as in the original code.
    """
    if Path(name).exists() or (google_names_are_weights and hub.is_google_name(name)):
        return False
    return is_variant(name)


def training_model(name: str, classes: Sequence[str], seed: int, fine_tune: bool,
                   google_names_are_weights: bool | None = None):
    """(model with a head for `classes`, mean, std): a variant at random (seeded), or loaded weights of any format.

    Fine-tuning always starts from a zero-initialised head (BiT), even when the old head had the same shape.
    Google's checkpoint names mean their weights when fine-tuning (or when `google_names_are_weights`).
    """
    weights_by_name = fine_tune if google_names_are_weights is None else google_names_are_weights
    if is_random_init(name, google_names_are_weights=weights_by_name):
        config = BitConfig.from_variant(name, num_labels=len(classes))
        with torch.random.fork_rng(devices=[]):  # weights drawn from `seed`, the caller's RNG untouched
            torch.manual_seed(seed)
            model = BitForImageClassification(config)
            if fine_tune:  # the recipe's zero head, as a loaded model gets it
                model.reset_classifier(len(classes))
        mean, std = BIT_MEAN, BIT_STD
        model.config.id2label = {index: str(name) for index, name in enumerate(classes)}
        model.config.label2id = {str(name): index for index, name in enumerate(classes)}
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
