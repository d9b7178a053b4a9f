"""Preprocessing: `ops` (the resize, crop and normalise kernels and the interpolation vocabulary every path
shares) and `processor` (`BitImageProcessor`, transformers' API on top of them)."""

from .processor import (
    BIT_MEAN,
    BIT_STD,
    IMAGE_PROCESSOR_CONFIG_NAME,
    OPENAI_CLIP_MEAN,
    OPENAI_CLIP_STD,
    PROCESSOR_CONFIG_NAME,
    BatchFeature,
    BitImageProcessor,
    ProcessorTransform,
    open_image,
    rgb_array,
)

__all__ = [
    "BIT_MEAN",
    "BIT_STD",
    "IMAGE_PROCESSOR_CONFIG_NAME",
    "OPENAI_CLIP_MEAN",
    "OPENAI_CLIP_STD",
    "PROCESSOR_CONFIG_NAME",
    "BatchFeature",
    "BitImageProcessor",
    "ProcessorTransform",
    "open_image",
    "rgb_array",
]
