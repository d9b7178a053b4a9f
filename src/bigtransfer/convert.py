"""Any BiT checkpoint into a bigtransfer model (`load_checkpoint`) or a transformers-layout directory
(`convert_checkpoint`, the `bigtransfer convert` command).

Both are one call of `bigtransfer.checkpoints.loader`, which reads every format and does the one strict load;
this module only picks the model class and writes the converted directory.
"""

from __future__ import annotations

import dataclasses
import json
import os
from pathlib import Path
from typing import Any

from .checkpoints import loader
from .checkpoints.formats import describe_variant, read_checkpoint
from .checkpoints.writers import save_transformers
from .files import atomic_directory, read_json
from .modeling import BitForImageClassification
from .ownership import claim_output
from .processing import IMAGE_PROCESSOR_CONFIG_NAME
from .report import StageProgress


def load_checkpoint(
    source: str | os.PathLike,
    model_class: type | None = None,
    *,
    num_labels: int | None = None,
    labels: list[str] | None = None,
    **config_overrides: Any,
):
    """Load any BiT checkpoint into a bigtransfer model, inferring the architecture from its tensors.

    Args:
        source: a weights file (timm .safetensors/.pth/.bin, Google .npz, original big_transfer .pth, a
            transformers state dict), a transformers or timm directory, a Google name (`BiT-M-R50x1`,
            `BiT-S-R101x3-ILSVRC2012`, `distill/R50x1_224`) or a Hub name (`google/bit-50`,
            `timm/resnetv2_50x1_bit.goog_in21k_ft_in1k`).
        model_class: BitForImageClassification (default), BitModel or BitBackbone.
        num_labels: a fresh, zero-initialised head of this size instead of the checkpoint's.
        labels: class names for the head (a new head when their count differs from the checkpoint's).
        **config_overrides: other BitConfig fields, such as `out_features` for a backbone, and the keyword
            arguments of `from_pretrained` (`dtype`, `device_map`, `revision`).

    Returns:
        The model in eval mode, in the dtype its weights were saved in unless `dtype` says otherwise. Its `config.ws_eps` is the source's (1e-8 timm/transformers, 1e-10 Google and
        the original code), so logits match the source implementation.

    Raises:
        CheckpointError: unknown, missing or misshapen keys (all listed); UnsafeCheckpointError for a pickle
        that would run code; OSError when a name cannot be found or downloaded.

    Example:
        >>> model = load_checkpoint("BiT-M-R50x1.npz", num_labels=10)
    """
    if num_labels is not None:
        if isinstance(num_labels, bool) or not isinstance(num_labels, int) or num_labels < 0:
            raise ValueError(f"num_labels must be a non-negative integer, got {num_labels!r}")
        config_overrides["num_labels"] = num_labels
    return loader.load(model_class or BitForImageClassification, source, labels=labels,
                       new_head=num_labels is not None, **config_overrides)


@dataclasses.dataclass
class ConversionResult:
    """What `convert_checkpoint` found and wrote."""

    format: str
    variant: str
    num_labels: int
    num_parameters: int
    ws_eps: float
    preprocessing: str
    output_dir: Path
    files: list[str]

    def summary(self) -> str:
        return "\n".join(
            (
                f"format:        {self.format}",
                f"variant:       {self.variant}",
                f"head:          {self.num_labels} classes" if self.num_labels else "head:          none (features)",
                f"parameters:    {self.num_parameters:,}",
                f"ws eps:        {self.ws_eps:g}",
                f"preprocessing: {self.preprocessing}",
                f"wrote:         {self.output_dir} ({', '.join(self.files)})",
            )
        )


