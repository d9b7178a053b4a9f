"""``open_source``: one string names a data set (what the CLI's ``--data`` takes)."""

from __future__ import annotations

import os
import re
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from .arrow import ArrowSource, ParquetSource, has_hf_splits, hf_cache, is_saved_dataset, parse_hf_spec
from .readers import FASHION_MNIST_DIR, load_cifar, load_digits, load_fashion_mnist
from .selection import Selection, select_classes
from .shards import TarShardSource, expand_pattern
from .sources import (
    SPLITS,
    CsvSource,
    ImageFolderSource,
    ImageSource,
    split_indices,
)
from .storage import is_remote

ACCEPTED_SPECS = (
    "a folder with one sub-folder of images per class",
    "a .csv file of path,label rows",
    "'digits' (scikit-learn 8x8 digits)",
    f"'fashion-mnist' (idx files in {FASHION_MNIST_DIR})",
    "'fashion-mnist:DIR'",
    "'cifar10:DIR'",
    "'cifar100:DIR'",
    "'wds:PATTERN' (WebDataset tar shards, local or s3:// gs:// az:// https://, e.g. "
    "wds:/data/shard-{000000..000099}.tar)",
    "'hf:PATH' (a datasets.save_to_disk folder, or Parquet files, local or in object storage)",
)

_NAMED = re.compile(
    r"^(?P<name>fashion-mnist|fashion_mnist|cifar10|cifar-10|cifar100|cifar-100)(?::(?P<dir>.+))?$"
)


def open_source(
    spec: str | os.PathLike | ImageSource,
    split: str = "train",
    *,
    val_fraction: float = 0.2,
    seed: int = 0,
    val_path: str | os.PathLike | None = None,
    classes: Sequence[int | str] | None = None,
) -> ImageSource:
    """Open the data set named by ``spec`` for ``split`` ("train" or "test"; "val" means "test"; "all" is a whole
    folder, CSV file or digits, unsplit).

    ``spec`` is one of: a folder with one sub-folder per class; a ``.csv`` file of ``path,label`` rows;
    ``digits``; ``fashion-mnist`` or ``fashion-mnist:DIR``; ``cifar10:DIR``; ``cifar100:DIR``. An
    ``ImageSource`` is taken as the split the caller wants (only ``classes`` applies).

    Args:
        val_fraction: for folders, CSV files and digits without a separate test set, the fraction of each
            class held out as "test" by a split seeded with ``seed``.
        val_path: a separate folder / CSV file for the "test" split of a folder / CSV ``spec``.
        classes: keep only these classes (indices or names), relabelled 0..k-1 in the given order.

    Raises:
        ValueError: for a spec of none of these forms (the message lists them).

    Example: ``open_source("fashion-mnist", "train", classes=range(5))``.
    """
    if split not in SPLITS:
        raise ValueError(f"split must be one of {', '.join(SPLITS)}, got {split!r}")
    source = spec if isinstance(spec, ImageSource) else _open(str(spec), split, val_fraction, seed, val_path)
    return select_classes(source, list(classes)) if classes is not None else source


def has_own_splits(spec: str | os.PathLike | ImageSource) -> bool:
    """Whether `spec` names a data set published with its own train and test files (Fashion-MNIST, CIFAR, a saved
    DatasetDict), which are used as they are; folders, CSV files, shards and digits are split here when a split is
    asked for."""
    if isinstance(spec, ImageSource):
        return False
    text = str(spec).strip()
    return bool(_NAMED.match(text)) or (text.startswith("hf:") and has_hf_splits(text[3:]))


def whole_split(spec: str | os.PathLike | ImageSource, published: str) -> str:
    """The split that means "this whole data set" for `spec`: all of a folder, CSV file or digits, and the
    `published` split ("train" or "test") of Fashion-MNIST or CIFAR."""
    return published if has_own_splits(spec) else "all"


def describe_split(spec: str | os.PathLike | ImageSource, split: str, val_fraction: float, seed: int = 0) -> str:
    """Which images of `spec` a split holds, in words for a report."""
    if isinstance(spec, ImageSource):
        return "as given"
    if split == "all":
        return "all of it"
    if has_own_splits(spec):
        return f"its published {'test' if split == 'val' else split} split"
    part = f"{val_fraction:.0%} of each class" if split in ("test", "val") else f"the other {1 - val_fraction:.0%}"
    return f"{'held out' if split in ('test', 'val') else 'training part'}: {part} (stratified, split seed {seed})"


