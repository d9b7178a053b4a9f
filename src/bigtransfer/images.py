"""Images in, pixel arrays out: every decode of an image file, and conversion of user input to tensors.

`open_image` decodes a file as stored (any mode), `load_image` as 8-bit RGB, `decode_image` as 8-bit RGB at the
least size a resize needs (JPEGs at 1/2, 1/4 or 1/8 scale): the processor, the data sources, prediction and
evaluation all decode here. Everything the image processor accepts (PIL images in any mode, numpy arrays, torch tensors, paths of
local image files, and lists or 4-D batches of them) becomes one `(C, H, W)` tensor per image here, uint8
or float32 on the 0..255 scale, before any resizing or normalization (`bigtransfer.processing`).

Conversion rules, shared by all of them:
16-bit images are scaled to the 8-bit range (65535 -> 255) instead of clipped; transparency is composited
onto white, as transformers does; integer arrays outside 0..255 and NaN/Inf values raise; files over
`PIL.Image.MAX_IMAGE_PIXELS` pixels are refused before they are decoded (decompression bombs).
"""

from __future__ import annotations

import io
import math
import os
import warnings
from typing import Any

import numpy as np
import PIL.ExifTags
import PIL.Image
import PIL.ImageOps
import torch

from .errors import BadImageError, NotRegularFileError
from .files import open_regular

__all__ = ["open_image", "load_image", "decode_image", "rgb_array", "flatten_images", "image_to_tensor"]


# A progressive JPEG is decoded once per scan: encoders write about 10 (jpegtran's default script), while a crafted
# 1.6 MB file with 12,000 scans took 133 s of CPU. More than this many is refused before decoding.
MAX_JPEG_SCANS = 100
# EXIF orientation -> the transpose that shows the image upright (the tag's values 2-8; 1 is upright already).
_ORIENTATION_TRANSPOSE = {
    2: PIL.Image.Transpose.FLIP_LEFT_RIGHT, 3: PIL.Image.Transpose.ROTATE_180, 4: PIL.Image.Transpose.FLIP_TOP_BOTTOM,
    5: PIL.Image.Transpose.TRANSPOSE, 6: PIL.Image.Transpose.ROTATE_270, 7: PIL.Image.Transpose.TRANSVERSE,
    8: PIL.Image.Transpose.ROTATE_90,
}


class MemoryImage:
    """An encoded image held in memory (a tar shard's member, a Parquet cell), named for error messages; the
    readers below take it wherever they take a path."""

    def __init__(self, data: bytes, name: str):
        self.data, self.name = data, name

    def __fspath__(self) -> str:  # for messages only: there is no such file
        return self.name


def _open_handle(path: str | os.PathLike | MemoryImage) -> tuple[Any, str]:
    """(binary handle, name) of an image file or a MemoryImage."""
    if isinstance(path, MemoryImage):
        return io.BytesIO(path.data), path.name
    return open_regular(path), os.fspath(path)


def open_image(path: str | os.PathLike | MemoryImage) -> PIL.Image.Image:
    """Open and fully decode a local image file (the first frame of an animation); the file is closed.

    An EXIF orientation tag is applied, so photos come out upright as viewers show them (as transformers'
    `load_image` does; torchvision's and timm's loaders leave them as stored); metadata too damaged to read
    leaves the image as stored.

    Raises:
        FileNotFoundError: there is no such file.
        BadImageError (a ValueError) naming the file, for anything else that keeps it from decoding: it is not a
            regular file (a FIFO would block forever), not an image PIL can read, truncated or corrupt, a
            progressive JPEG of more than `MAX_JPEG_SCANS` scans, or it has more pixels than
            `PIL.Image.MAX_IMAGE_PIXELS` (Pillow's guard against decompression bombs; raise that limit, or set it
            to None, to read such images).
    """
    _check_local(path)
    name = os.fspath(path)
    try:
        handle, name = _open_handle(path)
    except FileNotFoundError:
        raise FileNotFoundError(f"image file not found: {name!r}") from None
    except NotRegularFileError as error:  # a FIFO or a device: reading would block or never end
        raise BadImageError(name, str(error)) from None
    with handle:
        try:
            with PIL.Image.open(handle) as image:
                _check_budget(image, handle, name)
                image.load()  # decodes now, so truncation and corruption are reported here, with the path
                return upright(image)
        except PIL.UnidentifiedImageError:
            raise BadImageError(name, "not an image file PIL can read") from None
        except PIL.Image.DecompressionBombError as error:
            raise BadImageError(
                name,
                f"more pixels than PIL.Image.MAX_IMAGE_PIXELS = {PIL.Image.MAX_IMAGE_PIXELS}, refused as a possible "
                f"decompression bomb ({error}); raise that limit to read it",
            ) from None
        except BadImageError:
            raise
        except Exception as error:  # a decoder meeting damaged bytes raises almost anything (struct.error, ...)
            raise BadImageError(name, f"{type(error).__name__}: {error}") from None


