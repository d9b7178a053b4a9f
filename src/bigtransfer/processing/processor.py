"""BitImageProcessor: resize, center crop, rescale and normalize images for BiT models.

A drop-in replacement for `transformers.BitImageProcessor` (same arguments, defaults and
`preprocessor_config.json` schema) that imports no model code and no `transformers`.

Pipeline per image: convert to RGB (transparency composited onto white) -> resize so the shortest
edge is `size["shortest_edge"]` (long edge `int(S * long / short)`, truncated) or squash to
`size["height"], size["width"]` -> center crop to `crop_size` (zero padding when the image is
smaller) -> `(x * rescale_factor - mean) / std`, channels first, float32. The first step, turning
each input (file, PIL image, array, tensor) into a pixel tensor, is `bigtransfer.images`; its
`open_image` and `rgb_array` are re-exported here.

Speed: the image is read into a uint8 array once and resized with torch's antialiased uint8
kernels (the same ones torchvision, and so transformers' `BitImageProcessor`, uses), working
in place on the channels-last layout PIL hands out; grayscale is resized as one channel and
broadcast to RGB afterwards; rescale and normalize are fused into one multiply-add written
straight into the output batch (in NumPy: torch's threaded elementwise kernels stall on a busy
CPU). No float64 anywhere.

Deliberate differences from transformers (all documented on `BitImageProcessor.preprocess`):
16-bit images are scaled to the 8-bit range instead of clipped to white, integer arrays outside
0..255 raise instead of saturating, NaN/Inf inputs raise, and a float image already in [0, 1]
draws a warning (it is still rescaled by 1/255, as transformers does).
"""

from __future__ import annotations

import dataclasses
import json
import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import PIL.Image
import torch

from .. import hub
from ..files import read_json, write_text_atomic
from ..images import flatten_images, image_to_tensor, open_image, rgb_array  # the last two re-exported
from .arguments import (
    SIZE_KEY_SETS,
    CallOptions,
    as_bool,
    as_floats,
    as_layout,
    as_return_tensors,
    as_size_dict,
    one_image,
    size_mapping,
)
from .ops import (
    Resampling,
    affine,
    as_resample,
    center_crop,
    normalize_batch,
    resize,
    resize_and_crop,
    resized_hw,
)

__all__ = [
    "BIT_MEAN",
    "BIT_STD",
    "OPENAI_CLIP_MEAN",
    "OPENAI_CLIP_STD",
    "IMAGE_PROCESSOR_CONFIG_NAME",
    "BatchFeature",
    "BitImageProcessor",
    "open_image",
    "rgb_array",
]

# The normalization `google/bit-50` and transformers' BitImageProcessor default to.
OPENAI_CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
OPENAI_CLIP_STD = (0.26862954, 0.26130258, 0.27577711)
# Inputs in [-1, 1]: the original BiT code, its checkpoints and timm's BiT configs.
BIT_MEAN = (0.5, 0.5, 0.5)
BIT_STD = (0.5, 0.5, 0.5)
IMAGE_PROCESSOR_CONFIG_NAME = "preprocessor_config.json"
# transformers >= 5 may nest the image processor config in processor_config.json["image_processor"].
PROCESSOR_CONFIG_NAME = "processor_config.json"

_CONFIG_KEYS = (
    "do_resize",
    "size",
    "resample",
    "do_center_crop",
    "crop_size",
    "do_rescale",
    "rescale_factor",
    "do_normalize",
    "image_mean",
    "image_std",
    "do_convert_rgb",
)
# Keys transformers writes or reads that carry no setting of ours; not echoed back on save.
_DROPPED_KEYS = {"image_processor_type", "feature_extractor_type"}


