"""Checkpoint formats: what a local file or directory holds, read into one transformers-named state.

`read_checkpoint(path)` reads the tensors (`readers`), recognises the key names (transformers, timm, Google,
original big_transfer) and renames them (`keymaps`), and returns a `Checkpoint`: the state, the BitConfig fields
(a config.json's, or the architecture read off the tensors with the source's weight-standardization eps) and the
preprocessing the source evaluates with. No model is built here: that is `loader`.
"""

from __future__ import annotations

import dataclasses
import math
import os
import re
from pathlib import Path
from typing import Any

import torch

from .. import hyperrule
from ..config import CONFIG_NAME, make_divisible
from ..errors import CheckpointError
from ..files import read_json
from ..processing import (
    BIT_MEAN,
    BIT_STD,
    IMAGE_PROCESSOR_CONFIG_NAME,
    OPENAI_CLIP_MEAN,
    OPENAI_CLIP_STD,
    BitImageProcessor,
)
from ..processing.ops import RESAMPLE_NAMES
from . import keymaps
from .readers import READERS, file_kind, has_directory_weights, read_directory_weights, read_recorded_config

# Weight-standardization eps of each source implementation: timm and transformers 1e-8, the original
# big_transfer code (PyTorch, TF2 and JAX alike) 1e-10. Logits reproduce only with the source's value.
SOURCE_WS_EPS = {
    keymaps.TIMM: 1e-8,
    keymaps.TRANSFORMERS: 1e-8,
    keymaps.GOOGLE: 1e-10,
    keymaps.BIG_TRANSFER: 1e-10,
}
FORMAT_NAMES = {
    keymaps.TRANSFORMERS: "transformers",
    keymaps.TIMM: "timm",
    keymaps.GOOGLE: "Google BiT .npz",
    keymaps.BIG_TRANSFER: "original big_transfer PyTorch",
}
CONTAINER_NAMES = {"safetensors": "safetensors", "torch": "torch pickle", "npz": "npz", "directory": "directory"}



@dataclasses.dataclass(frozen=True)
class Preprocessing:
    """How a source evaluates images, expressible as a transformers `BitImageProcessor` config.

    `squash=True` resizes straight to `image_size` x `image_size` (the original BiT evaluation); otherwise the
    shortest edge is resized to `floor(image_size / crop_pct)` and the centre `image_size` crop is kept (timm).
    """

    image_size: int
    resample: str = "bilinear"
    squash: bool = False
    crop_pct: float = 1.0
    mean: tuple[float, ...] = BIT_MEAN
    std: tuple[float, ...] = BIT_STD
    origin: str = ""

    def with_image_size(self, image_size: int) -> Preprocessing:
        return dataclasses.replace(self, image_size=int(image_size))

    def describe(self) -> str:
        normalise = "[-1, 1]" if self.mean == BIT_MEAN and self.std == BIT_STD else f"mean {list(self.mean)} std {list(self.std)}"
        if self.squash:
            resize = f"squash to {self.image_size}x{self.image_size}"
        else:
            resize = f"shortest edge {self.resize_size}, centre crop {self.image_size}"
        return f"{resize}, {self.resample}, inputs {normalise}" + (f" ({self.origin})" if self.origin else "")

    @property
    def resize_size(self) -> int:
        return math.floor(self.image_size / self.crop_pct)  # timm's rule for the eval resize

    def to_preprocessor_config(self) -> dict[str, Any]:
        """The preprocessor_config.json dict, in the schema of transformers' BitImageProcessor."""
        size = (
            {"height": self.image_size, "width": self.image_size}
            if self.squash
            else {"shortest_edge": self.resize_size}
        )
        crop = {"height": self.image_size, "width": self.image_size}
        return BitImageProcessor(
            size=size, resample=self.resample, do_center_crop=not self.squash, crop_size=crop,
            image_mean=list(self.mean), image_std=list(self.std),
        ).to_dict()


