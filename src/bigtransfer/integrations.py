"""Working with transformers' `Trainer`: a callback that completes the checkpoints it saves.

The Trainer saves a model that is not one of transformers' own classes as its weights alone (model.safetensors),
and calls no method of the model to do it. Those files load here as they are (the architecture is read off the
tensors); `trainer_callback()` also writes config.json and the processor's config beside the weights of every
checkpoint, so each checkpoint loads in transformers too. After training, `model.save_pretrained(dir)` writes a
complete directory.

Example:
    >>> trainer = Trainer(model=model, args=args, train_dataset=data, callbacks=[trainer_callback(processor)])
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

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