def convert_checkpoint(
    source: str | os.PathLike,
    output_dir: str | os.PathLike,
    num_labels: int | None = None,
    labels: list[str] | None = None,
    image_size: int | None = None,
    name: str | None = None,
    overwrite: bool = False,
    progress: bool = False,
) -> ConversionResult:
    """Convert any supported checkpoint into a transformers-layout directory.

    Writes config.json, model.safetensors and preprocessor_config.json (the preprocessing the source evaluates
    with: timm's pretrained config, or the original BiT squash-resize to [-1, 1]; `image_size` changes its
    resolution). The directory loads with `BitForImageClassification.from_pretrained` here and, for width 1,
    in transformers. `name` is the name a local file is known by (for the preprocessing its tag implies).

    The three files replace `output_dir` as a whole (a crash leaves the old directory or the new one). An
    `output_dir` that holds anything but a BiT model directory's files is refused unless `overwrite` (its
    other files are then kept), and so is one that is, holds or lies inside the source. `progress` shows the
    stages (reading, building, writing) on a terminal: large checkpoints take tens of seconds.

    Example:
        >>> result = convert_checkpoint("BiT-M-R50x1-ILSVRC2012.npz", "bit-m-r50x1-in1k")
        >>> print(result.summary())
    """
    output_dir = claim_output(output_dir, "BiT model directory", is_model_directory, [source], overwrite,
                              flag="OUT_DIR", create=False)
    with StageProgress(progress, "convert", 3) as stages:
        stages.next(f"reading {source}")
        checkpoint = read_checkpoint(source, name) if name is not None else loader.read(source)
        overrides = {} if num_labels is None else {"num_labels": num_labels}
        stages.next("building the model")
        model = loader.build(BitForImageClassification, checkpoint, overrides=overrides, labels=labels,
                             new_head=num_labels is not None)
        preprocessing = checkpoint.preprocessing
        if preprocessing is not None:
            if image_size is not None:
                preprocessing = preprocessing.with_image_size(_positive_size(image_size))
            preprocessor, description = preprocessing.to_preprocessor_config(), preprocessing.describe()
        else:  # a transformers directory's own preprocessor_config.json, kept as it is
            preprocessor, description = checkpoint.preprocessor_dict(), f"{IMAGE_PROCESSOR_CONFIG_NAME} of the source"
            if image_size is not None:
                preprocessor = _resized_preprocessor(preprocessor, _positive_size(image_size))
        stages.next(f"writing {output_dir}")
        with atomic_directory(output_dir, keep_existing=overwrite) as written:
            save_transformers(model, written)
            (written / IMAGE_PROCESSOR_CONFIG_NAME).write_text(json.dumps(preprocessor, indent=2) + "\n", encoding="utf-8")
    return ConversionResult(
        format=checkpoint.format,
        variant=describe_variant(model.config),
        num_labels=model.config.num_labels,
        num_parameters=model.num_parameters(),
        ws_eps=model.config.ws_eps,
        preprocessing=description,
        output_dir=output_dir,
        files=["config.json", "model.safetensors", IMAGE_PROCESSOR_CONFIG_NAME],
    )


MODEL_FILES = ("config.json", "model.safetensors", "model.safetensors.index.json", "pytorch_model.bin",
               IMAGE_PROCESSOR_CONFIG_NAME)


def is_model_directory(path: Path) -> bool:
    """Whether `path` holds nothing but a BiT model directory's files (so `convert` may replace it)."""
    names = {entry.name for entry in path.iterdir()}
    shards = {name for name in names if name.startswith("model-") and name.endswith(".safetensors")}
    if not names <= set(MODEL_FILES) | shards:
        return False
    try:
        return "config.json" not in names or read_json(path / "config.json").get("model_type") == "bit"
    except (OSError, ValueError):
        return False


def _positive_size(image_size: Any) -> int:
    if isinstance(image_size, bool) or not isinstance(image_size, int) or image_size <= 0:
        raise ValueError(f"image_size must be a positive integer, got {image_size!r}")
    return image_size


def _resized_preprocessor(preprocessor: dict[str, Any], image_size: int) -> dict[str, Any]:
    preprocessor = dict(preprocessor)
    size = preprocessor.get("size") or {}
    crop = preprocessor.get("crop_size") or {}
    if "shortest_edge" in size and crop.get("height"):
        ratio = size["shortest_edge"] / crop["height"]  # keep the source's crop fraction
        preprocessor["size"] = {"shortest_edge": int(image_size * ratio)}
    else:
        preprocessor["size"] = {"height": image_size, "width": image_size}
    preprocessor["crop_size"] = {"height": image_size, "width": image_size}
    return preprocessor
