"""Checkpoint formats: detect what a file or directory holds and read it into one transformers-named state.

`read_checkpoint(path)` looks at the bytes (safetensors, torch pickle, .npz) and the key names (transformers,
timm, Google, original big_transfer), infers the architecture from the tensors and returns a `Checkpoint`:
the state, a `BitConfig` whose weight-standardization eps is the source's, and the preprocessing the source
evaluates with. No model is built here.
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
from ..config import CONFIG_NAME, BitConfig
from ..errors import CheckpointError
from ..files import read_json
from . import keymaps
from .readers import READERS, file_kind

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

PREPROCESSOR_CONFIG_NAME = "preprocessor_config.json"
# PIL resampling codes, as transformers' preprocessor_config.json stores them.
RESAMPLE = {"nearest": 0, "lanczos": 1, "bilinear": 2, "bicubic": 3}
INCEPTION_MEAN = INCEPTION_STD = (0.5, 0.5, 0.5)  # inputs in [-1, 1]: timm's BiT configs and the original code
CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)  # transformers' BitImageProcessor defaults (google/bit-50)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)


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
    mean: tuple[float, ...] = INCEPTION_MEAN
    std: tuple[float, ...] = INCEPTION_STD
    origin: str = ""

    def with_image_size(self, image_size: int) -> Preprocessing:
        return dataclasses.replace(self, image_size=int(image_size))

    def describe(self) -> str:
        normalise = "[-1, 1]" if self.mean == INCEPTION_MEAN and self.std == INCEPTION_STD else f"mean {list(self.mean)} std {list(self.std)}"
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
        return {
            "image_processor_type": "BitImageProcessor",
            "do_resize": True,
            "size": size,
            "resample": RESAMPLE[self.resample],
            "do_center_crop": not self.squash,
            "crop_size": {"height": self.image_size, "width": self.image_size},
            "do_rescale": True,
            "rescale_factor": 1 / 255,
            "do_normalize": True,
            "image_mean": list(self.mean),
            "image_std": list(self.std),
            "do_convert_rgb": True,
        }


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
    224, resample="bicubic", mean=CLIP_MEAN, std=CLIP_STD, origin="transformers BitImageProcessor defaults"
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
    if interpolation not in RESAMPLE:
        interpolation = "bicubic"
    return Preprocessing(
        size, interpolation, crop_pct=float(cfg.get("crop_pct", 0.875)),
        mean=tuple(cfg.get("mean", INCEPTION_MEAN)), std=tuple(cfg.get("std", INCEPTION_STD)),
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
    """A checkpoint read from any supported format, in transformers naming, with what it takes to reproduce it."""

    naming: str  # keymaps.TRANSFORMERS, TIMM, GOOGLE or BIG_TRANSFER
    container: str  # "safetensors", "torch", "npz" or "directory"
    source: str
    state: dict[str, torch.Tensor]
    config: BitConfig
    preprocessing: Preprocessing | None = None
    preprocessor_config: dict[str, Any] | None = None  # copied as is from a transformers directory
    labels: list[str] | None = None

    @property
    def format(self) -> str:
        return f"{FORMAT_NAMES[self.naming]} ({CONTAINER_NAMES[self.container]})"

    def preprocessor_dict(self) -> dict[str, Any]:
        if self.preprocessor_config is not None:
            return dict(self.preprocessor_config)
        return (self.preprocessing or TRANSFORMERS_DEFAULT).to_preprocessor_config()


def read_checkpoint(path: str | os.PathLike, name: str | None = None) -> Checkpoint:
    """Read a weights file (any format) or a transformers / timm directory into a `Checkpoint`.

    `name` is the name the file is known by (a hub or Google name), used only to pick the preprocessing
    when the file itself does not say (timm tags, -ILSVRC2012, distilled resolutions).
    """
    path = Path(path)
    if path.is_dir():
        return _read_directory(path, name)
    if not path.exists():
        raise OSError(f"no such file or directory: {path}")
    kind = file_kind(path)
    tensors = READERS[kind](path)
    naming = keymaps.detect_naming(tensors)
    state = keymaps.to_transformers(tensors, naming)
    config = BitConfig(**keymaps.infer_architecture(state), ws_eps=SOURCE_WS_EPS[naming])
    hint = name or path.name
    return Checkpoint(naming, kind, str(path), state, config, _preprocessing_for(naming, hint, config))


def _preprocessing_for(naming: str, hint: str, config: BitConfig) -> Preprocessing:
    if naming == keymaps.TIMM:
        return timm_preprocessing(hint, config.num_labels, keymaps.architecture_name(config))
    if naming in (keymaps.GOOGLE, keymaps.BIG_TRANSFER):
        return original_preprocessing(hint, config.num_labels)
    return TRANSFORMERS_DEFAULT


def _read_directory(directory: Path, name: str | None) -> Checkpoint:
    config_path = directory / CONFIG_NAME
    if not config_path.is_file():
        raise CheckpointError(f"{directory} is a directory without {CONFIG_NAME}; pass the weights file itself")
    config_dict = read_json(config_path)
    if "architecture" in config_dict and "model_type" not in config_dict:
        return _read_timm_directory(directory, config_dict, name)
    from ..pretrained import read_directory_weights

    state = keymaps.to_transformers(read_directory_weights(directory), keymaps.TRANSFORMERS)
    config = BitConfig.from_dict(config_dict)
    preprocessor_path = directory / PREPROCESSOR_CONFIG_NAME
    preprocessor = read_json(preprocessor_path) if preprocessor_path.is_file() else None
    return Checkpoint(
        keymaps.TRANSFORMERS, "directory", str(directory), state, config,
        preprocessing=None if preprocessor else TRANSFORMERS_DEFAULT, preprocessor_config=preprocessor,
    )


def _read_timm_directory(directory: Path, config_dict: dict[str, Any], name: str | None) -> Checkpoint:
    """A timm hub snapshot: config.json with `architecture` and `pretrained_cfg`, plus the weights."""
    architecture = str(config_dict["architecture"])
    if not architecture.startswith("resnetv2_") or "bit" not in architecture:
        raise CheckpointError(
            f"{directory} holds timm's {architecture}, which is not a BiT model (expected resnetv2_*_bit)"
        )
    for file_name in ("model.safetensors", "pytorch_model.bin"):
        if (directory / file_name).is_file():
            weights = directory / file_name
            break
    else:
        raise CheckpointError(f"no weights in {directory}: expected model.safetensors or pytorch_model.bin")
    checkpoint = read_checkpoint(weights, name or directory.name)
    if checkpoint.naming != keymaps.TIMM:
        raise CheckpointError(f"{weights} does not use timm's key names although {directory / CONFIG_NAME} is timm's")
    checkpoint.container = "directory"
    checkpoint.source = str(directory)
    cfg = config_dict.get("pretrained_cfg")
    if isinstance(cfg, dict):
        checkpoint.preprocessing = timm_pretrained_cfg_preprocessing(cfg)
    labels = config_dict.get("label_names")
    if isinstance(labels, list) and len(labels) == checkpoint.config.num_labels:
        checkpoint.labels = [str(label) for label in labels]
    return checkpoint