# The pretrained configs of timm's BiT tags (timm/models/resnetv2.py): tag -> (size, crop_pct, interpolation).
TIMM_TAGS = {
    "goog_in21k": (224, 0.875, "bilinear"),
    "goog_in21k_ft_in1k": (448, 1.0, "bilinear"),
    "goog_distilled_in1k": (224, 0.875, "bicubic"),
    "goog_teacher_in21k_ft_in1k": (224, 0.875, "bicubic"),
    "goog_teacher_in21k_ft_in1k_384": (384, 1.0, "bicubic"),
}
TIMM_DEFAULT = (224, 0.875, "bilinear")  # timm's _cfg default, for heads no pretrained tag explains
TRANSFORMERS_DEFAULT = Preprocessing(
    224, resample="bicubic", mean=OPENAI_CLIP_MEAN, std=OPENAI_CLIP_STD, origin="transformers BitImageProcessor defaults"
)


def timm_preprocessing(name: str, num_labels: int, architecture: str | None) -> Preprocessing:
    """timm's pretrained config for a BiT file: the tag in the file name, else the one its head size implies."""
    lowered = name.lower()
    tag = next((tag for tag in sorted(TIMM_TAGS, key=len, reverse=True) if tag in lowered), None)
    if tag is None:
        if "teacher" in lowered:
            tag = "goog_teacher_in21k_ft_in1k_384" if "384" in lowered else "goog_teacher_in21k_ft_in1k"
        elif "distill" in lowered:
            tag = "goog_distilled_in1k"
        elif num_labels == 21843:
            tag = "goog_in21k"
        elif num_labels == 1000:
            tag = "goog_in21k_ft_in1k"
    size, crop_pct, interpolation = TIMM_TAGS.get(tag, TIMM_DEFAULT)
    if tag == "goog_in21k_ft_in1k" and architecture == "R152x4":
        size = 480  # timm evaluates only R152x4 at 480
    return Preprocessing(size, interpolation, crop_pct=crop_pct, origin=f"timm {tag or 'default'} config")


def timm_pretrained_cfg_preprocessing(cfg: dict[str, Any]) -> Preprocessing:
    """Preprocessing from the `pretrained_cfg` of a timm hub config.json."""
    size = int(cfg.get("input_size", (3, 224, 224))[-1])
    interpolation = cfg.get("interpolation", "bilinear")
    if interpolation not in RESAMPLE_NAMES:  # timm's "random" and the like: its default for these models
        interpolation = "bicubic"
    return Preprocessing(
        size, interpolation, crop_pct=float(cfg.get("crop_pct", 0.875)),
        mean=tuple(cfg.get("mean", BIT_MEAN)), std=tuple(cfg.get("std", BIT_STD)),
        origin=f"timm {cfg.get('tag') or 'hub'} config",
    )


def original_preprocessing(name: str, num_labels: int) -> Preprocessing:
    """The original BiT evaluation: squash to the crop size, inputs in [-1, 1], bilinear.

    The crop size is 224 for the upstream models (their training resolution), the BiT-HyperRule's large-image
    crop (480, `hyperrule.resolution`) for fine-tuned ones such as -ILSVRC2012, and the resolution in the name
    of the distilled files (`distill/R50x1_160.npz` -> 160).
    """
    lowered = Path(name).name.lower()
    distilled = re.search(r"r\d+x\d+(?:_t)?_(\d+)", lowered)  # R50x1_224, R152x2_T_384
    if distilled:
        return Preprocessing(int(distilled[1]), "bicubic", squash=True, origin="distilled BiT evaluation")
    upstream = num_labels == 21843 or (lowered.startswith(("bit-s-", "bit-m-")) and "ilsvrc2012" not in lowered)
    if upstream:
        return Preprocessing(224, squash=True, origin="original BiT, upstream resolution")
    _, crop = hyperrule.resolution(512, 512)
    return Preprocessing(crop, squash=True, origin="original BiT evaluation, BiT-HyperRule crop")


