"""Data: image sources, seeded splits and few-shot subsets, BiT transforms, a reproducible Dataset."""

from ..images import load_image
from .dataset import Batch, EpochSampler, SkippedSample, TransformedDataset, collate_skip_bad, sample_seed
from .readers import (
    FASHION_MNIST_CLASSES,
    FASHION_MNIST_DIR,
    load_cifar,
    load_digits,
    load_fashion_mnist,
    read_idx,
)
from .safe_pickle import safe_load
from .sampling import check_shots, few_shot_indices, shot_order, stratified_split
from .selection import ClassSubset, Selection, select_classes
from .sources import (
    IMAGE_EXTENSIONS,
    ArraySource,
    BadImageError,
    CsvSource,
    FileSource,
    ImageFolderSource,
    ImageSource,
    image_files,
)
from .spec import (
    ACCEPTED_SPECS,
    describe_split,
    has_own_splits,
    open_source,
    open_train_eval,
    spec_paths,
    whole_split,
)
from .transforms import BIT_MEAN, BIT_STD, EvalTransform, TrainTransform, to_normalized_tensor

__all__ = [
    "ACCEPTED_SPECS",
    "BIT_MEAN",
    "BIT_STD",
    "FASHION_MNIST_CLASSES",
    "FASHION_MNIST_DIR",
    "IMAGE_EXTENSIONS",
    "image_files",
    "ArraySource",
    "BadImageError",
    "Batch",
    "ClassSubset",
    "CsvSource",
    "EpochSampler",
    "EvalTransform",
    "FileSource",
    "ImageFolderSource",
    "ImageSource",
    "Selection",
    "SkippedSample",
    "TrainTransform",
    "TransformedDataset",
    "check_shots",
    "collate_skip_bad",
    "describe_split",
    "few_shot_indices",
    "has_own_splits",
    "load_cifar",
    "load_digits",
    "load_fashion_mnist",
    "load_image",
    "open_source",
    "open_train_eval",
    "read_idx",
    "safe_load",
    "sample_seed",
    "shot_order",
    "select_classes",
    "spec_paths",
    "stratified_split",
    "to_normalized_tensor",
    "whole_split",
]
