"""Which images a command runs a model over, and how they are read: one frozen `DataSelection` that `evaluate`,
`extract_features` and `fewshot` take (and the commands build from its fields' flags)."""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from typing import Literal

from ..data import ImageSource, describe_split, open_source, whole_split
from ..fields import BAD_IMAGE_HELP, DATA_HELP, fraction, non_negative_int, option, parse_classes


@dataclasses.dataclass(frozen=True)
class DataSelection:
    """A data spec and the part of it to use.

    `split` None is the whole data set: every image of a folder or CSV file (or digits), the published split of
    Fashion-MNIST and CIFAR that the command names. "test" / "train" on a folder or CSV file take the held-out
    `val_fraction` of each class (split seed 0, as `finetune` holds it out without `eval_data`) or the rest.
    `classes` keeps only those classes; `workers` decode in that many processes; `reduced_decode` decodes JPEGs at
    the 1/2, 1/4 or 1/8 scale the model's resize allows.

    Example: ``DataSelection("photos/", split="test", classes=("cat", "dog"))``.
    """

    data: str | ImageSource = option("", DATA_HELP, metavar="SPEC", required=True)
    split: Literal["train", "test", "all"] | None = option(
        None, "default: the whole data set (every image of a folder or CSV file; the published split of "
        "Fashion-MNIST and CIFAR); test: the --val-fraction of each class that finetune holds out when given no "
        "--eval-data; train: the rest", choices=("train", "test", "all"))
    val_fraction: float = option(0.2, "the held-out share of each class for --split test / train (default "
                                 "%(default)s)", parse=fraction, metavar="F")
    classes: Sequence[int | str] | None = option(None, "keep only these classes, e.g. 5-9 or Sandal,Shirt",
                                                 parse=parse_classes, metavar="LIST")
    workers: int = option(0, "decoding processes (default %(default)s: decode in the main process)",
                          parse=non_negative_int)
    on_bad_image: Literal["fail", "skip"] = option("fail", BAD_IMAGE_HELP, choices=("fail", "skip"))
    reduced_decode: bool = option(True, "decode JPEGs in full (default: at the 1/2, 1/4 or 1/8 scale the model's "
                                  "resize allows)", flag="--full-decode")

    @classmethod
    def of(cls, data: str | ImageSource | DataSelection) -> DataSelection:
        """`data` as a selection: a spec or source means all of it, with the defaults."""
        return data if isinstance(data, DataSelection) else cls(data)

    def split_for(self, published: str) -> str:
        """The split to open: the asked one, else the whole data set (`published` for Fashion-MNIST and CIFAR)."""
        return self.split or whole_split(self.data, published)

    def open(self, published: str) -> ImageSource:
        return open_source(self.data, self.split_for(published), val_fraction=self.val_fraction,
                           classes=self.classes)

    def described(self, published: str, images: int) -> dict:
        """What a report says of the images it used."""
        return dict(data=str(self.data), split=describe_split(self.data, self.split_for(published),
                                                              self.val_fraction), images=images)
