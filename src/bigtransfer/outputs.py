"""The models' outputs: named fields that read as transformers' ModelOutput does (by name, as a dict, by position)."""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from typing import Any

import torch
import torch.utils._pytree as pytree


class ModelOutput(dict):
    """Named fields (each output class is a dataclass) that also read as a dict of the fields that are not None
    (`out["logits"]`, `out.get("loss")`, `out.keys()`) and by position (`out[0]`, `out.to_tuple()`, None fields left
    out), as transformers' ModelOutput does.

    Built from keywords or, as transformers' is, from one mapping of field names (`type(out)({...})`: accelerate's
    mixed precision and the pipelines rebuild outputs that way). Every subclass is a pytree node, so torch.export,
    torch.onnx, `torch.jit.trace(strict=False)`, `torch.func.vmap` and DDP see its tensors as a plain container's.
    """

    def __post_init__(self) -> None:
        names = [field.name for field in dataclasses.fields(self)]
        first = getattr(self, names[0])
        if not isinstance(first, Mapping) or any(getattr(self, name) is not None for name in names[1:]):
            return
        unknown = sorted(set(first) - set(names))
        if unknown:
            raise TypeError(f"{type(self).__name__} has no fields {unknown} (its fields: {names})")
        for name in names:  # in field order, so positions match a keyword-built output
            setattr(self, name, first.get(name))

    def __init_subclass__(cls, **kwargs):
        super().__init_subclass__(**kwargs)
        pytree.register_pytree_node(
            cls, lambda output: (list(output.values()), list(output.keys())),
            lambda values, keys: cls(**dict(zip(keys, values, strict=True))),
            # The name exported programs (.pt2) record: kept from when these lived in bigtransfer.modeling.
            serialized_type_name=f"bigtransfer.modeling.{cls.__qualname__}",
        )

    def __setattr__(self, name: str, value: Any) -> None:
        if name in getattr(self, "__dataclass_fields__", {}):
            if value is None:
                dict.pop(self, name, None)
            else:
                dict.__setitem__(self, name, value)
        super().__setattr__(name, value)

    def __setitem__(self, key: str, value: Any) -> None:
        setattr(self, key, value)

    def __getitem__(self, item):
        if isinstance(item, str):
            return dict.__getitem__(self, item)
        return self.to_tuple()[item]

    def to_tuple(self) -> tuple:
        return tuple(self.values())


@dataclasses.dataclass
class BaseModelOutputWithPoolingAndNoAttention(ModelOutput):
    last_hidden_state: torch.Tensor | None = None
    pooler_output: torch.Tensor | None = None
    hidden_states: tuple[torch.Tensor, ...] | None = None


@dataclasses.dataclass
class ImageClassifierOutputWithNoAttention(ModelOutput):
    loss: torch.Tensor | None = None
    logits: torch.Tensor | None = None
    hidden_states: tuple[torch.Tensor, ...] | None = None


@dataclasses.dataclass
class BackboneOutput(ModelOutput):
    feature_maps: tuple[torch.Tensor, ...] | None = None
    hidden_states: tuple[torch.Tensor, ...] | None = None
    attentions: None = None
