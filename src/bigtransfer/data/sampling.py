"""Seeded, label-only sampling: stratified held-out splits and few-shot subsets."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np


def stratified_split(labels: np.ndarray, test_fraction: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Split indices into ``(train, test)`` holding out ``test_fraction`` of every class, both sorted.

    Each class with at least two examples keeps at least one on each side; a class with a single example
    stays in train. The same ``(labels, test_fraction, seed)`` always gives the same split.
    """
    if not 0 <= test_fraction < 1:
        raise ValueError(f"test_fraction must lie in [0, 1), got {test_fraction}")
    labels = np.asarray(labels)
    rng = np.random.default_rng(seed)
    train, test = [], []
    for label in np.unique(labels):
        members = rng.permutation(np.flatnonzero(labels == label))
        count = len(members)
        held_out = int(round(count * test_fraction))
        if test_fraction > 0 and count >= 2:
            held_out = min(max(held_out, 1), count - 1)
        elif count < 2:
            held_out = 0
        test.append(members[:held_out])
        train.append(members[held_out:])
    empty = np.zeros(0, dtype=np.int64)
    return (
        np.sort(np.concatenate(train or [empty])).astype(np.int64),
        np.sort(np.concatenate(test or [empty])).astype(np.int64),
    )


def shot_order(labels: np.ndarray, seed: int, num_classes: int | None = None) -> list[np.ndarray]:
    """For every class 0..num_classes-1, its indices in a seeded random order; the first k of each are the
    k-shot set, so for one seed the 1-, 5- and 10-shot sets are nested.

    One generator, ``np.random.default_rng(seed)``, permutes the classes in turn, as big_vision's few-shot
    evaluator (evaluators/fewshot_lsr.py) does: the same labels and seed pick the same examples there.
    """
    labels = np.asarray(labels)
    count = int(labels.max()) + 1 if num_classes is None and len(labels) else num_classes or 0
    rng = np.random.default_rng(seed)
    return [rng.permutation(np.flatnonzero(labels == label)) for label in range(count)]


def check_shots(labels: np.ndarray, shots: int, classes: Sequence[str] | None = None, what: str = "") -> None:
    """ValueError naming the first class with fewer than ``shots`` examples (`what` says which data)."""
    if shots < 1:
        raise ValueError(f"shots must be >= 1, got {shots}")
    labels = np.asarray(labels)
    wanted = np.arange(len(classes)) if classes is not None else np.unique(labels)  # unnamed: the labels present
    if len(wanted) == 0:
        raise ValueError("few-shot sampling needs at least one labelled example")
    counts = np.bincount(labels, minlength=int(wanted.max()) + 1)
    for label in wanted:
        if counts[label] < shots:
            name = f"{label} ({classes[label]!r})" if classes is not None else f"{label}"
            raise ValueError(f"{shots}-shot sampling needs {shots} examples per class, but class {name}"
                             f"{' of ' + what if what else ''} has {counts[label]}")


def few_shot_indices(
    labels: np.ndarray, shots: int, seed: int, classes: Sequence[str] | None = None
) -> np.ndarray:
    """Indices of ``shots`` examples of every class, chosen with ``seed``; sorted int64. They are the first
    ``shots`` of `shot_order`, so fewer shots with the same seed give a subset.

    Args:
        labels: int labels of the whole set (``source.labels``).
        shots: examples per class.
        seed: the same seed gives the same subset; different seeds give different subsets.
        classes: optional class names; when given, every class ``0..len(classes)-1`` must have ``shots``
            examples (an absent class is an error too) and errors name the class.

    Raises:
        ValueError: when a class has fewer than ``shots`` examples (naming the class and its count).

    Example: ``few_shot_indices(source.labels, shots=10, seed=0)``.
    """
    check_shots(labels, shots, classes)
    order = shot_order(labels, seed, len(classes) if classes is not None else None)
    present = [indices for indices in order if len(indices)]  # without names, classes absent from labels are not asked for
    return np.sort(np.concatenate([indices[:shots] for indices in present])).astype(np.int64)