def _check_budget(image: PIL.Image.Image, handle: Any, name: str) -> None:
    """Refuse, before decoding, what would cost far more than an image of its size should."""
    limit = PIL.Image.MAX_IMAGE_PIXELS  # Pillow only warns between 1x and 2x this: refuse it all
    if limit is not None and image.width * image.height > limit:
        raise PIL.Image.DecompressionBombError(f"{image.width}x{image.height} pixels")
    if image.format == "JPEG" and (image.info.get("progressive") or image.info.get("progression")):
        position = handle.tell()
        handle.seek(0)
        scans = handle.read().count(b"\xff\xda")  # start-of-scan markers: 0xFF in scan data is stuffed as FF00
        handle.seek(position)
        if scans > MAX_JPEG_SCANS:
            raise BadImageError(name, f"a progressive JPEG of {scans} scans, more than the {MAX_JPEG_SCANS} encoders write; "
                                "refused (each scan decodes the whole image again)")


def orientation(image: PIL.Image.Image) -> int:
    """The EXIF orientation of an image (1, upright, when it has none or its metadata cannot be read)."""
    try:
        value = image.getexif().get(PIL.ExifTags.Base.Orientation, 1)
    except Exception:  # damaged EXIF blocks raise struct.error, TypeError, ...: the pixels are still fine
        return 1
    return value if value in _ORIENTATION_TRANSPOSE else 1


def upright(image: PIL.Image.Image) -> PIL.Image.Image:
    """The image as viewers show it: its EXIF orientation applied (only the tag is read, so one mistyped tag
    elsewhere in the metadata does not stop it)."""
    transpose = _ORIENTATION_TRANSPOSE.get(orientation(image))
    return image if transpose is None else image.transpose(transpose)


def load_image(path: str | os.PathLike | MemoryImage) -> PIL.Image.Image:
    """Open and fully decode an image file as 8-bit RGB; raises `BadImageError` naming the file.

    Conversion is the image processor's (`rgb_array`): 16-bit images are scaled rather than clipped,
    transparency is composited onto white, and floating-point images (TIFFs) are read by their range
    (`float_pixels_to_8bit`). Files over Pillow's
    `MAX_IMAGE_PIXELS` (decompression bombs) are refused without being decoded.
    """
    try:
        with open_image(path) as image:
            return image if image.mode == "RGB" else PIL.Image.fromarray(rgb_array(image))
    except BadImageError:
        raise
    except (OSError, ValueError) as error:
        raise BadImageError(str(path), f"{type(error).__name__}: {error}") from error


def float_pixels_to_8bit(pixels: np.ndarray, name: str = "") -> np.ndarray:
    """uint8 pixels of a floating-point image (a float TIFF, PIL mode "F"), read by its range: [0, 1] is scaled by
    255, 0..255 kept, 0..65535 (16-bit data stored as floats) divided by 257 as 16-bit integers are; the decoder
    and the processor both read such files this way. ValueError (naming the file `name`, if given) for NaN, Inf
    or another range."""
    pixels = np.asarray(pixels, dtype=np.float32)
    prefix = f"{name}: " if name else ""
    if not np.isfinite(pixels).all():
        raise ValueError(f"{prefix}image contains NaN or Inf values")
    low, high = float(pixels.min(initial=0.0)), float(pixels.max(initial=0.0))
    if low < 0 or high > 65535:
        raise ValueError(f"{prefix}a floating-point image with values in [{low:g}, {high:g}]; expected [0, 1], "
                         "0..255 or 0..65535: scale it to one of them first")
    scale = 255.0 if high <= 1.0 else 1.0 if high <= 255.0 else 1 / 257
    if scale != 1.0:
        warnings.warn(f"{prefix}a floating-point image with values in [0, {'1' if high <= 1 else '65535'}]; "
                      "scaled to 0..255", UserWarning, stacklevel=2)
    return np.rint(pixels * np.float32(scale)).clip(0, 255).astype(np.uint8)