class BatchFeature(dict):
    """Dict of model inputs (`{"pixel_values": ...}`) with attribute access and `.to()`.

    Mirrors the parts of `transformers.BatchFeature` that callers use: `out["pixel_values"]`,
    `out.pixel_values`, `model(**out)` and `out.to("cuda")` / `out.to(torch.float16)`.
    """

    def __getattr__(self, name: str) -> Any:
        try:
            return self[name]
        except KeyError:
            raise AttributeError(f"BatchFeature has no field {name!r}; fields: {list(self)}") from None

    @property
    def data(self) -> dict[str, Any]:
        """The fields as a plain dict (transformers' `BatchFeature.data`)."""
        return dict(self)

    def to(self, *args: Any, **kwargs: Any) -> BatchFeature:
        """Move/cast every torch tensor (e.g. `.to("cuda")`, `.to(torch.bfloat16)`); returns self."""
        for key, value in self.items():
            if isinstance(value, torch.Tensor):
                self[key] = value.to(*args, **kwargs)
        return self


# --------------------------------------------------------------------------- geometry


# --------------------------------------------------------------------------- the processor


class BitImageProcessor:
    """Image processor for BiT models, compatible with `transformers.BitImageProcessor`.

    Arguments (and their defaults) are transformers': resize the shortest edge to 224 with
    bicubic resampling, center crop 224x224, rescale by 1/255, normalize with the OpenAI CLIP
    mean/std, convert to RGB. `size` may also be `{"height": h, "width": w}` (squash resize, as
    the original BiT evaluation and timm configs do) or `{"shortest_edge": s, "longest_edge": l}`;
    `size=42` means `{"shortest_edge": 42}` (or a square with `default_to_square=True`) and
    `crop_size=84` means `{"height": 84, "width": 84}`, as in transformers.

    Unknown keyword arguments (e.g. keys of a config written by another processor) are kept in
    `extra_config` and written back by `save_pretrained`.

    Example:
        >>> processor = BitImageProcessor()
        >>> batch = processor(PIL.Image.open("cat.jpg"), return_tensors="pt")
        >>> batch["pixel_values"].shape
        torch.Size([1, 3, 224, 224])

    Input conventions (transformers' where it has one):
        - uint8 and integer inputs with values in 0..255 are 8-bit pixels.
        - Floats are taken on the same 0..255 scale and rescaled by `rescale_factor`, as
          transformers does; a warning is issued when they all lie in [0, 1] (pass
          `do_rescale=False` for such data). NaN/Inf raise ValueError.
        - 16-bit images (uint16 arrays, PIL I;16, PIL mode I with values above 255) are
          mapped to the 8-bit scale by dividing by 257 (65535 -> 255), kept in float.
          transformers clips them to white (or raises); this is the deliberate difference.
        - Transparency (alpha channel, LA, RGBA, P with a transparency key) is composited onto
          white, as transformers does; 4-channel float arrays hold alpha in [0, 1] when all
          values are <= 1, else in 0..255.
        - Zero padding of a too-small image during center crop puts (crop - size) // 2 pixels
          before it, as transformers' (torchvision-based) BitImageProcessor does (its
          BitImageProcessorPil puts the odd pixel before the image instead).
        - Also unlike transformers: 2-D (H, W) arrays are accepted as grayscale; integer
          arrays of wider types are cast to uint8 before resizing (so bicubic ringing is
          clipped, as for uint8, where transformers' torchvision path keeps it); PIL mode F
          images are read as float arrays rather than quantized to 8 bits; BOX and HAMMING
          resampling work (through PIL, as in transformers' PIL backend).
    """

    model_input_names = ["pixel_values"]

    def __init__(
        self,
        do_resize: bool = True,
        size: int | Sequence[int] | Mapping[str, int] | None = None,
        resample: Resampling | int | str = Resampling.BICUBIC,
        do_center_crop: bool = True,
        crop_size: int | Sequence[int] | Mapping[str, int] | None = None,
        do_rescale: bool = True,
        rescale_factor: float = 1 / 255,
        do_normalize: bool = True,
        image_mean: float | Sequence[float] | None = None,
        image_std: float | Sequence[float] | None = None,
        do_convert_rgb: bool = True,
        *,
        default_to_square: bool | None = None,
        **extra_config: Any,
    ) -> None:
        # None means "the default", as in transformers (configs may hold explicit nulls).
        self.do_resize = as_bool(True if do_resize is None else do_resize, "do_resize")
        self.size = as_size_dict(
            {"shortest_edge": 224} if size is None else size, "size", bool(default_to_square), SIZE_KEY_SETS
        )
        self.resample = as_resample(Resampling.BICUBIC if resample is None else resample)
        self.do_center_crop = as_bool(True if do_center_crop is None else do_center_crop, "do_center_crop")
        self.crop_size = as_size_dict(
            {"height": 224, "width": 224} if crop_size is None else crop_size,
            "crop_size",
            True,
            SIZE_KEY_SETS[:1],
        )
        self.do_rescale = as_bool(True if do_rescale is None else do_rescale, "do_rescale")
        self.rescale_factor = as_floats(
            1 / 255 if rescale_factor is None else rescale_factor, "rescale_factor"
        )[0]
        self.do_normalize = as_bool(True if do_normalize is None else do_normalize, "do_normalize")
        self.image_mean = as_floats(OPENAI_CLIP_MEAN if image_mean is None else image_mean, "image_mean")
        self.image_std = as_floats(OPENAI_CLIP_STD if image_std is None else image_std, "image_std")
        if 0.0 in self.image_std:
            raise ValueError(f"image_std must not contain 0, got {self.image_std}")
        self.do_convert_rgb = as_bool(True if do_convert_rgb is None else do_convert_rgb, "do_convert_rgb")
        self.extra_config = {k: v for k, v in extra_config.items() if k not in _DROPPED_KEYS}
        if default_to_square is not None:  # transformers writes it back when it was given explicitly
            self.extra_config["default_to_square"] = as_bool(default_to_square, "default_to_square")

    # ------------------------------------------------------------------ processing

    def __call__(self, images: Any, **kwargs: Any) -> BatchFeature:
        """Same as `preprocess`."""
        return self.preprocess(images, **kwargs)

    def preprocess(
        self,
        images: Any,
        do_resize: bool | None = None,
        size: int | Sequence[int] | Mapping[str, int] | None = None,
        resample: Resampling | int | str | None = None,
        do_center_crop: bool | None = None,
        crop_size: int | Sequence[int] | Mapping[str, int] | None = None,
        do_rescale: bool | None = None,
        rescale_factor: float | None = None,
        do_normalize: bool | None = None,
        image_mean: float | Sequence[float] | None = None,
        image_std: float | Sequence[float] | None = None,
        do_convert_rgb: bool | None = None,
        return_tensors: str | None = None,
        data_format: str | None = None,
        input_data_format: str | None = None,
        device: str | torch.device | None = None,
        default_to_square: bool | None = None,
    ) -> BatchFeature:
        """Turn images into `pixel_values`; any argument left None takes the processor's setting.

        Args:
            images: a PIL image (any mode: RGB, L, LA, RGBA, P with or without transparency, CMYK,
                1, I;16, I, F, ...), a numpy array or torch tensor of shape (H, W), (C, H, W) or
                (H, W, C) with C in 1, 3, 4, a 4-D batch (N, C, H, W) / (N, H, W, C), a path to a
                local image file, or a (nested) list of these.
            return_tensors: "pt" -> float32 torch tensor (N, C, H, W); "np" -> numpy array;
                None -> a list of (C, H, W) float32 numpy arrays (images may then differ in size).
            data_format: "channels_first" (default) or "channels_last" for the output.
            input_data_format: channel layout of array inputs; inferred like transformers when
                None (channels first when both the first and last axes could be channels).
            device: move the output tensor there (with return_tensors="pt").
            default_to_square: read an int `size` as a square instead of the shortest edge.
            The other arguments override the processor's settings for this call only. As in
            transformers, the five call options above may also be given to the constructor
            (or be in the config file) to become this processor's defaults.

        Input conventions: see the class docstring.

        Returns:
            BatchFeature with "pixel_values".

        Raises:
            ValueError / TypeError naming the problem for empty input, unsupported types or
            dtypes, wrong channel counts, NaN/Inf values, invalid sizes or unknown options.
        """
        options = self._call_options(
            do_resize=do_resize, size=size, resample=resample, do_center_crop=do_center_crop, crop_size=crop_size,
            do_rescale=do_rescale, rescale_factor=rescale_factor, do_normalize=do_normalize, image_mean=image_mean,
            image_std=image_std, do_convert_rgb=do_convert_rgb, return_tensors=return_tensors,
            data_format=data_format, input_data_format=input_data_format, device=device,
            default_to_square=default_to_square,
        )
        processed = [_resize_and_crop_one(image, options) for image in flatten_images(images)]
        return BatchFeature(pixel_values=_normalized(processed, options))

    def _call_options(self, **given: Any) -> CallOptions:
        """This call's settings: what it was given, else the processor's (validated as the constructor does)."""
        call_defaults = self.extra_config  # transformers lets the config set the call options too
        default_to_square = given["default_to_square"]
        if default_to_square is None:
            default_to_square = call_defaults.get("default_to_square", False)

        def flag(name: str) -> bool:
            return getattr(self, name) if given[name] is None else as_bool(given[name], name)

        std = as_floats(self.image_std if given["image_std"] is None else given["image_std"], "image_std")
        if flag("do_normalize") and 0.0 in std:
            raise ValueError(f"image_std must not contain 0, got {std}")
        return CallOptions(
            do_resize=flag("do_resize"),
            size=as_size_dict(self.size if given["size"] is None else given["size"], "size", bool(default_to_square),
                               SIZE_KEY_SETS),
            resample=as_resample(self.resample if given["resample"] is None else given["resample"]),
            do_center_crop=flag("do_center_crop"),
            crop=as_size_dict(self.crop_size if given["crop_size"] is None else given["crop_size"], "crop_size", True,
                               SIZE_KEY_SETS[:1]),
            do_rescale=flag("do_rescale"),
            rescale_factor=as_floats(
                self.rescale_factor if given["rescale_factor"] is None else given["rescale_factor"], "rescale_factor"
            )[0],
            do_normalize=flag("do_normalize"),
            mean=as_floats(self.image_mean if given["image_mean"] is None else given["image_mean"], "image_mean"),
            std=std,
            do_convert_rgb=flag("do_convert_rgb"),
            return_tensors=as_return_tensors(
                call_defaults.get("return_tensors") if given["return_tensors"] is None else given["return_tensors"]
            ),
            out_layout=as_layout(given["data_format"] or call_defaults.get("data_format") or "channels_first"),
            in_layout=as_layout(call_defaults.get("input_data_format") if given["input_data_format"] is None
                                 else given["input_data_format"]),
            device=call_defaults.get("device") if given["device"] is None else given["device"],
        )

    # ------------------------------------------------------------------ configuration

    def to_dict(self) -> dict[str, Any]:
        """The transformers `preprocessor_config.json` contents (plus kept unknown keys), with transformers' types
        (PIL's Resampling, tuples of means and deviations)."""
        config = dict(self.extra_config)
        config.update(
            do_resize=self.do_resize,
            size=dict(self.size),
            resample=Resampling(self.resample),
            do_center_crop=self.do_center_crop,
            crop_size=dict(self.crop_size),
            do_rescale=self.do_rescale,
            rescale_factor=self.rescale_factor,
            do_normalize=self.do_normalize,
            image_mean=tuple(self.image_mean),
            image_std=tuple(self.image_std),
            do_convert_rgb=self.do_convert_rgb,
            image_processor_type="BitImageProcessor",
        )
        return config

    def to_json_string(self) -> str:
        return json.dumps(self.to_dict(), indent=2, sort_keys=True) + "\n"

    def to_json_file(self, path: str | os.PathLike) -> None:
        """Write `to_json_string()` to `path`, atomically."""
        write_text_atomic(path, self.to_json_string())

    @classmethod
    def squash(cls, size: int, mean: Sequence[float] = BIT_MEAN, std: Sequence[float] = BIT_STD,
               resample: Any = Resampling.BILINEAR) -> BitImageProcessor:
        """BiT's evaluation transform as a processor: squash to size x size (bilinear, no crop), normalise. What a
        training run evaluates with and saves beside its model."""
        return cls(size={"height": size, "width": size}, crop_size={"height": size, "width": size},
                   resample=resample, image_mean=list(mean), image_std=list(std))

    @classmethod
    def from_dict(cls, config: Mapping[str, Any], **overrides: Any) -> BitImageProcessor:
        """Build from a config dict (transformers' schema); `overrides` replace its keys."""
        if not isinstance(config, Mapping):
            raise TypeError(f"an image processor config must be a dict, got {type(config).__name__}")
        return cls(**{**config, **overrides})

    @classmethod
    def from_pretrained(
        cls, path: str | os.PathLike, revision: str | None = None, **overrides: Any
    ) -> BitImageProcessor:
        """Load `preprocessor_config.json` from a directory, a config JSON file given directly, or a Hugging Face
        Hub repository (`google/bit-50`, downloaded into the cache), resolved as models and configs are
        (`hub.locate`): `revision`, `cache_dir`, `token`, `local_files_only`, `force_download` and `subfolder` as in
        transformers.

        Reads transformers-written files (including a `processor_config.json` whose
        "image_processor" entry holds the settings). `overrides` replace loaded keys. Checkpoints that carry no
        preprocessor config (timm files and repositories, Google's .npz) have theirs in
        `bigtransfer.checkpoints.read(source).preprocessor_dict()`.

        Raises:
            OSError: the path does not exist or the directory holds no config.
            ValueError: the file is not valid JSON or not a JSON object.
        """
        options = hub.hub_options({**overrides, "revision": revision})  # and cache_dir, token, subfolder, ...
        overrides = {key: value for key, value in overrides.items() if key not in dataclasses.asdict(options)}
        local = hub.local_source(path, options)
        nested = local / PROCESSOR_CONFIG_NAME if local is not None and local.is_dir() else None
        if nested is not None and nested.is_file():
            processor_config = read_json(nested)
            if isinstance(processor_config.get("image_processor"), Mapping):
                return cls.from_dict(processor_config["image_processor"], **overrides)
        file = hub.locate(path, IMAGE_PROCESSOR_CONFIG_NAME, options)
        return cls.from_dict(read_json(file), **overrides)

    @classmethod
    def from_json_file(cls, path: str | os.PathLike) -> BitImageProcessor:
        """Read a preprocessor config JSON file (transformers' `from_json_file`)."""
        return cls.from_dict(read_json(path))

    def push_to_hub(self, repo_id: str, **options: Any):
        """Upload preprocessor_config.json to the Hugging Face Hub repository `repo_id` (created if missing)."""
        return hub.push_folder(repo_id, self.save_pretrained, **options)

    # ------------------------------------------------------------------ single steps (transformers' methods)
    # On one (C, H, W) image, a torch tensor or a numpy array, returned as the same type.

    def resize(self, image: Any, size: Any, resample: Any = None, **kwargs: Any) -> Any:
        """Resize as `preprocess` does: `size` is a dict (or transformers' SizeDict) of height/width or
        shortest_edge (and longest_edge)."""
        size = as_size_dict(size_mapping(size), "size", False, SIZE_KEY_SETS)
        pixels, back = one_image(image)
        height, width = resized_hw(pixels.shape[-2], pixels.shape[-1], size)
        return back(resize(pixels, height, width, as_resample(self.resample if resample is None else resample)))

    def center_crop(self, image: Any, size: Any, **kwargs: Any) -> Any:
        """Center crop to size["height"] x size["width"], zero padding where the image is smaller."""
        size = as_size_dict(size_mapping(size), "size", True, SIZE_KEY_SETS[:1])
        pixels, back = one_image(image)
        return back(center_crop(pixels, size["height"], size["width"]))

    def rescale(self, image: Any, scale: float, **kwargs: Any) -> Any:
        """`image * scale`, in float32."""
        pixels, back = one_image(image)
        return back(pixels.float() * float(scale))

    def normalize(self, image: Any, mean: Any, std: Any, **kwargs: Any) -> Any:
        """`(image - mean) / std` per channel, in float32."""
        pixels, back = one_image(image)
        mean = torch.tensor(as_floats(mean, "mean"), dtype=torch.float32).view(-1, 1, 1)
        std = torch.tensor(as_floats(std, "std"), dtype=torch.float32).view(-1, 1, 1)
        return back((pixels.float() - mean) / std)

    def save_pretrained(self, directory: str | os.PathLike) -> list[str]:
        """Write `directory/preprocessor_config.json` (created if needed); returns the written paths."""
        directory = Path(os.fspath(directory))
        if directory.is_file():
            raise NotADirectoryError(f"save_pretrained needs a directory, {str(directory)!r} is a file")
        directory.mkdir(parents=True, exist_ok=True)
        file = directory / IMAGE_PROCESSOR_CONFIG_NAME
        write_text_atomic(file, self.to_json_string())
        return [str(file)]

    def __repr__(self) -> str:
        return f"{type(self).__name__} {self.to_json_string()}"


