"""BiT-HyperRule: transfer hyper-parameters as pure functions of dataset size and image size.

Two presets exist because the original code and the paper disagree on details:

- ``"code"`` (default) matches google-research/big_transfer ``bit_hyperrule.py``, which produced the
  released results: images of area below 96x96 are resized to 160 and cropped to 128, all others
  resized to 512 and cropped to 480; small datasets train for 500 steps with decays every 100.
- ``"paper"`` follows the text of the paper (arXiv 1912.11370, section 3.3): larger images use
  448/384 (512/480 for R152x4) and the decays sit at 30, 60 and 90 % of training.

The upstream (pre-training) schedule of the paper is here too: ``upstream_lr``.

Example::

    >>> from bigtransfer import hyperrule
    >>> hyperrule.resolution(32, 32)
    (160, 128)
    >>> hyperrule.schedule(50_000)
    [500, 3000, 6000, 9000, 10000]
    >>> hyperrule.lr(0, 50_000), hyperrule.lr(500, 50_000), hyperrule.lr(10_000, 50_000)
    (0.0, 0.003, None)
"""

from __future__ import annotations

from typing import Literal

Preset = Literal["code", "paper"]

# Images with fewer pixels than this are "small" (CIFAR, MNIST, SVHN); the comparison is strict.
SMALL_IMAGE_AREA = 96 * 96
# Dataset-size boundaries (strict "<") between the small / medium / large schedules and for MixUp.
SMALL_DATASET = 20_000
MEDIUM_DATASET = 500_000

DEFAULT_BASE_LR = 0.003
DEFAULT_BATCH_SIZE = 512
MOMENTUM = 0.9

# The tables. Schedules are [warmup_end, decay_1, decay_2, decay_3, total] in optimizer steps,
# listed for dataset sizes (< 20k, < 500k, >= 500k).
PRESETS: dict[str, dict] = {
    "code": dict(
        small_resolution=(160, 128),
        large_resolution=(512, 480),
        large_resolution_r152x4=(512, 480),
        schedules=(
            [100, 200, 300, 400, 500],
            [500, 3000, 6000, 9000, 10_000],
            [500, 6000, 12_000, 18_000, 20_000],
        ),
    ),
    "paper": dict(
        small_resolution=(160, 128),
        large_resolution=(448, 384),
        large_resolution_r152x4=(512, 480),
        # 500 / 10k / 20k steps, decays at 30 / 60 / 90 %; warmup as in the code.
        schedules=(
            [100, 150, 300, 450, 500],
            [500, 3000, 6000, 9000, 10_000],
            [500, 6000, 12_000, 18_000, 20_000],
        ),
    ),
}

# Upstream pre-training (paper): lr 0.03 * batch / 256, decays by 10x at these fractions of training.
UPSTREAM_BASE_LR = 0.03
UPSTREAM_DECAY_FRACTIONS = (0.3, 0.6, 0.8)


def _preset(preset: str) -> dict:
    if preset not in PRESETS:
        raise ValueError(f"unknown hyperrule preset {preset!r}; expected one of {sorted(PRESETS)}")
    return PRESETS[preset]


def _positive(name: str, value: int) -> int:
    return _at_least(name, value, 1, "a positive")


def _at_least(name: str, value: int, low: int, kind: str) -> int:
    # `not value >= low` rather than `value < low`: NaN fails it too.
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not value >= low:
        raise ValueError(f"{name} must be {kind} number, got {value!r}")
    return value


def resolution(
    height: int, width: int, preset: Preset = "code", variant: str | None = None
) -> tuple[int, int]:
    """Return ``(precrop, crop)``: the squash-resize size for training and the crop size.

    Args:
        height, width: the original image size (a typical image of the dataset).
        preset: ``"code"`` or ``"paper"``.
        variant: model name such as ``"BiT-M-R152x4"``; only the paper preset uses it (R152x4 gets 512/480).

    Evaluation squashes images to ``(crop, crop)``.
    """
    table = _preset(preset)
    if _positive("height", height) * _positive("width", width) < SMALL_IMAGE_AREA:
        return table["small_resolution"]
    if variant is not None and "152x4" in variant.lower():
        return table["large_resolution_r152x4"]
    return table["large_resolution"]


def schedule(dataset_size: int, preset: Preset = "code") -> list[int]:
    """Return ``[warmup_end, decay_1, decay_2, decay_3, total]`` in optimizer steps for a dataset size."""
    schedules = _preset(preset)["schedules"]
    if _positive("dataset_size", dataset_size) < SMALL_DATASET:
        return list(schedules[0])
    if dataset_size < MEDIUM_DATASET:
        return list(schedules[1])
    return list(schedules[2])


def _staircase(step: int, base_lr: float, warmup_end: int, decays: list[int], total: int) -> float | None:
    """Linear warmup from 0, then /10 for every decay boundary strictly below ``step``; None when done.

    Same comparisons as the original ``get_lr``: at ``step == boundary`` the old rate still applies.
    """
    if step < warmup_end:
        return base_lr * step / warmup_end
    if step >= total:
        return None
    for boundary in decays:
        if boundary < step:
            base_lr /= 10
    return base_lr


def lr(
    step: int, dataset_size: int, base_lr: float = DEFAULT_BASE_LR, preset: Preset = "code"
) -> float | None:
    """Learning rate for optimizer step ``step`` (0-based), or ``None`` once training is over.

    Warmup ``base_lr * step / warmup_end`` (0 at step 0), then ``base_lr`` divided by 10 for each decay
    boundary strictly below ``step``; ``None`` for ``step >= total``. Base 0.003 is for batch 512.
    """
    _at_least("step", step, 0, "a non-negative")
    warmup_end, *decays, total = schedule(dataset_size, preset)
    return _staircase(step, base_lr, warmup_end, decays, total)


def mixup_alpha(dataset_size: int) -> float:
    """MixUp alpha: 0.0 (no MixUp) below 20k examples, else 0.1 (both presets)."""
    return 0.0 if _positive("dataset_size", dataset_size) < SMALL_DATASET else 0.1


def upstream_schedule(total_steps: int, warmup_steps: int) -> list[int]:
    """Pre-training schedule ``[warmup_end, decay_1, decay_2, decay_3, total]``: decays at 30/60/80 %."""
    if total_steps <= 0 or warmup_steps < 0:
        raise ValueError(f"need total_steps > 0 and warmup_steps >= 0, got {total_steps}, {warmup_steps}")
    decays = [int(total_steps * fraction) for fraction in UPSTREAM_DECAY_FRACTIONS]
    return [warmup_steps, *decays, total_steps]


def upstream_lr(
    step: int, total_steps: int, batch_size: int, warmup_steps: int, base: float = UPSTREAM_BASE_LR
) -> float | None:
    """Pre-training learning rate: ``base * batch_size / 256``, linear warmup, /10 at 30/60/80 % of training.

    Same comparisons as :func:`lr` (a decay applies from the step after its boundary); ``None`` once
    ``step >= total_steps``.
    """
    warmup_end, *decays, total = upstream_schedule(total_steps, warmup_steps)
    return _staircase(step, base * batch_size / 256, warmup_end, decays, total)
