"""Evaluation: a model over a data set -> an EvaluationReport (top-1, top-5, loss, per-class accuracy, confusion
matrix) or pre-logits features, shared between torchrun processes. The trainer's own evaluation runs
`evaluate_dataset` too.
"""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from ..data import ImageSource, TransformedDataset, collate_skip_bad
from ..distributed import Context, all_gather, distributed, gather_rows
from ..files import open_regular, staged_outputs
from ..ownership import claim_files
from ..precision import precision_autocast
from ..processing import BitImageProcessor, ProcessorTransform
from ..report import EvaluationReport, progress_bar
from .predict import bad_image_policy, load_for_inference, maybe_optimized, processor_min_size
from .selection import DataSelection

logger = logging.getLogger("bigtransfer")

# ---------------------------------------------------------------------------------------------------------------
# Data sets -> evaluation reports and features.


def evaluate(
    model: str | os.PathLike, data: str | ImageSource | DataSelection, *, batch_size: int = 128,
    device: str | None = None, progress: bool = False, optimized: bool = False,
) -> EvaluationReport:
    """Top-1, top-5, loss, per-class accuracy and confusion matrix of a classifier on a data set.

    `model` is any source `from_pretrained` takes; images are preprocessed as its preprocessor_config.json says.
    `data` is a spec, a source or a `DataSelection` (default: the whole data set, the published test split of
    Fashion-MNIST and CIFAR). Under torchrun the images are shared between the processes. Data labels are matched
    to the model's labels by class name when every data class is one of them, else by index. The report's `data`
    says which images were used.

    Example: ``evaluate("runs/ft/model", DataSelection("fashion-mnist", classes=[5, 6, 7, 8, 9])).top1``.
    """
    selection = DataSelection.of(data)
    with distributed(device) as context:
        network, processor = load_for_inference(model, context.device)
        source = selection.open("test")
        classes_out = [network.config.id2label[index] for index in range(network.config.num_labels)]
        dataset = processed_dataset(source, processor, selection.on_bad_image, selection.reduced_decode)
        report = evaluate_dataset(maybe_optimized(network, optimized), dataset, batch_size, context,
                                  label_map=label_map(source.classes, classes_out), class_names=classes_out,
                                  progress=progress, workers=selection.workers)
        report.data = selection.described("test", len(source))
        return report


def extract_features(
    model: str | os.PathLike, data: str | ImageSource | DataSelection, *, batch_size: int = 128,
    device: str | None = None, progress: bool = False, optimized: bool = False, return_paths: bool = False,
) -> tuple[np.ndarray, np.ndarray] | tuple[np.ndarray, np.ndarray, list[str], list[str]]:
    """Pre-logits features (the pooled, normalised backbone output, (N, C) float32) and int labels (N,); with
    `return_paths`, also the image path of every row and the class name of every label.

    Unreadable images are dropped with `on_bad_image="skip"`, so N can be below the data set's size. By default
    the whole data set (the published train split of Fashion-MNIST and CIFAR); see `DataSelection`.
    """
    selection = DataSelection.of(data)
    with distributed(device) as context:
        network, processor = load_for_inference(model, context.device)
        backbone = maybe_optimized(network.bit, optimized)
        source = selection.open("train")
        dataset = processed_dataset(source, processor, selection.on_bad_image, selection.reduced_decode)
        features, labels, skipped = dataset_features(backbone, dataset, batch_size, context, progress, gather=False,
                                                     workers=selection.workers)
        if not return_paths:
            return gather_rows(context, features, labels)
        mine, unread = [source.path(i) for i in range(context.rank, len(source), context.world_size)], set(skipped)
        paths = np.array([path for path in mine if path not in unread], dtype=object)
        features, labels, paths = gather_rows(context, features, labels, paths)
        return features, labels, [str(path) for path in paths], [str(name) for name in source.classes]