def _resize_and_crop_one(image: Any, options: CallOptions) -> torch.Tensor:
    """One input image as a (C, H, W) tensor on the 0..255 scale, resized and center-cropped as asked."""
    pixels = image_to_tensor(image, options.in_layout, options.do_convert_rgb, options.do_rescale)
    crop = options.crop
    if options.do_resize and options.do_center_crop:
        height, width = resized_hw(pixels.shape[-2], pixels.shape[-1], options.size)
        return resize_and_crop(pixels, height, width, crop["height"], crop["width"], options.resample)
    if options.do_resize:
        return resize(pixels, *resized_hw(pixels.shape[-2], pixels.shape[-1], options.size), options.resample)
    if options.do_center_crop:
        return center_crop(pixels, crop["height"], crop["width"])
    return pixels


def _normalized(processed: list[torch.Tensor], options: CallOptions) -> Any:
    """The rescaled, normalized images: one batch in the asked-for type, or a list when sizes differ."""
    channels = 3 if options.do_convert_rgb else processed[0].shape[0]
    if any(p.shape[0] not in (1, channels) or (not options.do_convert_rgb and p.shape[0] != channels) for p in processed):
        raise ValueError(
            f"images have different channel counts {sorted({p.shape[0] for p in processed})}; "
            "with do_convert_rgb=False every image must have the same number of channels"
        )
    scale, offset = affine(channels, options.do_rescale, options.rescale_factor, options.do_normalize,
                            options.mean, options.std)
    shapes = {tuple(p.shape[-2:]) for p in processed}
    if options.return_tensors is not None and len(shapes) > 1:
        raise ValueError(
            f"images end up with different sizes {sorted(shapes)} (no center crop); stacking them into one "
            "tensor is impossible: use do_center_crop=True, size={'height': h, 'width': w}, or return_tensors=None"
        )
    if len(shapes) > 1:
        return [normalize_batch([p], channels, *p.shape[-2:], scale, offset, options.out_layout)[0] for p in processed]
    batch = normalize_batch(processed, channels, *shapes.pop(), scale, offset, options.out_layout)
    if options.return_tensors == "pt":
        pixel_values = torch.from_numpy(batch)
        return pixel_values if options.device is None else pixel_values.to(options.device)
    return batch if options.return_tensors == "np" else list(batch)


class ProcessorTransform:
    """One PIL image -> its (C, H, W) tensor through a BitImageProcessor: a picklable per-image transform for
    DataLoader workers (the `generator` argument that training transforms take is accepted and unused)."""

    def __init__(self, processor: BitImageProcessor):
        self.processor = processor
        # Resolved once: data sets call this per image, where resolving the settings each time cost as much as a
        # small image's resize.
        names = ("do_resize", "size", "resample", "do_center_crop", "crop_size", "do_rescale", "rescale_factor",
                 "do_normalize", "image_mean", "image_std", "do_convert_rgb", "data_format", "input_data_format",
                 "device", "default_to_square")
        self.options = processor._call_options(**dict.fromkeys(names), return_tensors="pt")

    def __call__(self, image: PIL.Image.Image, generator: Any = None) -> torch.Tensor:
        return _normalized([_resize_and_crop_one(image, self.options)], self.options)[0]
