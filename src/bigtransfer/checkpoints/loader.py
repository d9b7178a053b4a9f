"""The one way a model is built from a checkpoint: name -> local path -> `Checkpoint` -> config -> model -> one
strict load.

`load(model_class, source, ...)` is what every `from_pretrained`, `bigtransfer.load_checkpoint`,
`bigtransfer convert` and training call. The model class is a parameter (the checkpoint code never imports the
model code). The `bit.` prefix, the head (the only part a checkpoint and a model may disagree on) and its zero
re-initialisation (the BiT recipe) are handled here and nowhere else.
"""

from __future__ import annotations

import inspect
import logging
import os
from pathlib import Path
from typing import Any

import torch
from torch import nn

from .. import hub
from ..config import CONFIG_NAME, DTYPES, BitConfig
from ..errors import CheckpointError
from .formats import Checkpoint, describe_variant, read_checkpoint
from .labels import known_labels

logger = logging.getLogger("bigtransfer")

HEAD_PREFIX = "classifier."  # the only keys allowed to differ between a checkpoint and a model
_PREFIX = "bit."
CONFIG_FIELDS = frozenset(inspect.signature(BitConfig.__init__).parameters) - {"self", "kwargs"}
# transformers' Hub arguments and the environment variables huggingface_hub reads instead (set those).
HUB_ENVIRONMENT = {
    "cache_dir": "HF_HUB_CACHE", "token": "HF_TOKEN", "use_auth_token": "HF_TOKEN",
    "local_files_only": "HF_HUB_OFFLINE=1", "proxies": "HTTPS_PROXY",
}


# ---------------------------------------------------------------------------------------------------------------
# Source -> Checkpoint.


def resolve(source: str | os.PathLike, revision: str | None = None) -> tuple[Path, str | None]:
    """A local file or directory holding `source`, and the name it is known by (Google and Hub names only).

    Google names (`BiT-M-R50x1`) and Hub names (`google/bit-50`) are downloaded into the cache (`hub`); a Hub
    `revision` is a branch, tag or commit (local paths ignore it).
    """
    text = os.fspath(source)
    if not str(text).strip():
        raise ValueError("the model name or path is empty")
    path = Path(text).expanduser()
    if path.exists():
        return path, None
    if hub.is_google_name(text):
        return hub.download_google(text), text
    if hub.is_hub_name(text) and not os.path.isabs(text):
        return hub.download(text, revision), text
    hint = ""
    if text.lower().startswith("bit-"):
        released = [name for name in hub.GOOGLE_FILES if "/" not in name and "-ILSVRC" not in name]
        hint = f"; Google released {', '.join(released)}, each also -ILSVRC2012"
    raise OSError(
        f"{text} does not exist: expected a directory with {CONFIG_NAME} and weights, a weights file (timm, Google "
        "npz, original big_transfer), a Google BiT name such as BiT-M-R50x1 or a Hugging Face Hub name such as "
        f"google/bit-50 (no such file or directory, nor such a name){hint}"
    )


def read(source: str | os.PathLike, revision: str | None = None) -> Checkpoint:
    """The Checkpoint of any source `resolve` takes."""
    path, name = resolve(source, revision)
    return read_checkpoint(path, name)


# ---------------------------------------------------------------------------------------------------------------
# Checkpoint -> model.


def load(
    model_class: type, source: str | os.PathLike, *, config: BitConfig | None = None,
    ignore_mismatched_sizes: bool = False, labels: list[str] | None = None, new_head: bool = False,
    allow_non_finite: bool = False, dtype: Any = "auto", torch_dtype: Any = None, device_map: Any = None,
    revision: str | None = None, **overrides: Any,
) -> nn.Module:
    """Build `model_class` from any source; see `BitPreTrainedModel.from_pretrained` for the arguments.

    `labels` names the head's classes (a new head when their count differs from the checkpoint's);
    `new_head=True` always starts a fresh zero-initialised head (the BiT recipe for fine-tuning);
    `allow_non_finite=True` loads weights holding NaN or infinity (with a warning) instead of refusing them.
    """
    _check_overrides(model_class, overrides)
    if torch_dtype is not None:
        if dtype != "auto":
            raise TypeError("pass dtype or its older name torch_dtype, not both")
        dtype = torch_dtype
    device = _device(device_map)
    checkpoint = read(source, revision)
    model = build(model_class, checkpoint, config=config, overrides=overrides, labels=labels, new_head=new_head,
                  ignore_mismatched_sizes=ignore_mismatched_sizes, allow_non_finite=allow_non_finite)
    model.name_or_path = os.fspath(source)
    return model.to(device=device, dtype=resolve_dtype(dtype, _stored_dtype(checkpoint))).eval()


