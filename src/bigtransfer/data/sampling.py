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


def few_shot_indices(
    labels: np.ndarray, shots: int, seed: int, classes: Sequence[str] | None = None
) -> np.ndarray:
    """Indices of ``shots`` examples of every class, chosen with ``seed``; sorted int64.

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
    if shots < 1:
        raise ValueError(f"shots must be >= 1, got {shots}")
    labels = np.asarray(labels)
    wanted = np.arange(len(classes)) if classes is not None else np.unique(labels)
    counts = np.bincount(labels, minlength=int(wanted.max()) + 1 if len(wanted) else 0)
    for label in wanted:
        if counts[label] < shots:
            name = f"{label} ({classes[label]!r})" if classes is not None else f"{label}"
            raise ValueError(
                f"{shots}-shot sampling needs {shots} examples per class, but class {name} has {counts[label]}"
            )
    if len(wanted) == 0:
        raise ValueError("few-shot sampling needs at least one labelled example")
    rng = np.random.default_rng(seed)
    chosen = [rng.choice(np.flatnonzero(labels == label), size=shots, replace=False) for label in wanted]
    return np.sort(np.concatenate(chosen)).astype(np.int64)