@dataclasses.dataclass
class Checkpoint:
    """A checkpoint read from any supported format, in transformers naming, with what it takes to reproduce it.

    `state` uses BitForImageClassification's key names (`bit.` prefix, `classifier.1.*` head) whatever the
    source's; `config` holds BitConfig fields: a transformers config.json's, or (`inferred`) the architecture
    read off the tensors, the source's eps and anything a bigtransfer writer recorded in the file.
    """

    naming: str  # keymaps.TRANSFORMERS, TIMM, GOOGLE or BIG_TRANSFER
    container: str  # "safetensors", "torch", "npz" or "directory"
    source: str
    state: dict[str, torch.Tensor]
    config: dict[str, Any]
    inferred: bool
    preprocessing: Preprocessing | None = None
    preprocessor_config: dict[str, Any] | None = None  # copied as is from a transformers directory
    labels: list[str] | None = None
    prefixed: bool = True  # transformers naming only: whether the source's keys carry the `bit.` prefix

    @property
    def format(self) -> str:
        return f"{FORMAT_NAMES[self.naming]} ({CONTAINER_NAMES[self.container]})"

    def preprocessor_dict(self) -> dict[str, Any]:
        if self.preprocessor_config is not None:
            return dict(self.preprocessor_config)
        return (self.preprocessing or TRANSFORMERS_DEFAULT).to_preprocessor_config()

    def source_key(self, key: str) -> str:
        """How the source names a (transformers-named) key, for error messages."""
        if self.naming == keymaps.TRANSFORMERS:
            return key if self.prefixed or key.startswith("classifier.") else key.removeprefix("bit.")
        return f"{keymaps.source_key(key, self.naming)} (here {key})"


def read_checkpoint(path: str | os.PathLike, name: str | None = None, use_safetensors: bool | None = None,
                    variant: str | None = None) -> Checkpoint:
    """Read a weights file (any format) or a transformers / timm directory into a `Checkpoint`.

    `name` is the name the file is known by (a hub or Google name), used only to pick the preprocessing
    when the file itself does not say (timm tags, -ILSVRC2012, distilled resolutions). A directory of weights
    without config.json (what transformers' Trainer saves for a model that is not its own class) is read like a
    weights file: its architecture is inferred. `use_safetensors` and `variant` pick a directory's weight files.
    """
    path = Path(path)
    if path.is_dir():
        return _read_directory(path, name, use_safetensors, variant)
    if not path.exists():
        raise OSError(f"no such file or directory: {path}")
    kind = file_kind(path)
    checkpoint = _from_tensors(READERS[kind](path), kind, str(path), name or path.name)
    if kind == "safetensors":
        checkpoint.config.update(read_recorded_config(path))
    return checkpoint


def _from_tensors(tensors: dict[str, torch.Tensor], container: str, source: str, hint: str) -> Checkpoint:
    """A Checkpoint whose config is read off the tensors (any naming but a config.json's)."""
    naming = keymaps.detect_naming(tensors)
    state = keymaps.to_transformers(tensors, naming)
    config = dict(keymaps.infer_architecture(state), ws_eps=SOURCE_WS_EPS[naming])
    return Checkpoint(
        naming, container, source, state, config, inferred=True, preprocessing=_preprocessing_for(naming, hint, config),
        prefixed=any(key.startswith("bit.") for key in keymaps.strip_wrapper(tensors)),
    )


def _preprocessing_for(naming: str, hint: str, config: dict[str, Any]) -> Preprocessing:
    num_labels = config["num_labels"]
    if naming == keymaps.TIMM:
        return timm_preprocessing(hint, num_labels, keymaps.architecture_name(config))
    if naming in (keymaps.GOOGLE, keymaps.BIG_TRANSFER):
        return original_preprocessing(hint, num_labels)
    return TRANSFORMERS_DEFAULT