def build(
    model_class: type, checkpoint: Checkpoint, *, config: BitConfig | None = None,
    overrides: dict[str, Any] | None = None, labels: list[str] | None = None, new_head: bool = False,
    ignore_mismatched_sizes: bool = False, allow_non_finite: bool = False,
) -> nn.Module:
    """`model_class` holding the checkpoint's weights, strictly loaded, in eval mode."""
    overrides = dict(overrides or {})
    size = head_size(checkpoint)
    if labels is not None:
        labels = [str(label) for label in labels]
        if overrides.setdefault("num_labels", len(labels)) != len(labels):
            raise ValueError(f"num_labels={overrides['num_labels']} but {len(labels)} labels were given")
        overrides["id2label"] = dict(enumerate(labels))
        new_head = new_head or len(labels) != size
    if checkpoint.inferred and overrides.get("num_labels", size) != size:
        new_head = True  # no config.json to override: another head size is a new head
    if config is None:
        config = _config(checkpoint, overrides, new_head)
    elif overrides:
        raise ValueError(f"pass either config or config overrides, not both (got {sorted(overrides)})")
    model = model_class(config)
    load_state(model, checkpoint, ignore_mismatched_sizes=ignore_mismatched_sizes, new_head=new_head,
               allow_non_finite=allow_non_finite)
    return model.eval()


def _config(checkpoint: Checkpoint, overrides: dict[str, Any], new_head: bool) -> BitConfig:
    """The checkpoint's BitConfig fields with `overrides`; a kept head without class names gets ImageNet's."""
    if not new_head and "id2label" not in overrides and "num_labels" not in overrides:
        names = checkpoint.labels or (None if _named(checkpoint.config) else known_labels(head_size(checkpoint)))
        if names is not None:
            overrides["id2label"] = dict(enumerate(names))
    try:
        return BitConfig.from_dict(checkpoint.config, **overrides)
    except ValueError as error:
        if checkpoint.inferred and "num_groups" in str(error) and "num_groups" not in overrides:
            raise ValueError(
                f"{checkpoint.source}: {error}; {checkpoint.format} files do not store the GroupNorm groups: pass "
                "num_groups=N (the value the network was trained with)"
            ) from None
        raise


def _named(config: dict[str, Any]) -> bool:
    id2label = config.get("id2label") or {}
    return any(name != f"LABEL_{index}" for index, name in id2label.items())


def head_size(checkpoint: Checkpoint) -> int:
    """Classes of the checkpoint's head (0 when it has none)."""
    weight = checkpoint.state.get(HEAD_PREFIX + "1.weight")
    return int(weight.shape[0]) if weight is not None else 0


def load_state(model: nn.Module, checkpoint: Checkpoint, ignore_mismatched_sizes: bool = False,
               new_head: bool = False, allow_non_finite: bool = False) -> None:
    """Strictly load the checkpoint into `model`: the one place keys are matched, checked and re-initialised.

    The `bit.` prefix is removed for models that are the backbone themselves (BitModel). Only the head
    (`classifier.*`) may differ: a head the model lacks is ignored; one missing from the checkpoint, one asked
    for anew (`new_head`), or one whose shape no longer fits when `ignore_mismatched_sizes=True`, starts at
    zero. Any other missing, unexpected or misshapen key raises CheckpointError listing them in the source's
    own names; so do weights holding NaN or infinity (a diverged run's), unless `allow_non_finite`.
    """
    expected = model.state_dict()
    wrapped = any(key.startswith(_PREFIX) for key in expected)
    has_head = any(key.startswith(HEAD_PREFIX) for key in expected)
    state = {
        (key if wrapped or key.startswith(HEAD_PREFIX) else key.removeprefix(_PREFIX)): value
        for key, value in checkpoint.state.items()
        if not (key.startswith(HEAD_PREFIX) and (new_head or not has_head))
    }

    def named(keys: list[str]) -> list[str]:
        return [checkpoint.source_key(key if wrapped or key.startswith(HEAD_PREFIX) else _PREFIX + key) for key in keys]

    target = f"the inferred {describe_variant(model.config)}" if checkpoint.inferred else type(model).__name__
    subject = f"{checkpoint.source} ({checkpoint.format})" if checkpoint.inferred else checkpoint.source
    missing = [key for key in expected if key not in state and not key.startswith(HEAD_PREFIX)]
    unexpected = [key for key in state if key not in expected]
    if missing or unexpected:
        problems = [f"missing keys {named(missing)}" if missing else "", f"unexpected keys {named(unexpected)}" if unexpected else ""]
        raise CheckpointError(f"{subject} does not fit {target}: " + "; ".join(part for part in problems if part))
    mismatched = [key for key in state if state[key].shape != expected[key].shape]
    fatal = [key for key in mismatched if not (ignore_mismatched_sizes and key.startswith(HEAD_PREFIX))]
    if fatal:
        where = "the model" if not checkpoint.inferred else target
        hint = " (pass ignore_mismatched_sizes=True to start a new head)" if all(
            key.startswith(HEAD_PREFIX) for key in fatal) else ""
        raise CheckpointError(f"{checkpoint.source}: " + "; ".join(
            f"{named([key])[0]} has shape {tuple(state[key].shape)} in the checkpoint but "
            f"{tuple(expected[key].shape)} in {where}" for key in fatal) + hint)
    for key in mismatched:
        state.pop(key)
    fresh = [key for key in expected if key not in state]
    for key in fresh:
        state[key] = torch.zeros_like(expected[key])
    if fresh and not new_head:
        logger.warning("%s: newly initialised (zeros, the BiT recipe's head) because they were %s: %s",
                       type(model).__name__, "missing or resized" if mismatched else "missing", sorted(fresh))
    _check_finite(checkpoint, {key: value for key, value in state.items() if key not in fresh}, named, allow_non_finite)
    for key, value in state.items():
        if value.dtype != expected[key].dtype and value.is_floating_point():
            state[key] = value.to(expected[key].dtype)
    model.load_state_dict(state, strict=True)


