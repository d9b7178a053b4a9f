"""Chosen parts of a source: some of its classes (relabelled 0..k-1) or some of its examples, from one or more
sources with the same classes."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
from PIL import Image

from .sources import BadImageError, ImageSource


class ClassSubset(ImageSource):
    """The images of some classes of a source, relabelled 0..k-1 in the order the classes are given."""

    def __init__(self, source: ImageSource, classes: Sequence[int | str]):
        if not classes:
            raise ValueError("select at least one class")
        original = [_class_index(source, c) for c in classes]
        if len(set(original)) != len(original):
            raise ValueError(f"classes selected more than once: {list(classes)}")
        relabel = np.full(source.num_classes, -1, dtype=np.int64)
        relabel[original] = np.arange(len(original))
        self.source = source
        self.original_classes = original
        self.indices = np.flatnonzero(relabel[source.labels] >= 0)
        self.labels = relabel[source.labels[self.indices]]
        self.classes = [source.classes[c] for c in original]
        self._relabel = relabel

    def __getitem__(self, index: int) -> tuple[Image.Image, int]:
        return self.load(index)

    def load(self, index: int, min_size: int | tuple[int, int] | None = None) -> tuple[Image.Image, int]:
        image, label = self.source.load(int(self.indices[index]), min_size)
        return image, int(self._relabel[label])

    def load_many(self, indices, min_size=None):
        loaded = self.source.load_many([int(self.indices[index]) for index in indices], min_size)
        return [item if isinstance(item, BadImageError) else (item[0], int(self._relabel[item[1]])) for item in loaded]

    def damage(self) -> list[tuple[str, str]]:
        return self.source.damage()

    def path(self, index: int) -> str:
        return self.source.path(int(self.indices[index]))

    def _identity(self):
        yield self.source.fingerprint().encode()
        yield self.indices.astype(np.int64).tobytes()

    def image_size(self) -> tuple[int, int]:
        return self.source.image_size()


class Selection(ImageSource):
    """Chosen examples of one or more sources with the same classes, in the given order: ``parts`` is a list of
    (source, indices). A VTAB-1k train800 is one part; train800 + val200 from two sources is two."""

    def __init__(self, parts: Sequence[tuple[ImageSource, Sequence[int]]], name: str):
        if not parts:
            raise ValueError(f"{name}: nothing selected")
        classes = list(parts[0][0].classes)
        for source, _ in parts[1:]:
            if list(source.classes) != classes:
                raise ValueError(f"{name}: parts have different classes: {classes} vs {list(source.classes)}")
        self.parts = [(source, np.asarray(indices, dtype=np.int64)) for source, indices in parts]
        for source, indices in self.parts:
            if len(indices) and (indices.min() < 0 or indices.max() >= len(source)):
                raise ValueError(f"{name}: indices outside [0, {len(source)}) of {source!r}")
        self._where = [(part, int(index)) for part, (_, indices) in enumerate(self.parts) for index in indices]
        self.labels = np.concatenate([source.labels[indices] for source, indices in self.parts])
        self.classes = classes
        self.name = name

    def __getitem__(self, index: int) -> tuple[Image.Image, int]:
        return self.load(index)

    def load(self, index: int, min_size: int | tuple[int, int] | None = None) -> tuple[Image.Image, int]:
        part, inner = self._where[index]
        return self.parts[part][0].load(inner, min_size)

    def load_many(self, indices, min_size=None):
        loaded: list = [None] * len(indices)
        for number, (source, _) in enumerate(self.parts):
            mine = [(position, self._where[index][1]) for position, index in enumerate(indices)
                    if self._where[index][0] == number]
            if mine:
                for (position, _), item in zip(mine, source.load_many([inner for _, inner in mine], min_size),
                                               strict=True):
                    loaded[position] = item
        return loaded

    def damage(self) -> list[tuple[str, str]]:
        return [problem for source, _ in self.parts for problem in source.damage()]

    def path(self, index: int) -> str:
        part, inner = self._where[index]
        return self.parts[part][0].path(inner)

    def _identity(self):
        for source, indices in self.parts:
            yield source.fingerprint().encode()
            yield indices.tobytes()

    def image_size(self) -> tuple[int, int]:
        return self.parts[0][0].image_size()

    def __repr__(self) -> str:
        return f"Selection({self.name!r}, {len(self)} images, {self.num_classes} classes)"


def _class_index(source: ImageSource, wanted: int | str) -> int:
    if isinstance(wanted, str):
        if wanted in source.classes:
            return source.classes.index(wanted)
        raise ValueError(f"unknown class {wanted!r}; classes are {source.classes}")
    index = int(wanted)
    if not 0 <= index < source.num_classes:
        raise ValueError(f"class index {index} out of range [0, {source.num_classes})")
    return index


def select_classes(source: ImageSource, classes: Sequence[int | str]) -> ClassSubset:
    """Keep only ``classes`` (indices or names) of ``source`` and relabel them 0..k-1 in that order.

    Example: ``select_classes(load_fashion_mnist(), range(5, 10))`` keeps Sandal..Ankle boot as labels 0..4.
    """
    return ClassSubset(source, list(classes))
