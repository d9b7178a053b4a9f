"""Class names for heads: the ImageNet-1k and ImageNet-21k names that ship with the package, and labels files."""

from __future__ import annotations

import gzip
import os
from importlib import resources

from ..config import LIMITS
from ..files import read_bytes

MAX_LABELS_BYTES = 256 << 20  # a million class names of 256 bytes


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


def known_labels(num_labels: int) -> list[str] | None:
    """The class names a head of this size has by convention (ImageNet-1k, ImageNet-21k), else None."""
    if num_labels == 1000:
        return imagenet_labels()
    if num_labels == 21843:
        return imagenet21k_labels()
    return None


def read_labels(path: str | os.PathLike) -> list[str]:
    """Class names from a text file, one per line (surrounding whitespace and trailing blank lines ignored)."""
    try:
        text = read_bytes(path, MAX_LABELS_BYTES, "labels file").decode("utf-8-sig")
    except UnicodeDecodeError as error:
        raise ValueError(f"{path} is not UTF-8 text (byte {error.start}: {error.reason}); save it as UTF-8") from None
    lines = [line.strip() for line in text.splitlines()]
    while lines and not lines[-1]:
        lines.pop()
    blank = [number for number, line in enumerate(lines, start=1) if not line]
    if blank:
        raise ValueError(f"{path}: line {blank[0]} is empty; the labels file needs one class name per line")
    if not lines:
        raise ValueError(f"{path} holds no class names")
    if len(lines) > LIMITS["num_labels"]:
        raise ValueError(f"{path} holds {len(lines):,} class names, more than {LIMITS['num_labels']:,}")
    return lines
