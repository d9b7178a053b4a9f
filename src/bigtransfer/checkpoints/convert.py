"""Loading and converting checkpoints of any format: `load_checkpoint` and `convert_checkpoint`.

A source is a local file or directory, a Google BiT name (`BiT-M-R50x1`), or a Hugging Face Hub name
(`google/bit-50`, `timm/resnetv2_50x1_bit.goog_in21k_ft_in1k`). Reading never builds a model and never
writes anything; the output directory is created only after the source has been read and checked.
"""

from __future__ import annotations

import dataclasses
import gzip
import json
import os
from importlib import resources
from pathlib import Path
from typing import Any

import torch

from ..config import BitConfig
from ..errors import CheckpointError
from ..files import write_text_atomic
from . import keymaps
from .formats import PREPROCESSOR_CONFIG_NAME, Checkpoint, read_checkpoint

HEAD_KEYS = ("classifier.1.weight", "classifier.1.bias")


def imagenet_labels() -> list[str]:
    """The 1000 ImageNet-1k class names, in the order of BiT's (and every ImageNet model's) 1000-class head.

    The file shipped with the package was generated once from timm's `timm/data/_info/imagenet_synsets.txt`
    (class order) and `imagenet_synset_to_lemma.txt` (WordNet lemmas), the same names transformers' ImageNet
    configs use (index 281 "tabby, tabby cat").
    """
    text = resources.files("bigtransfer").joinpath("imagenet_classes.txt").read_text(encoding="utf-8")
    return text.splitlines()


def imagenet21k_labels() -> list[str]:
    """The 21843 ImageNet-21k class names, in the order of the BiT-M (and timm `goog_in21k`) 21843-class head.

    Generated once from timm's `imagenet21k_goog_synsets.txt` (Google's class order) and WordNet lemmas, like
    `imagenet_labels`. 1,128 classes share their lemmas with another class (525 names); those get the synset
    id, so every name is unique and label2id stays a bijection: "crane (n02012849)", "crane (n03126707)".
    """
    packed = resources.files("bigtransfer").joinpath("imagenet21k_classes.txt.gz").read_bytes()
    return gzip.decompress(packed).decode("utf-8").splitlines()


def read_labels(path: str | os.PathLike) -> list[str]:
    """Class names from a text file, one per line (surrounding whitespace and trailing blank lines ignored)."""
    lines = [line.strip() for line in Path(path).read_text(encoding="utf-8-sig").splitlines()]
    while lines and not lines[-1]:
        lines.pop()
    blank = [number for number, line in enumerate(lines, start=1) if not line]
    if blank:
        raise ValueError(f"{path}: line {blank[0]} is empty; the labels file needs one class name per line")
    if not lines:
        raise ValueError(f"{path} holds no class names")
    return lines


def read_source(source: str | os.PathLike) -> Checkpoint:
    """Read a checkpoint from a local path, a Google BiT name or URL, or a Hub name (downloaded and cached)."""
    path = Path(source).expanduser()
    if path.exists():
        return read_checkpoint(path)
    name = str(source)
    from . import hub

    if hub.is_google_name(name):
        return read_checkpoint(hub.download_google(name), name=name)
    if hub.is_hub_name(name) and not os.path.isabs(name):
        return read_checkpoint(hub.download(name), name=name)
    raise OSError(
        f"no such file or directory: {name} (nor a Google BiT name such as BiT-M-R50x1, or a Hub name such as "
        "google/bit-50)"
    )


def build_model(
    checkpoint: Checkpoint,
    model_class: type | None = None,
    num_labels: int | None = None,
    labels: list[str] | None = None,
    **config_overrides: Any,
):
    """A `model_class` (default BitForImageClassification) holding the checkpoint, strictly loaded, in eval mode.

    `num_labels` replaces the head with a fresh zero-initialised one (the BiT recipe); `labels` names the
    classes (and, when their count differs from the checkpoint's head, implies a fresh head of that size).
    A 1000-class head without names gets the ImageNet-1k class names.
    """
    from ..modeling import BitForImageClassification
    from ..pretrained import load_state

    model_class = model_class or BitForImageClassification
    head_size = checkpoint.config.num_labels
    if labels is not None:
        labels = [str(label) for label in labels]
        if num_labels is None:
            num_labels = len(labels) if len(labels) != head_size else None
        elif num_labels != len(labels):
            raise ValueError(f"num_labels={num_labels} but {len(labels)} labels were given")
    fresh_head = num_labels is not None
    if fresh_head and (isinstance(num_labels, bool) or not isinstance(num_labels, int) or num_labels < 0):
        raise ValueError(f"num_labels must be a non-negative integer, got {num_labels!r}")
    size = num_labels if fresh_head else head_size
    names = labels or (None if fresh_head else _checkpoint_labels(checkpoint))
    overrides: dict[str, Any] = dict(config_overrides)
    overrides["num_labels"] = size
    if names is not None:
        overrides["id2label"] = dict(enumerate(names))
    config = BitConfig.from_dict(checkpoint.config.to_dict(), **overrides)

    state = dict(checkpoint.state)
    if fresh_head:
        for key in HEAD_KEYS:
            state.pop(key, None)
        if size > 0:
            state["classifier.1.weight"] = torch.zeros(size, config.num_features)
            state["classifier.1.bias"] = torch.zeros(size)
    model = model_class(config)
    _check_keys(checkpoint, state, model.state_dict())
    load_state(model, state, source=checkpoint.source)
    return model.eval()