def _read_directory(directory: Path, name: str | None, use_safetensors: bool | None,
                    variant: str | None = None) -> Checkpoint:
    config_path = directory / CONFIG_NAME
    if not config_path.is_file():
        if has_directory_weights(directory, variant):
            return _from_tensors(read_directory_weights(directory, use_safetensors, variant), "directory", str(directory),
                                 name or directory.name)
        hint = (f"; it looks like a run directory: pass {directory / 'model'}"
                if (directory / "model" / CONFIG_NAME).is_file() else "; pass the weights file itself")
        raise CheckpointError(f"{directory} is a directory without {CONFIG_NAME}{hint}")
    config = read_json(config_path)
    tensors = read_directory_weights(directory, use_safetensors, variant)
    if "architecture" in config and "model_type" not in config:
        return _read_timm_directory(directory, config, tensors, name)
    if isinstance(config.get("backbone_config"), dict) and config.get("model_type") != "bit":
        config, tensors = _hybrid_backbone(directory, config, tensors)
    preprocessor_path = directory / IMAGE_PROCESSOR_CONFIG_NAME
    preprocessor = read_json(preprocessor_path) if preprocessor_path.is_file() else None
    return Checkpoint(
        keymaps.TRANSFORMERS, "directory", str(directory), keymaps.to_transformers(tensors, keymaps.TRANSFORMERS),
        config, inferred=False, preprocessing=None if preprocessor else TRANSFORMERS_DEFAULT,
        preprocessor_config=preprocessor, prefixed=any(key.startswith("bit.") for key in tensors),
    )


def _hybrid_backbone(directory: Path, config: dict[str, Any], tensors: dict[str, torch.Tensor]):
    """The BiT inside a hybrid model (DPT-hybrid, ViT-hybrid): its backbone_config and the tensors under
    `...backbone.` (`dpt.embeddings.backbone.bit.*`, `vit.embeddings.patch_embeddings.backbone.bit.*`)."""
    backbone = config["backbone_config"]
    if backbone.get("model_type", "bit") != "bit":
        raise CheckpointError(f"{directory} holds a {config.get('model_type')} model whose backbone is "
                              f"{backbone.get('model_type')}, not BiT")
    found = {f".{key}".split(".backbone.", 1)[1]: value for key, value in tensors.items() if ".backbone." in f".{key}"}
    if not found:
        raise CheckpointError(f"{directory}: its config names a BiT backbone but no weights are under '...backbone.'")
    return dict(backbone, model_type="bit"), found


def _read_timm_directory(
    directory: Path, config: dict[str, Any], tensors: dict[str, torch.Tensor], name: str | None
) -> Checkpoint:
    """A timm hub snapshot: config.json with `architecture` and `pretrained_cfg`, plus the weights."""
    architecture = str(config["architecture"])
    if not architecture.startswith("resnetv2_") or "bit" not in architecture:
        raise CheckpointError(
            f"{directory} holds timm's {architecture}, which is not a BiT model (expected resnetv2_*_bit)"
        )
    checkpoint = _from_tensors(tensors, "directory", str(directory), name or directory.name)
    if checkpoint.naming != keymaps.TIMM:
        raise CheckpointError(f"the weights in {directory} do not use timm's key names although its {CONFIG_NAME} is timm's")
    cfg = config.get("pretrained_cfg")
    if isinstance(cfg, dict):
        checkpoint.preprocessing = timm_pretrained_cfg_preprocessing(cfg)
    labels = config.get("label_names")
    if isinstance(labels, list) and len(labels) == checkpoint.config["num_labels"]:
        checkpoint.labels = [str(label) for label in labels]
    return checkpoint


def describe_variant(config: Any) -> str:
    """`BiT-M-R50x1`, `R101x3`, or the explicit shape of a non-standard network (a BitConfig or its fields)."""
    fields = config if isinstance(config, dict) else config.to_dict()
    name = keymaps.architecture_name(fields)
    if name is None:
        widths = [make_divisible(size * fields.get("width_factor", 1)) for size in fields["hidden_sizes"]]
        return (
            f"custom {fields.get('layer_type', 'preactivation')} ResNet (depths {list(fields['depths'])}, stage "
            f"widths {widths}, stem {fields['embedding_size']})"
        )
    return f"BiT-M-{name}" if fields.get("num_labels") == 21843 else name
