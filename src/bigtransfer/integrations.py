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
`merge_and_unload()` gives a plain BiT that saves and loads here, in transformers and in timm. The price: the
update cannot be an extra branch on the input, so `lora_dropout` must be 0, and DoRA, `lora_bias` and per-sample
`adapter_names` are refused on these layers (the classifier, an nn.Linear, takes all of them).
`get_peft_model` needs nothing special: BiT's layers switch PEFT's LoRA wrapper of a StdConv2d to this forward
when PEFT installs it (`standardized_adapter`).
"""

from __future__ import annotations

import functools
from pathlib import Path
from typing import Any

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
                save_config(getattr(model, "module", model), directory)
                if processor is not None:
                    processor.save_pretrained(directory)
            return control

    return SaveConfigCallback()


def is_peft_layer(module: Any) -> bool:
    """Whether `module` is one of PEFT's adapter wrappers (checked by its module, so peft need not be imported)."""
    return type(module).__module__.startswith("peft.") and hasattr(module, "get_base_layer")


def standardized_adapter(wrapper: nn.Module) -> nn.Module:
    """PEFT's LoRA wrapper of a StdConv2d, switched to apply its update inside the standardization (see above).

    Raises ValueError, naming the setting, for PEFT adapters or settings that have no exact form there.
    """
    from peft.tuners.lora.layer import Conv2d as LoraConv2d  # the optional dependency this integration is for

    standardized = _standardized_lora_class()
    if type(wrapper) not in (LoraConv2d, standardized):
        raise ValueError(
            f"{type(wrapper).__module__}.{type(wrapper).__name__} on a weight-standardized convolution is not "
            "supported: only PEFT's LoRA (peft.LoraConfig) is applied inside the standardization, where merging is exact"
        )
    wrapper.__class__ = standardized  # the same object and state; only the forward differs
    wrapper.check_standardized_settings()
    return wrapper


@functools.cache
def _standardized_lora_class() -> type:
    from peft.tuners.lora.layer import Conv2d as LoraConv2d

    class StandardizedLoraConv2d(LoraConv2d):
        """PEFT's LoRA Conv2d whose update applies inside its base StdConv2d's weight standardization."""

        def check_standardized_settings(self) -> None:
            for name in self.lora_A:
                if not isinstance(self.lora_dropout[name], nn.Identity):
                    raise ValueError(f"adapter {name!r}: lora_dropout must be 0 on BiT's weight-standardized "
                                     "convolutions (the update is folded into the standardized kernel, not a branch on "
                                     "the input); exclude the convolutions from target_modules to use dropout")
                if self.use_dora.get(name) or self.lora_bias.get(name):
                    raise ValueError(f"adapter {name!r}: use_dora and lora_bias are not supported on BiT's "
                                     "weight-standardized convolutions")

        def forward(self, x, *args, **kwargs):
            self._check_forward_args(x, *args, **kwargs)
            if kwargs.get("adapter_names") is not None:
                raise ValueError("adapter_names (a different adapter per sample) is not supported on BiT's "
                                 "weight-standardized convolutions")
            base = self.get_base_layer()
            if self.disable_adapters and self.merged:
                self.unmerge()
            active = [] if self.disable_adapters or self.merged else [
                name for name in self.active_adapters if name in self.lora_A]
            if not active:
                return base(x)
            self.check_standardized_settings()
            weight = base.weight
            for name in active:
                weight = weight + self.get_delta_weight(name).to(weight.dtype)
            return base.forward_with_weight(x, weight)

    # Named as a module attribute (see __getattr__), so pickling a model that holds one (torch.save) finds it.
    StandardizedLoraConv2d.__module__, StandardizedLoraConv2d.__qualname__ = __name__, "StandardizedLoraConv2d"
    return StandardizedLoraConv2d


def __getattr__(name: str) -> Any:
    if name == "StandardizedLoraConv2d":  # built on first use: peft is an optional dependency
        return _standardized_lora_class()
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