def decode_image(path: str | os.PathLike | MemoryImage, min_size: int | tuple[int, int] | None = None) -> PIL.Image.Image:
    """Decode an image file as 8-bit RGB, JPEGs at reduced size when the result will be downscaled anyway.

    libjpeg can decode at 1/2, 1/4 or 1/8 scale for a fraction of the cost (and memory) of a full decode.
    `min_size` says how large the image must stay: an int is the shortest edge (for shortest-edge resizing,
    aspect kept), a (height, width) pair is the least size of each side (for squash resizing). The largest
    reduction that keeps the image at least that large is used; other formats, or `min_size=None`, decode in
    full (`load_image`). A JPEG above `PIL.Image.MAX_IMAGE_PIXELS` whose reduced decode fits under it is read
    (up to Pillow's own hard stop at twice the limit, where `Image.open` refuses). Pixels then differ from a full decode followed by the same resize by the decoder's
    DCT-domain downscaling (a few grey levels on edges), the usual trade for fast JPEG pipelines.
    """
    if min_size is None:
        return load_image(path)
    try:
        handle, name = _open_handle(path)
        with handle, warnings.catch_warnings():
            # A JPEG above the pixel limit is fine when its reduced decode is not: checked after the draft.
            warnings.simplefilter("ignore", PIL.Image.DecompressionBombWarning)
            with PIL.Image.open(handle) as image:
                width, height = image.size
                if image.format != "JPEG":
                    raise _FullDecode
                turned = orientation(image) in (5, 6, 7, 8)  # stored on its side
                if turned and not isinstance(min_size, int):
                    min_size = (min_size[1], min_size[0])  # the request is in stored orientation
                if isinstance(min_size, int):
                    scale = min_size / max(min(width, height), 1)
                    request = (math.ceil(width * scale), math.ceil(height * scale))
                else:
                    request = (int(min_size[1]), int(min_size[0]))
                if request[0] >= width or request[1] >= height:
                    raise _FullDecode
                image.draft("RGB" if image.mode in ("RGB", "YCbCr") else image.mode, request)
                _check_budget(image, handle, name)  # the size to be decoded: a reduced one may fit where the full did not
                image.load()
                image = upright(image)  # as `open_image` returns it
                return image if image.mode == "RGB" else PIL.Image.fromarray(rgb_array(image))
    except Exception:
        # Anything unusual (other formats, bombs, FIFOs, corrupt files) takes the full decode, which reports it.
        return load_image(path)


class _FullDecode(Exception):
    """Internal: this file is decoded in full."""


def _check_local(path: str | os.PathLike) -> None:
    """Raise ValueError for a URL: only local files are read."""
    if isinstance(path, str) and "://" in path:
        raise ValueError(f"only local image files are read, got the URL {path!r}; download it first")


def rgb_array(image: PIL.Image.Image) -> np.ndarray:
    """(H, W, 3) uint8 RGB of a PIL image in any mode, converted as the processor converts it.

    16-bit images are scaled to 8 bits (65535 -> 255) rather than clipped; transparency is composited
    onto white; CMYK, palette, 1-bit and float images go through PIL's conversion.
    """
    if image.mode == "RGB":
        return np.array(image)
    pixels = image_to_tensor(image, None, do_convert_rgb=True, do_rescale=False)
    if pixels.dtype != torch.uint8:
        pixels = pixels.round().clamp_(0, 255).to(torch.uint8)
    return np.ascontiguousarray(pixels.expand(3, -1, -1).permute(1, 2, 0).numpy())


# --------------------------------------------------------------------------- user input -> single images


def flatten_images(images: Any) -> list:
    """Flat list of single images from an image, a 4-D batch, or (nested) lists of them.

    Paths are checked (local files only) but not opened yet; arrays and tensors are not copied.

    Raises:
        ValueError: an empty list or batch, an array of the wrong number of dimensions, or a URL.
        TypeError: something that is not an image, a path or a list of them.
    """
    if isinstance(images, (list, tuple)):
        if len(images) == 0:
            raise ValueError("images is an empty list; pass at least one image")
        flat = []
        for item in images:
            if isinstance(item, (list, tuple)):
                flat.extend(flatten_images(item))
            else:
                flat.extend(_flatten_one(item))
        return flat
    return _flatten_one(images)