def dataset_features(
    backbone: nn.Module, dataset: TransformedDataset, batch_size: int, context: Context, progress: bool = False,
    gather: bool = True, description: str = "features", workers: int = 0,
) -> tuple[np.ndarray, np.ndarray, list[str]]:
    """Pre-logits features (N, C) float32, labels (N,) and the skipped images' paths of a (preprocessed) data set,
    run through a `BitModel` in eval mode; with `gather`, every rank's rows back in the data set's order (what
    `extract_features`, the few-shot evaluator and the trainer's few-shot evaluation use)."""
    was_training = backbone.training
    backbone.eval()
    features, labels, skipped = [], [], []
    try:
        for images, batch_labels, bad in inference_batches(dataset, batch_size, context, progress, description,
                                                           workers):
            skipped.extend(sample.path for sample in bad)
            with torch.no_grad(), precision_autocast(context.device, "auto"):
                pooled = backbone(images.to(context.device)).pooler_output
            features.append(pooled.flatten(1).float().cpu().numpy())
            labels.append(batch_labels.numpy())
    finally:
        backbone.train(was_training)
    features_array = (np.concatenate(features) if features
                      else np.zeros((0, backbone.config.num_features), np.float32))
    labels_array = np.concatenate(labels) if labels else np.zeros(0, np.int64)
    if not gather:
        return features_array, labels_array, skipped
    features_array, labels_array = gather_rows(context, features_array, labels_array)
    if context.world_size > 1:
        skipped = [path for part in all_gather(context, skipped) for path in part]
    return features_array, labels_array, skipped


def processed_dataset(source: ImageSource, processor: BitImageProcessor, on_bad_image: str, reduced_decode: bool):
    """`source` preprocessed as `processor` says (JPEGs decoded at reduced size unless not `reduced_decode`)."""
    return TransformedDataset(source, ProcessorTransform(processor), on_bad_image=bad_image_policy(on_bad_image),
                              min_size=processor_min_size(processor) if reduced_decode else None)


def evaluate_dataset(
    model: nn.Module, dataset: TransformedDataset, batch_size: int, context: Context, *, precision: str = "auto",
    label_map: np.ndarray | None = None, class_names: Sequence[str] | None = None, progress: bool = False,
    workers: int = 0, on_logits: Callable[[torch.Tensor], None] | None = None,
) -> EvaluationReport:
    """The EvaluationReport of a classifier over a whole (preprocessed) data set, gathered from all ranks;
    `label_map` turns data labels into the model's; `on_logits` sees each batch's float32 logits (this rank's
    share, in order: distillation compares them with its teachers'). The trainer's evaluation and `evaluate` both
    run this."""
    was_training = model.training
    model.eval()
    topk, labels, losses, skipped = [], [], [], []
    num_labels = model.config.num_labels
    k = min(5, num_labels)
    autocast = precision_autocast(context.device, precision)
    with torch.no_grad():
        for images, batch_labels, bad in inference_batches(dataset, batch_size, context, progress, workers=workers):
            skipped.extend(sample.path for sample in bad)
            if len(batch_labels) == 0:
                continue
            if label_map is not None:
                batch_labels = torch.from_numpy(label_map[batch_labels.numpy()])
            if int(batch_labels.max()) >= num_labels:
                raise ValueError(f"the data has labels up to {int(batch_labels.max())} but the model has {num_labels} classes")
            with autocast:
                logits = model(images.to(context.device)).logits
            logits = logits.float()
            if on_logits is not None:
                on_logits(logits)
            topk.append(logits.topk(k, dim=-1).indices.cpu().numpy())
            losses.append(F.cross_entropy(logits, batch_labels.to(context.device), reduction="none").cpu().numpy())
            labels.append(batch_labels.numpy())
    model.train(was_training)
    topk_array = np.concatenate(topk) if topk else np.zeros((0, k), np.int64)
    labels_array = np.concatenate(labels) if labels else np.zeros(0, np.int64)
    losses_array = np.concatenate(losses) if losses else np.zeros(0, np.float32)
    if context.world_size > 1:
        gathered = all_gather(context, (topk_array, labels_array, losses_array, skipped))
        topk_array = np.concatenate([part[0] for part in gathered])
        labels_array = np.concatenate([part[1] for part in gathered])
        losses_array = np.concatenate([part[2] for part in gathered])
        skipped = [path for part in gathered for path in part[3]]
    names = list(class_names) if class_names is not None else list(dataset.classes)
    if len(labels_array) == 0:
        raise ValueError(f"nothing to evaluate: the evaluation data has no readable image ({len(skipped)} skipped, "
                         f"of {len(dataset)})")
    if not np.isfinite(losses_array).all():
        bad = int((~np.isfinite(losses_array)).sum())
        raise ValueError(f"the model's outputs are NaN or infinite on {bad} of {len(losses_array)} evaluation images "
                         "(non-finite weights or inputs?); no report was made")
    return EvaluationReport.from_predictions(topk_array, labels_array, losses_array, names, skipped)


