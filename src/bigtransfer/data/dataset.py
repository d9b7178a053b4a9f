"""``TransformedDataset``: a source + a transform as a ``torch.utils.data.Dataset``, reproducible per sample.

Each sample's random augmentation comes from its own generator seeded by ``(seed, epoch, position)``, so
the images a training step sees depend only on those numbers: not on the number of DataLoader workers, the
number of DDP ranks, or where a resumed run restarted.

Bad images either raise :class:`~bigtransfer.data.sources.BadImageError` (default) or, with
``on_bad_image="skip"``, come back as a :class:`SkippedSample` that :func:`collate_skip_bad` drops from the
batch while reporting its path. Damage found when a source was opened (a truncated shard) is refused in the same
way, or with "skip" listed in a warning.

A DataLoader asks for a whole batch at once (``__getitems__``), so sources in object storage fetch its images in
one round of requests.
"""

from __future__ import annotations

import warnings
from collections.abc import Sequence
from typing import Literal, NamedTuple

import numpy as np
import torch
from torch.utils.data import Dataset

from .sources import BadImageError, ImageSource


def sample_seed(seed: int, epoch: int, index: int) -> int:
    """A 63-bit seed mixed from ``(seed, epoch, index)`` (numpy SeedSequence: well spread, platform-stable)."""
    state = np.random.SeedSequence([seed, epoch, index]).generate_state(2, dtype=np.uint32)
    return (int(state[0]) << 31) ^ int(state[1])


class SkippedSample(NamedTuple):
    """Stands in for an unreadable image when ``on_bad_image="skip"``."""

    path: str
    reason: str


class Batch(NamedTuple):
    """A collated batch: ``images`` (B, 3, H, W) float, ``labels`` (B,) int64, ``skipped`` bad samples.

    When every sample was bad, ``images`` and ``labels`` are empty (first dimension 0).
    """

    images: torch.Tensor
    labels: torch.Tensor
    skipped: tuple[SkippedSample, ...]


class TransformedDataset(Dataset):
    """``source[indices[i]]`` passed through ``transform`` with a generator seeded by ``(seed, epoch, i)``.

    Args:
        source: an image source (labels known without decoding).
        transform: ``transform(image, generator) -> tensor`` (:class:`TrainTransform`, :class:`EvalTransform`).
        indices: the source indices to use (a split or few-shot subset); all of them by default.
        seed: the run's data seed.
        on_bad_image: "raise" raises ``BadImageError`` naming the file; "skip" returns a ``SkippedSample``
            (use :func:`collate_skip_bad` as the DataLoader's ``collate_fn``).
        min_size: the least decoded size the transform needs (``ImageSource.load``): JPEG files are decoded at
            1/2, 1/4 or 1/8 scale when that is still at least this large (None: full decodes).

    Items are ``(tensor, int label)``. Call :meth:`set_epoch` before iterating each epoch (before
    ``iter(loader)``; with ``persistent_workers=True`` workers keep the epoch they started with, so there
    index with ``(epoch, i)`` tuples instead, e.g. from :class:`EpochSampler`).

    Example::

        data = TransformedDataset(source, TrainTransform(160, 128), seed=0, on_bad_image="skip")
        loader = DataLoader(data, batch_size=64, sampler=..., collate_fn=collate_skip_bad, num_workers=2)
        for epoch in range(start_epoch, epochs):
            data.set_epoch(epoch)
            for images, labels, skipped in loader:
                ...
    """

    def __init__(
        self,
        source: ImageSource,
        transform,
        indices: Sequence[int] | np.ndarray | None = None,
        *,
        seed: int = 0,
        on_bad_image: Literal["raise", "skip"] = "raise",
        min_size: int | tuple[int, int] | None = None,
    ):
        if on_bad_image not in ("raise", "skip"):
            raise ValueError(f"on_bad_image must be 'raise' or 'skip', got {on_bad_image!r}")
        self.source = source
        self.transform = transform
        self.indices = np.arange(len(source)) if indices is None else np.asarray(indices, dtype=np.int64)
        if len(self.indices) and (self.indices.min() < 0 or self.indices.max() >= len(source)):
            raise ValueError(f"indices must lie in [0, {len(source)})")
        self.seed = int(seed)
        self.on_bad_image = on_bad_image
        self.min_size = min_size
        self.epoch = 0
        self.damage = source.damage()
        if self.damage and on_bad_image == "raise":
            raise BadImageError(*self.damage[0])
        for path, reason in self.damage:
            warnings.warn(f"skipped (on_bad_image='skip'): {path}: {reason}", stacklevel=2)

    def set_epoch(self, epoch: int) -> None:
        """Select the epoch whose augmentations ``dataset[i]`` returns."""
        self.epoch = int(epoch)

    def __len__(self) -> int:
        return len(self.indices)

    @property
    def labels(self) -> np.ndarray:
        """Labels of the items, without decoding images."""
        return self.source.labels[self.indices]

    @property
    def classes(self) -> list[str]:
        return self.source.classes

    def __getitem__(self, key: int | tuple[int, int]) -> tuple[torch.Tensor, int] | SkippedSample:
        return self.__getitems__([key])[0]

    def __getitems__(self, keys: Sequence[int | tuple[int, int]]) -> list[tuple[torch.Tensor, int] | SkippedSample]:
        """The items of several keys, their images loaded together (the DataLoader's batched fetch)."""
        places = [self._place(key) for key in keys]
        loaded = self.source.load_many([int(self.indices[position]) for _, position in places], self.min_size)
        items: list[tuple[torch.Tensor, int] | SkippedSample] = []
        for (epoch, position), item in zip(places, loaded, strict=True):
            if isinstance(item, BadImageError):
                if self.on_bad_image == "raise":
                    raise item
                items.append(SkippedSample(item.path, item.reason))
                continue
            generator = torch.Generator().manual_seed(sample_seed(self.seed, epoch, position))
            items.append((self.transform(item[0], generator), int(item[1])))
        return items

    def _place(self, key: int | tuple[int, int]) -> tuple[int, int]:
        epoch, position = key if isinstance(key, tuple) else (self.epoch, key)
        position = int(position)
        return int(epoch), position + len(self.indices) if position < 0 else position


class EpochSampler(torch.utils.data.Sampler):
    """Wraps a sampler of positions so it yields ``(epoch, position)`` keys for :class:`TransformedDataset`.

    Use with ``persistent_workers=True``, where ``set_epoch`` on the dataset does not reach the workers.
    """

    def __init__(self, sampler):
        self.sampler = sampler
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = int(epoch)
        if hasattr(self.sampler, "set_epoch"):  # e.g. DistributedSampler's shuffling
            self.sampler.set_epoch(epoch)

    def __iter__(self):
        epoch = self.epoch
        for position in self.sampler:
            yield (epoch, int(position))

    def __len__(self) -> int:
        return len(self.sampler)


def collate_skip_bad(samples: Sequence[tuple[torch.Tensor, int] | SkippedSample]) -> Batch:
    """DataLoader ``collate_fn``: stack the good samples, drop and report the :class:`SkippedSample` ones."""
    skipped = tuple(s for s in samples if isinstance(s, SkippedSample))
    good = [s for s in samples if not isinstance(s, SkippedSample)]
    if not good:
        return Batch(torch.empty(0, dtype=torch.float32), torch.empty(0, dtype=torch.int64), skipped)
    images = torch.stack([image for image, _ in good])
    labels = torch.tensor([label for _, label in good], dtype=torch.int64)
    return Batch(images, labels, skipped)