def _check_finite(checkpoint: Checkpoint, state: dict[str, torch.Tensor], named, allowed: bool) -> None:
    bad = [key for key, value in state.items() if value.is_floating_point() and not torch.isfinite(value).all()]
    if not bad:
        return
    message = f"{checkpoint.source}: {len(bad)} tensor(s) hold NaN or infinite values: {named(bad[:5])}"
    if not allowed:
        raise CheckpointError(message + "; such weights give NaN outputs (a diverged run?). Pass allow_non_finite=True "
                              "to load them anyway")
    logger.warning("%s; loaded as asked (allow_non_finite=True)", message)


# ---------------------------------------------------------------------------------------------------------------
# Arguments.


def _check_overrides(model_class: type, overrides: dict[str, Any]) -> None:
    """Keyword arguments of from_pretrained must be config fields: a typo must not vanish into the config."""
    unknown = sorted(set(overrides) - CONFIG_FIELDS)
    if not unknown:
        return
    hub_names = [f"{name} (set {HUB_ENVIRONMENT[name]})" for name in unknown if name in HUB_ENVIRONMENT]
    hint = f"; for the Hub's {', '.join(hub_names)}" if hub_names else ""
    raise TypeError(
        f"{model_class.__name__}.from_pretrained got unexpected keyword arguments {unknown}: it takes BitConfig "
        f"fields ({', '.join(sorted(CONFIG_FIELDS))}) and ignore_mismatched_sizes, config, dtype, torch_dtype, "
        f"device_map, revision{hint}"
    )


def _stored_dtype(checkpoint: Checkpoint) -> torch.dtype:
    """The dtype the weights were saved in: what config.json records (as transformers does), else the first
    floating tensor's."""
    recorded = str(checkpoint.config.get("dtype") or checkpoint.config.get("torch_dtype")).removeprefix("torch.")
    stored = next((value.dtype for value in checkpoint.state.values() if value.is_floating_point()), torch.float32)
    return DTYPES.get(recorded, stored)


def resolve_dtype(dtype: Any, stored: torch.dtype) -> torch.dtype:
    """The floating dtype asked for; "auto" (and None) is `stored`, the dtype the weights were saved in."""
    if isinstance(dtype, torch.dtype) and dtype.is_floating_point:
        return dtype
    if dtype is None or dtype == "auto":
        return stored
    if isinstance(dtype, str) and dtype.removeprefix("torch.") in DTYPES:
        return DTYPES[dtype.removeprefix("torch.")]
    raise ValueError(f"dtype must be a floating torch dtype, one of {sorted(DTYPES)} or 'auto', got {dtype!r}")


def _device(device_map: Any) -> torch.device | None:
    """One device for the whole model ("auto": the first GPU when there is one); BiT is never split."""
    if device_map is None:
        return None
    if device_map == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if isinstance(device_map, dict):
        raise ValueError(
            "device_map as a dict (layers spread over devices) is not supported: a BiT model fits one device, "
            "pass that device instead, e.g. device_map='cuda:0'"
        )
    try:
        return torch.device(device_map)
    except (RuntimeError, TypeError):
        raise ValueError(f"device_map must be a device such as 'cpu', 'cuda:0' or 0, or 'auto', got {device_map!r}") from None
