"""Working with transformers' `Trainer` and PEFT: a callback that completes the checkpoints the Trainer saves, and
LoRA on weight-standardized convolutions.

The Trainer saves a model that is not one of transformers' own classes as its weights alone (model.safetensors),
and calls no method of the model to do it. Those files load here as they are (the architecture is read off the
tensors); `trainer_callback()` also writes config.json and the processor's config beside the weights of every
checkpoint, so each checkpoint loads in transformers too. After training, `model.save_pretrained(dir)` writes a
complete directory.

Example:
    >>> trainer = Trainer(model=model, args=args, train_dataset=data, callbacks=[trainer_callback(processor)])

LoRA and weight standardization: PEFT's LoRA adds `scaling * B @ A` to a layer. On a BiT convolution the update is
applied to the raw weight, inside the standardization: the layer computes `conv(x, WS(W + scaling * B @ A))`. So
every kernel the network runs stays standardized, as the pretrained GroupNorms expect; the adapter learns in the
space full fine-tuning updates (W); and PEFT's own merge (`W += scaling * B @ A`) is exact, so
`merge_and_unload()` gives a plain BiT that saves and loads here, in transformers and in timm. LoHa and LoKr, PEFT's
other additive adapters for convolutions, are applied the same way (their rank and module dropout are weight-level,
so they keep their meaning). The price: a LoRA update cannot be an extra branch on the input, so `lora_dropout` must
be 0, and DoRA, `lora_bias`, per-sample `adapter_names` and the non-additive adapter types are refused on these
layers (the classifier, an nn.Linear, takes all of them). `get_peft_model` needs nothing special: BiT's layers
switch PEFT's wrapper of a StdConv2d to this forward when PEFT installs it (`standardized_adapter`).
"""

from __future__ import annotations

import functools
from pathlib import Path
from typing import Any

import torch
from torch import nn

from .checkpoints.writers import save_config


def trainer_callback(processor: Any = None):
    """A `transformers.TrainerCallback` writing config.json (and `processor`'s preprocessor_config.json) into every
    checkpoint directory the Trainer saves, on the main process."""
    try:
        from transformers import TrainerCallback  # the optional dependency this integration is for
    except ImportError:
        raise ImportError("trainer_callback is for transformers' Trainer: pip install transformers accelerate") from None

    class SaveConfigCallback(TrainerCallback):
        def on_save(self, args, state, control, model=None, **kwargs):
            if state.is_world_process_zero and model is not None:
                directory = Path(args.output_dir) / f"checkpoint-{state.global_step}"
                if directory.is_symlink():  # writing would leave the output for wherever the link points
                    raise ValueError(f"{directory} is a symbolic link; config.json is written only inside "
                                     f"{args.output_dir}: remove the link")
                save_config(getattr(model, "module", model), directory)
                if processor is not None:
                    processor.save_pretrained(directory)
            return control

    return SaveConfigCallback()


def is_peft_layer(module: Any) -> bool:
    """Whether `module` is one of PEFT's adapter wrappers (checked by its module, so peft need not be imported)."""
    return type(module).__module__.startswith("peft.") and hasattr(module, "get_base_layer")


def standardized_adapter(wrapper: nn.Module) -> nn.Module:
    """PEFT's adapter wrapper of a StdConv2d (LoRA, LoHa or LoKr: the additive ones), switched to apply its update
    inside the standardization (see above).

    Raises ValueError, naming the setting, for adapters or settings that have no exact form there.
    """
    classes = _standardized_classes()
    standardized = classes.get(type(wrapper), type(wrapper))
    if standardized not in classes.values():
        raise ValueError(
            f"{type(wrapper).__module__}.{type(wrapper).__name__} on a weight-standardized convolution is not "
            "supported: only PEFT's additive adapters (LoRA, LoHa, LoKr) are applied inside the standardization, "
            "where merging is exact"
        )
    wrapper.__class__ = standardized  # the same object and state; only the forward differs
    _check_settings(wrapper)
    return wrapper


@functools.cache
def _standardized_classes() -> dict[type, type]:
    """PEFT's additive convolution adapters -> their forms applied inside the weight standardization."""
    from peft.tuners.loha.layer import Conv2d as LoHaConv2d  # the optional dependency this integration is for
    from peft.tuners.lokr.layer import Conv2d as LoKrConv2d
    from peft.tuners.lora.layer import Conv2d as LoraConv2d

    classes = {}
    for base, name in ((LoraConv2d, "StandardizedLoraConv2d"), (LoHaConv2d, "StandardizedLoHaConv2d"),
                       (LoKrConv2d, "StandardizedLoKrConv2d")):
        # Named as attributes of this module (see __getattr__), so pickling a model holding one finds the class.
        classes[base] = type(name, (base,), dict(forward=_standardized_forward, __module__=__name__, __qualname__=name,
                                                 __doc__=f"PEFT's {base.__module__}.Conv2d, its update applied "
                                                         "inside its base StdConv2d's weight standardization."))
    return classes


def __getattr__(name: str) -> Any:
    classes = {cls.__name__: cls for cls in _standardized_classes().values()} if name.startswith("Standardized") else {}
    if name in classes:  # built on first use: peft is an optional dependency
        return classes[name]
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def _standardized_forward(self, x, *args, **kwargs):
    """conv(x, WS(W + the active adapters' updates)) with the base StdConv2d's padding, stride and dilation."""
    if kwargs.get("adapter_names") is not None:
        raise ValueError("adapter_names (a different adapter per sample) is not supported on BiT's weight-standardized "
                         "convolutions")
    _check_settings(self)
    base = self.get_base_layer()
    if self.disable_adapters and self.merged:
        self.unmerge()
    if self.disable_adapters or self.merged:
        return base(x)
    weight = base.weight
    for name in self.active_adapters:
        if name in _adapter_names(self) and _kept(self, name):
            weight = weight + _delta(self, name).to(weight.dtype)
    return base(x) if weight is base.weight else base.forward_with_weight(x, weight)


def _adapter_names(layer: nn.Module):
    return layer.lora_A.keys() if hasattr(layer, "lora_A") else layer._available_adapters


def _kept(layer: nn.Module, name: str) -> bool:
    """LyCORIS' module dropout: in training an adapter is left out of a step with its probability, as PEFT does."""
    probability = getattr(layer, "module_dropout", {}).get(name, 0.0)
    return not (layer.training and probability and torch.rand(1) <= probability)


def _delta(layer: nn.Module, name: str):
    """The adapter's weight update, with LyCORIS' rank dropout in training (a weight-level dropout: exact here)."""
    if hasattr(layer, "rank_dropout"):
        return layer.get_delta_weight(name, apply_rank_dropout=layer.training and bool(layer.rank_dropout[name]))
    return layer.get_delta_weight(name)


def _check_settings(layer: nn.Module) -> None:
    """Refuse LoRA settings that have no form inside the standardization (LyCORIS' have)."""
    if not hasattr(layer, "lora_A"):
        return
    for name in layer.lora_A:
        if not isinstance(layer.lora_dropout[name], nn.Identity):
            raise ValueError(f"adapter {name!r}: lora_dropout must be 0 on BiT's weight-standardized convolutions (the "
                             "update is folded into the standardized kernel, not a branch on the input); exclude the "
                             "convolutions from target_modules to use dropout")
        if layer.use_dora.get(name) or layer.lora_bias.get(name):
            raise ValueError(f"adapter {name!r}: use_dora and lora_bias are not supported on BiT's weight-standardized "
                             "convolutions")