def _flatten_one(image: Any) -> list:
    """The single images of one non-list input (a batch array gives one per entry)."""
    if isinstance(image, (str, os.PathLike)):
        _check_local(image)
        return [image]  # decoded one at a time in `image_to_tensor`, so a long list holds no open files
    if isinstance(image, PIL.Image.Image):
        return [image]
    if isinstance(image, (np.ndarray, torch.Tensor)):
        if image.ndim == 4:
            if image.shape[0] == 0:
                raise ValueError(f"images is an empty batch of shape {tuple(image.shape)}")
            return list(image)
        if image.ndim in (2, 3):
            return [image]
        raise ValueError(
            f"an image array must have 2 (H, W), 3 (C, H, W or H, W, C) or 4 (a batch) dimensions, "
            f"got shape {tuple(image.shape)}"
        )
    raise TypeError(
        "images must be PIL images, numpy arrays, torch tensors, file paths, or lists of them; "
        f"got {type(image).__module__}.{type(image).__qualname__}"
    )


# --------------------------------------------------------------------------- single image -> tensor


def image_to_tensor(image: Any, layout: str | None, do_convert_rgb: bool, do_rescale: bool) -> torch.Tensor:
    """(C, H, W) uint8 or float32 tensor, values on the 0..255 scale, of one image from `flatten_images`.

    Args:
        image: a path, a PIL image, or a 2-D / 3-D numpy array or torch tensor.
        layout: "first" or "last", the channel axis of a 3-D array; None infers it as transformers does.
        do_convert_rgb: make C 1 (grayscale, broadcast to RGB by the caller) or 3, compositing alpha
            onto white; without it the channels are kept as they are.
        do_rescale: only decides whether a float image already in [0, 1] draws a warning.

    Shares memory with an array or tensor input where it can.
    """
    if isinstance(image, (str, os.PathLike)):
        with open_image(image) as decoded:
            return _array_to_tensor(
                _pil_to_array(decoded, do_convert_rgb), "last", do_convert_rgb, do_rescale
            )
    if isinstance(image, PIL.Image.Image):
        array, layout = _pil_to_array(image, do_convert_rgb), "last"
    elif isinstance(image, torch.Tensor):
        if image.is_complex() or image.dtype == torch.bool:
            raise TypeError(
                f"unsupported image dtype {image.dtype}; expected uint8, an integer or a float dtype"
            )
        image = image.detach().cpu()
        if image.dtype in (torch.float16, torch.bfloat16):
            image = image.float()
        array = image.numpy()
    else:
        array = image
    return _array_to_tensor(array, layout, do_convert_rgb, do_rescale)


def _pil_to_array(image: PIL.Image.Image, do_convert_rgb: bool) -> np.ndarray:
    """HWC (or HW) array of a PIL image, RGB-converted the way transformers does it."""
    mode = image.mode
    if mode.startswith("I;16"):
        return np.asarray(image).astype(np.uint16)  # native byte order, so it is seen as 16-bit
    if mode == "I":  # 32-bit ints; PIL also decodes some 16-bit files to this mode
        array = np.asarray(image)
        is_16_bit = array.size and array.max() > 255 and array.min() >= 0 and array.max() <= 65535
        return array.astype(np.uint16) if is_16_bit else array
    if mode == "F":
        return float_pixels_to_8bit(np.asarray(image), getattr(image, "filename", "") or "")
    if not do_convert_rgb:
        return np.array(image)  # values kept; _array_to_tensor scales or rejects them
    if mode in ("RGB", "L"):  # no conversion needed; L stays one channel and is broadcast later
        return np.array(image)
    bands = image.getbands()
    if "A" in bands or "a" in bands or image.info.get("transparency") is not None:
        rgba = image if mode == "RGBA" else image.convert("RGBA")
        return _composite_on_white(rgba)
    try:
        return np.array(image.convert("RGB"))
    except ValueError as err:
        raise ValueError(f"cannot convert a PIL image of mode {mode!r} to RGB: {err}") from None


def _composite_on_white(rgba: PIL.Image.Image) -> np.ndarray:
    """RGBA over an opaque white background; equals transformers' PIL.Image.alpha_composite."""
    canvas = PIL.Image.new("RGB", rgba.size, (255, 255, 255))
    canvas.paste(rgba, (0, 0), rgba)
    return np.array(canvas)