def open_train_eval(
    data: str | os.PathLike | ImageSource, eval_data: str | os.PathLike | ImageSource | None = None, *,
    val_fraction: float = 0.2, classes: Sequence[int | str] | None = None,
) -> tuple[ImageSource, ImageSource, dict[str, dict[str, Any]]]:
    """(training source, evaluation source, which images each holds: {"train": {data, split, images}, "test": ...}).

    Separate `eval_data` is used whole and so is `data` then; without it, `val_fraction` of each class of `data`
    is held out (split seed 0), except for data sets published with a test split (Fashion-MNIST, CIFAR), whose
    train and test files are used. Fine-tuning, pre-training and the few-shot evaluator all choose this way.

    Raises:
        ValueError: when the two sources have different classes (both lists are shown).
    """
    if eval_data is not None:
        eval_spec = eval_data
        train_split, eval_split = whole_split(data, "train"), whole_split(eval_spec, "test")
    else:
        train_split, eval_spec, eval_split = "train", data, "test"
    source = open_source(data, train_split, val_fraction=val_fraction, classes=classes)
    eval_source = open_source(eval_spec, eval_split, val_fraction=val_fraction, classes=classes)
    if list(source.classes) != list(eval_source.classes):
        raise ValueError(
            f"training and evaluation data have different classes: {source.classes} vs {eval_source.classes}"
        )
    described = {
        "train": dict(data=str(data), split=describe_split(data, train_split, val_fraction), images=len(source)),
        "test": dict(data=str(eval_spec), split=describe_split(eval_spec, eval_split, val_fraction),
                     images=len(eval_source)),
    }
    return source, eval_source, described


def spec_paths(spec: str | os.PathLike | ImageSource | None) -> list[str]:
    """The local files or folders a data spec reads (none for built-in data sets and ImageSource objects)."""
    if spec is None or isinstance(spec, ImageSource):
        return []
    text = str(spec).strip()
    named = _NAMED.match(text)
    if named:
        return [named["dir"] or FASHION_MNIST_DIR] if named["dir"] or named["name"].startswith("fashion") else []
    if text.startswith("wds:"):
        return [] if is_remote(text[4:]) else expand_pattern(text[4:])
    if text.startswith("hf:"):
        return [] if is_remote(text[3:]) else [parse_hf_spec(text[3:])[0]]
    return [] if text.lower() == "digits" else [text]


def _open(spec: str, split: str, val_fraction: float, seed: int, val_path) -> ImageSource:
    array_split = "test" if split == "val" else split
    named = _NAMED.match(spec.strip())
    if spec.strip().lower() == "digits":
        return load_digits(array_split, test_fraction=val_fraction, seed=seed)
    if named:
        name, directory = named["name"].replace("_", "-"), named["dir"]
        if name == "fashion-mnist":
            return load_fashion_mnist(directory or FASHION_MNIST_DIR, array_split)
        if directory is None:
            raise ValueError(f"{spec!r}: give the folder of the python pickles, e.g. '{name}:/data/cifar'")
        return load_cifar(directory, array_split, num_classes=100 if name.endswith("100") else 10)
    if spec.startswith(("wds:", "hf:")):
        return _open_sharded(spec, split, val_fraction, seed)
    path = Path(spec)
    if path.is_dir():
        return ImageFolderSource(path, split, val_root=val_path, val_fraction=val_fraction, seed=seed)
    if path.suffix.lower() == ".csv" and path.is_file():
        return CsvSource(path, split, val_path=val_path, val_fraction=val_fraction, seed=seed)
    problem = "does not exist" if not path.exists() else "is not a folder or a .csv file"
    raise ValueError(f"data spec {spec!r} {problem}; accepted: " + "; ".join(ACCEPTED_SPECS))


def _open_sharded(spec: str, split: str, val_fraction: float, seed: int) -> ImageSource:
    """wds: and hf: sources; a split of one that has none of its own is taken by index (stratified, seeded)."""
    if spec.startswith("wds:"):
        source: ImageSource = TarShardSource(spec[4:])
    elif has_hf_splits(spec[3:]):
        return ArrowSource(spec[3:], "test" if split in ("test", "val") else "train")
    elif is_saved_dataset(spec[3:]) or hf_cache(spec[3:]):
        source = ArrowSource(spec[3:])
    else:
        source = ParquetSource(spec[3:])
    if split == "all":
        return source
    return Selection([(source, split_indices(source.labels, split, val_fraction, seed, spec))], f"{spec} [{split}]")