def inference_batches(dataset: TransformedDataset, batch_size: int, context: Context, progress: bool,
                      description: str = "evaluate", workers: int = 0):
    """This rank's share (every world_size-th image) of a data set, in batches of (images, labels, skipped)."""
    positions = list(range(context.rank, len(dataset), context.world_size))
    batches = [positions[index : index + batch_size] for index in range(0, len(positions), batch_size)]
    loader_ = torch.utils.data.DataLoader(dataset, batch_sampler=batches, collate_fn=collate_skip_bad,
                                          num_workers=workers)
    bar = progress_bar(progress and context.is_main, len(positions), 0, description, unit="img", leave=False)
    for batch in loader_:
        yield batch
        if bar is not None:
            bar.update(len(batch[1]) + len(batch[2]))  # labels of the good images, and the skipped ones
    if bar is not None:
        bar.close()


def label_map(data_classes: Sequence[str], model_classes: Sequence[str]) -> np.ndarray | None:
    """Data label -> model label by class name when every data class is a model class; else None (by index)."""
    if list(data_classes) == list(model_classes):
        return None
    position = {name: index for index, name in enumerate(model_classes)}
    if all(name in position for name in data_classes):
        return np.array([position[name] for name in data_classes], dtype=np.int64)
    if len(data_classes) > len(model_classes):
        raise ValueError(f"the data has {len(data_classes)} classes but the model only {len(model_classes)}")
    if any(name != f"LABEL_{index}" for index, name in enumerate(model_classes)):
        unknown = [name for name in data_classes if name not in position]
        pairs = ", ".join(f"{data} -> {model}" for data, model in zip(data_classes[:5], model_classes[:5], strict=False))
        logger.warning(
            "data classes %s are not among the model's class names: matching classes by index (%s, ...)",
            unknown[:5], pairs,
        )
    return None


FEATURES_FORMAT = "bigtransfer-features-1"  # the first key of every index.json this package writes


def feature_paths(path: str | os.PathLike) -> list[Path]:
    """[features .npy, labels `<stem>.labels.npy`, index `<stem>.index.json`] for a features output `path`."""
    path = Path(path)
    if path.suffix != ".npy":
        path = path.with_name(path.name + ".npy")
    stem = path.name[: -len(".npy")]
    return [path, path.with_name(stem + ".labels.npy"), path.with_name(stem + ".index.json")]


def write_features(path: str | os.PathLike, features: np.ndarray, labels: np.ndarray,
                   paths: Sequence[str] | None = None, classes: Sequence[str] | None = None,
                   overwrite: bool = False) -> list[Path]:
    """Save features to `path` (.npy), labels beside it (`<stem>.labels.npy`) and `<stem>.index.json`
    ({"classes": [...], "paths": [...]}: row i is the image paths[i], label j the class classes[j]).

    The three files appear together or not at all (`files.staged_outputs`). Files of those names that an earlier
    `write_features` did not write are refused unless `overwrite`. Returns the three paths."""
    written = claim_features(path, overwrite)
    with staged_outputs(written[0]) as staging:
        for target, array in zip(written[:2], (features, labels), strict=False):
            with open(staging.path(target), "wb") as handle:
                np.save(handle, array, allow_pickle=False)
        index = {"format": FEATURES_FORMAT, "classes": list(classes or []), "paths": list(paths or [])}
        staging.path(written[2]).write_text(json.dumps(index) + "\n", encoding="utf-8")
    return written


def claim_features(path: str | os.PathLike, overwrite: bool = False) -> list[Path]:
    """The three paths of a features output (`feature_paths`), refused (OutputInUseError) when files of those names
    beside `path` were not written by `write_features`, unless `overwrite`."""
    written = feature_paths(path)
    return claim_files(written, lambda: _is_features_index(written[2]), overwrite)


def _is_features_index(path: Path) -> bool:
    """Whether `path` is an index.json `write_features` wrote (its first bytes say so; the rest is not read)."""
    try:
        with open_regular(path) as handle:
            return handle.read(64).startswith(b'{"format": "' + FEATURES_FORMAT.encode() + b'"')
    except OSError:
        return False