def _check_keys(checkpoint: Checkpoint, state: dict[str, torch.Tensor], expected: dict[str, torch.Tensor]) -> None:
    """Strict key and shape check with the keys named as the source names them (load_state checks again)."""
    expected = {key if key.startswith(("bit.", "classifier.")) else "bit." + key: value for key, value in expected.items()}

    def named(keys: list[str]) -> list[str]:
        if checkpoint.naming == keymaps.TRANSFORMERS:
            return keys
        return [f"{keymaps.source_key(key, checkpoint.naming)} (here {key})" for key in keys]

    backbone = [key for key in state if not key.startswith("classifier.")]
    missing = [key for key in expected if key not in state and not key.startswith("classifier.")]
    unexpected = [key for key in backbone if key not in expected]
    problems = []
    if missing:
        problems.append(f"missing keys {named(missing)}")
    if unexpected:
        problems.append(f"unexpected keys {named(unexpected)}")
    if problems:
        raise CheckpointError(
            f"{checkpoint.source} ({checkpoint.format}) does not fit the inferred {describe_variant(checkpoint.config)}: "
            + "; ".join(problems)
        )
    for key in backbone:
        if tuple(state[key].shape) != tuple(expected[key].shape):
            raise CheckpointError(
                f"{checkpoint.source}: {named([key])[0]} has shape {tuple(state[key].shape)} in the checkpoint but "
                f"{tuple(expected[key].shape)} in the inferred {describe_variant(checkpoint.config)}"
            )


def _checkpoint_labels(checkpoint: Checkpoint) -> list[str] | None:
    if checkpoint.labels is not None:
        return checkpoint.labels
    id2label = checkpoint.config.id2label
    if any(name != f"LABEL_{index}" for index, name in id2label.items()):
        return [id2label[index] for index in range(len(id2label))]
    if checkpoint.config.num_labels == 1000:
        return imagenet_labels()
    if checkpoint.config.num_labels == 21843:
        return imagenet21k_labels()
    return None


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
        **config_overrides: other BitConfig fields, such as `out_features` for a backbone.

    Returns:
        The model in eval mode. Its `config.ws_eps` is the source's (1e-8 timm/transformers, 1e-10 Google and
        the original code), so logits match the source implementation.

    Raises:
        CheckpointError: unknown, missing or misshapen keys (all listed); UnsafeCheckpointError for a pickle
        that would run code; OSError when a name cannot be found or downloaded.

    Example:
        >>> model = load_checkpoint("BiT-M-R50x1.npz", num_labels=10)
    """
    checkpoint = read_source(source)
    return build_model(checkpoint, model_class, num_labels=num_labels, labels=labels, **config_overrides)


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


def describe_variant(config: BitConfig) -> str:
    """`BiT-M-R50x1`, `R101x3`, or the explicit shape of a non-standard network."""
    name = keymaps.architecture_name(config)
    if name is None:
        return (
            f"custom {config.layer_type} ResNet (depths {list(config.depths)}, stage widths {config.stage_widths}, "
            f"stem {config.embedding_size})"
        )
    return f"BiT-M-{name}" if config.num_labels == 21843 else name


def convert_checkpoint(
    source: str | os.PathLike,
    output_dir: str | os.PathLike,
    num_labels: int | None = None,
    labels: list[str] | None = None,
    image_size: int | None = None,
    name: str | None = None,
) -> ConversionResult:
    """Convert any supported checkpoint into a transformers-layout directory.

    Writes config.json, model.safetensors and preprocessor_config.json (the preprocessing the source evaluates
    with: timm's pretrained config, or the original BiT squash-resize to [-1, 1]; `image_size` changes its
    resolution). The directory loads with `BitForImageClassification.from_pretrained` here and, for width 1,
    in transformers.

    Example:
        >>> result = convert_checkpoint("BiT-M-R50x1-ILSVRC2012.npz", "bit-m-r50x1-in1k")
        >>> print(result.summary())
    """
    checkpoint = read_checkpoint(source, name) if name is not None else read_source(source)
    model = build_model(checkpoint, num_labels=num_labels, labels=labels)
    preprocessing = checkpoint.preprocessing
    if preprocessing is not None:
        if image_size is not None:
            preprocessing = preprocessing.with_image_size(_positive_size(image_size))
        preprocessor, description = preprocessing.to_preprocessor_config(), preprocessing.describe()
    else:  # a transformers directory's own preprocessor_config.json, kept as it is
        preprocessor, description = checkpoint.preprocessor_dict(), f"{PREPROCESSOR_CONFIG_NAME} of the source"
        if image_size is not None:
            preprocessor = _resized_preprocessor(preprocessor, _positive_size(image_size))
    output_dir = Path(output_dir)
    model.save_pretrained(output_dir)
    write_text_atomic(output_dir / PREPROCESSOR_CONFIG_NAME, json.dumps(preprocessor, indent=2) + "\n")
    return ConversionResult(
        format=checkpoint.format,
        variant=describe_variant(model.config),
        num_labels=model.config.num_labels,
        num_parameters=model.num_parameters(),
        ws_eps=model.config.ws_eps,
        preprocessing=description,
        output_dir=output_dir,
        files=["config.json", "model.safetensors", PREPROCESSOR_CONFIG_NAME],
    )


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