def _array_to_tensor(
    array: np.ndarray, layout: str | None, do_convert_rgb: bool, do_rescale: bool
) -> torch.Tensor:
    """(C, H, W) uint8 or float32 tensor (values on the 0..255 scale) from any supported array.

    Shares memory with `array` where it can. With do_convert_rgb, C is 1 (grayscale, broadcast to
    RGB at normalization time) or 3; 4-channel arrays are composited onto white.
    """
    if array.dtype == np.bool_ or not (
        np.issubdtype(array.dtype, np.integer) or np.issubdtype(array.dtype, np.floating)
    ):
        raise TypeError(
            f"unsupported image dtype {array.dtype}; expected uint8, uint16, another integer type with "
            "values in 0..255, or a float type (convert booleans with `.astype(np.uint8) * 255`)"
        )
    if array.size == 0:
        raise ValueError(f"image is empty: shape {array.shape}")
    if array.ndim == 2:
        array, layout = array[:, :, None], "last"
    elif layout is None:
        # transformers' infer_channel_dimension_format: channels first wins when both could be channels.
        if array.shape[0] in (1, 3, 4):
            layout = "first"
        elif array.shape[-1] in (1, 3, 4):
            layout = "last"
        else:
            raise ValueError(
                f"cannot tell the channel axis of an image of shape {array.shape}: expected 1, 3 or 4 "
                "channels on the first or last axis; pass input_data_format='channels_first' or "
                "'channels_last' if the layout is unusual"
            )
    if layout == "first":
        array = array.transpose(1, 2, 0)  # work channels-last: the layout interpolate is fastest on
    channels = array.shape[-1]
    if do_convert_rgb and channels not in (1, 3, 4):
        raise ValueError(
            f"image has {channels} channels (shape {array.shape} read as "
            f"{'channels_first' if layout == 'first' else 'channels_last'}); expected 1 (grayscale), "
            "3 (RGB) or 4 (RGBA)"
        )

    if array.dtype != np.uint8:
        array = _to_8bit_scale(array, do_rescale)
    if do_convert_rgb and channels == 4:
        array = _composite_array_on_white(array)
    if any(stride < 0 for stride in array.strides) or not array.flags.writeable:
        array = np.array(array)  # torch.from_numpy refuses negative strides and warns on read-only
    return torch.from_numpy(array).permute(2, 0, 1)


def _to_8bit_scale(array: np.ndarray, do_rescale: bool) -> np.ndarray:
    """uint8 or float32 array on the 0..255 scale from any integer or float array."""
    if np.issubdtype(array.dtype, np.floating):
        array = array.astype(np.float32, copy=False)
        if not np.isfinite(array).all():
            raise ValueError("image contains NaN or Inf values")
        if do_rescale and array.max(initial=0.0) <= 1.0:
            warnings.warn(
                "a float image with all values in [0, 1] is rescaled by rescale_factor (1/255 by default), "
                "as transformers does; pass do_rescale=False if it is already scaled",
                UserWarning,
                # Past _array_to_tensor, image_to_tensor and BitImageProcessor.preprocess to its caller.
                stacklevel=5,
            )
        return array
    low, high = int(array.min()), int(array.max())
    if array.dtype.kind == "u" and array.dtype.itemsize == 2:  # uint16 in either byte order
        # 16-bit data: 0..65535 -> 0..255 (65535 / 257 = 255) in float, rather than clipping to white.
        return array.astype(np.float32) * np.float32(1 / 257)
    if low < 0 or high > 255:
        raise ValueError(
            f"integer image values must lie in 0..255 (8-bit) or be uint16 (16-bit), got {array.dtype} "
            f"values in [{low}, {high}]; scale them or pass a float array"
        )
    return array.astype(np.uint8)


def _composite_array_on_white(array: np.ndarray) -> np.ndarray:
    """(H, W, 4) -> (H, W, 3) over white. uint8: PIL's exact blend; float: alpha in [0, 1] or 0..255."""
    if array.dtype == np.uint8:
        return _composite_on_white(PIL.Image.fromarray(np.ascontiguousarray(array), "RGBA"))
    white = np.float32(1.0 if array.max() <= 1.0 else 255.0)  # transformers composites [0, 1] floats onto 1
    alpha = array[..., 3:] / white
    return array[..., :3] * alpha + white * (1 - alpha)
