"""The one way a model is built from a checkpoint: name -> local path -> `Checkpoint` -> config -> model -> one
strict load.

`load(model_class, source, ...)` is what every `from_pretrained`, `bigtransfer.load_checkpoint`,
`bigtransfer convert` and training call. The model class is a parameter (the checkpoint code never imports the
model code). The `bit.` prefix and the head (the only part a checkpoint and a model may disagree on) are handled
here and nowhere else; a fresh head is started by the model's own `reset_classifier` (zeros, the BiT recipe).
"""

from __future__ import annotations

import dataclasses
import inspect
import logging
import os
import re
from pathlib import Path
from typing import Any

import torch
from torch import nn

from .. import hub
from ..config import CONFIG_NAME, DTYPES, BitConfig
from ..errors import CheckpointError, MismatchedSizesError, SourceNotFoundError, did_you_mean
from . import keymaps
from .formats import Checkpoint, describe_variant, read_checkpoint
from .labels import known_labels

logger = logging.getLogger("bigtransfer")

WEIGHT_SUFFIXES = (".npz", ".safetensors", ".pth", ".pt", ".bin", ".ckpt")
HEAD_PREFIX = "classifier."  # the only keys allowed to differ between a checkpoint and a model
_PREFIX = "bit."
CONFIG_FIELDS = frozenset(inspect.signature(BitConfig.__init__).parameters) - {"self", "kwargs"}


# ---------------------------------------------------------------------------------------------------------------
# Source -> Checkpoint.


def resolve(source: str | os.PathLike, options: hub.HubOptions = hub.DEFAULT_OPTIONS) -> tuple[Path, str | None]:
    """A local file or directory holding `source`, and the name it is known by (Google and Hub names only).

    Google names (`BiT-M-R50x1`) and Hub names (`google/bit-50`) are downloaded into the cache (`hub`, as
    `options` say); a local directory's `options.subfolder` is looked into.
    """
    existing = hub.local_source(source, options)
    if existing is not None:
        return existing, None
    text = os.fspath(source)
    path = Path(text).expanduser()
    local = looks_local(text)
    if hub.is_google_name(text):
        try:
            return hub.download_google(text, options=options), text
        except OSError as error:
            if not local:
                raise
            raise SourceNotFoundError(
                f"{text} does not exist ({path.absolute()}); as the name of Google's checkpoint it could not be "
                f"downloaded either: {error}"
            ) from error
    if hub.is_hub_name(text) and not local:
        return hub.download(text, options), text
    raise SourceNotFoundError(missing_source_message(text))


def looks_local(text: str) -> bool:
    """Whether a model name can only be a path: relative or absolute path syntax, or a weights file's suffix."""
    return text.startswith((".", "/", "~")) or text.count("/") > 1 or Path(text).suffix.lower() in WEIGHT_SUFFIXES


def missing_source_message(text: str, also: str = "", names: tuple[str, ...] = ()) -> str:
    """What was expected of a model source that is neither a path nor a known name (`also`: what else the caller
    accepts, `names`: its names, for close matches)."""
    expected = f"a directory with {CONFIG_NAME} and weights, a weights file (timm, Google npz, original big_transfer)"
    if looks_local(text):
        return f"{text} does not exist: expected {expected} at {Path(text).expanduser().absolute()} (no such file or directory)"
    google = [name for name in hub.GOOGLE_FILES if "/" not in name]
    hint = did_you_mean(text, [*names, *google])
    if text.lower().startswith("bit-"):
        released = [name for name in google if "-ILSVRC" not in name]
        hint += f"; Google released {', '.join(released)}, each also -ILSVRC2012"
    return (
        f"{text} does not exist: expected {expected}, a Google BiT name such as BiT-M-R50x1{also} or a Hugging Face "
        f"Hub name such as google/bit-50 (no such file or directory, nor such a name){hint}"
    )


def read(source: str | os.PathLike, options: hub.HubOptions = hub.DEFAULT_OPTIONS) -> Checkpoint:
    """The Checkpoint of any source `resolve` takes."""
    path, name = resolve(source, options)
    return read_checkpoint(path, name, use_safetensors=options.use_safetensors, variant=options.variant)


# ---------------------------------------------------------------------------------------------------------------
# Checkpoint -> model.

# transformers' from_pretrained arguments that mean nothing for BiT: accepted, and ignored for the reason given.
IGNORED_ARGUMENTS = {
    "low_cpu_mem_usage": "weights are always loaded straight into the one model built",
    "trust_remote_code": "no code from a checkpoint is ever run",
    "attn_implementation": "BiT has no attention",
    "experts_implementation": "BiT has no mixture of experts",
    "use_flash_attention_2": "BiT has no attention",
    "_fast_init": "initialisation is always skipped for loaded weights",
    "offload_folder": "a BiT fits one device, so nothing is offloaded",
    "offload_state_dict": "a BiT fits one device, so nothing is offloaded",
    "offload_buffers": "a BiT fits one device, so nothing is offloaded",
    "max_memory": "a BiT is never split over devices (max_memory bounds device_map='auto' splits)",
    "disable_mmap": "safetensors files are read whole into the model",
    "generation_config": "BiT is not a generative model",
    "tqdm_class": "loading shows no progress bar",
    "_from_auto": "transformers' own bookkeeping",
    "_from_pipeline": "transformers' own bookkeeping",
    "_commit_hash": "transformers' own bookkeeping (pass revision to pick a commit)",
}
# transformers' from_pretrained arguments taken at their default value only; any other is refused for the reason given.
REFUSED_ARGUMENTS = {
    "proxies": (None, "huggingface_hub reads proxies from the environment: set HTTPS_PROXY (and HTTP_PROXY) instead"),
    "weights_only": (True, "checkpoints are always read without running pickled code (a restricted unpickler)"),
    "quantization_config": (None, "BiT is not quantized while loading; bigtransfer.quantize makes an int8 ONNX model"),
    "use_kernels": (False, "there are no Hub kernels for BiT's layers"),
    "kernel_config": (None, "there are no Hub kernels for BiT's layers"),
    "tp_plan": (None, "a BiT fits one device, so it is not split by tensor parallelism; train data-parallel (torchrun)"),
    "tp_size": (None, "a BiT fits one device, so it is not split by tensor parallelism; train data-parallel (torchrun)"),
    "device_mesh": (None, "a BiT fits one device, so it is not split by tensor parallelism; train data-parallel"),
    "distributed_config": (None, "a BiT fits one device, so it is not split over several"),
    "adapter_kwargs": (None, "load adapters with peft.PeftModel.from_pretrained(model, path)"),
    "adapter_name": (None, "load adapters with peft.PeftModel.from_pretrained(model, path, adapter_name=...)"),
    "gguf_file": (None, "GGUF files hold language models, not BiT"),
    "fusion_config": (None, "BiT's layers have no fused variants to choose"),
    "from_tf": (False, "TensorFlow checkpoints: pass Google's .npz file or name (BiT-M-R50x1) instead"),
    "from_flax": (False, "Flax checkpoints: pass Google's .npz file or name (BiT-M-R50x1) instead"),
}


def _check_refused(arguments: dict[str, Any]) -> None:
    for name, value in arguments.items():
        default, reason = REFUSED_ARGUMENTS[name]
        if value is not default and value != default and not (name == "adapter_kwargs" and value == {}):
            raise ValueError(f"from_pretrained({name}={value!r}) is not supported: {reason}")


def load(
    model_class: type, source: str | os.PathLike | None = None, *, config: BitConfig | None = None,
    state_dict: dict[str, torch.Tensor] | None = None, ignore_mismatched_sizes: bool = False,
    labels: list[str] | None = None, new_head: bool = False, allow_non_finite: bool = False,
    output_loading_info: bool = False, dtype: Any = "auto", torch_dtype: Any = None, device_map: Any = None,
    pretrained_model_name_or_path: str | os.PathLike | None = None, revision: str | None = None,
    cache_dir: str | os.PathLike | None = None, token: str | bool | None = None, use_auth_token: Any = None,
    local_files_only: bool = False, force_download: bool = False, subfolder: str | None = None,
    use_safetensors: bool | None = None, variant: str | None = None, key_mapping: dict[str, str] | None = None,
    **overrides: Any,
):
    """Build `model_class` from any source; see `BitPreTrainedModel.from_pretrained` for the arguments.

    `labels` names the head's classes (a new head when their count differs from the checkpoint's);
    `new_head=True` always starts a fresh zero-initialised head (the BiT recipe for fine-tuning);
    `allow_non_finite=True` loads weights holding NaN or infinity (with a warning) instead of refusing them.
    """
    for name in IGNORED_ARGUMENTS:
        overrides.pop(name, None)
    _check_refused({name: overrides.pop(name) for name in list(overrides) if name in REFUSED_ARGUMENTS})
    _check_overrides(model_class, overrides)
    source = _one_source(source, pretrained_model_name_or_path)
    if torch_dtype is not None:
        if dtype != "auto":
            raise TypeError("pass dtype or its older name torch_dtype, not both")
        dtype = torch_dtype
    _refuse_meta_device()
    device = _device(device_map)
    options = hub.HubOptions(revision, cache_dir, token if token is not None else use_auth_token, local_files_only,
                             force_download, subfolder, use_safetensors, variant)
    checkpoint = _renamed(_checkpoint(source, state_dict, config, options), key_mapping)
    model, info = _build(model_class, checkpoint, config=config, overrides=overrides, labels=labels,
                         new_head=new_head, ignore_mismatched_sizes=ignore_mismatched_sizes,
                         allow_non_finite=allow_non_finite)
    model.name_or_path = "" if source is None else os.fspath(source)
    model = model.to(device=device, dtype=resolve_dtype(dtype, _stored_dtype(checkpoint))).eval()
    return (model, info) if output_loading_info else model


def _renamed(checkpoint: Checkpoint, key_mapping: dict[str, str] | None) -> Checkpoint:
    """The checkpoint with transformers' `key_mapping` applied: each key is renamed by the first pattern (a regular
    expression) that matches it, as a transformers directory stores it (other formats: their keys once renamed to
    transformers' naming)."""
    if not key_mapping:
        return checkpoint
    if not isinstance(key_mapping, dict) or not all(isinstance(k, str) and isinstance(v, str)
                                                    for k, v in key_mapping.items()):
        raise TypeError("key_mapping must be a dict of regular expressions to replacements (str -> str)")
    patterns = []
    for pattern, replacement in key_mapping.items():
        try:
            patterns.append((re.compile(pattern), replacement))
        except re.error as error:
            raise ValueError(f"key_mapping: {pattern!r} is not a regular expression: {error}") from None
    raw = {_stored_key(checkpoint, key): value for key, value in checkpoint.state.items()}
    renamed = {}
    for key, value in raw.items():
        for pattern, replacement in patterns:
            key, count = pattern.subn(replacement, key)
            if count:
                break
        renamed[key] = value
    prefixed = any(key.startswith(_PREFIX) for key in renamed)
    state = {key if key.startswith((_PREFIX, HEAD_PREFIX)) else _PREFIX + key: value for key, value in renamed.items()}
    return dataclasses.replace(checkpoint, state=state, prefixed=prefixed)


def _stored_key(checkpoint: Checkpoint, key: str) -> str:
    """A key as a transformers-layout source stores it (without the `bit.` prefix a BitModel's lacks); the
    transformers-named key for other formats."""
    if checkpoint.naming == keymaps.TRANSFORMERS and not checkpoint.prefixed and not key.startswith(HEAD_PREFIX):
        return key.removeprefix(_PREFIX)
    return key


def _one_source(source: Any, keyword: Any) -> Any:
    if keyword is not None:
        if source is not None:
            raise TypeError("pass the source once: positionally or as pretrained_model_name_or_path, not both")
        return keyword
    return source


def _checkpoint(source: Any, state_dict: dict[str, torch.Tensor] | None, config: BitConfig | None,
                options: hub.HubOptions) -> Checkpoint:
    """What to build from: the source read, or a given state dict (with the source's config, or `config`)."""
    if state_dict is None:
        if source is None:
            raise ValueError("from_pretrained needs a model name or path (or a state_dict with a config)")
        return read(source, options)
    if not isinstance(state_dict, dict) or not all(isinstance(value, torch.Tensor) for value in state_dict.values()):
        raise TypeError("state_dict must be a dict of names to tensors")
    described = read(source, options) if source is not None else None
    fields = config.to_dict() if config is not None else described.config if described is not None else None
    if fields is None:
        raise ValueError("from_pretrained(state_dict=...) needs a config, or a source that has one")
    return Checkpoint(keymaps.TRANSFORMERS, "state_dict", "the given state_dict",
                      keymaps.to_transformers(state_dict, keymaps.detect_naming(state_dict)), dict(fields),
                      inferred=False, prefixed=any(key.startswith(_PREFIX) for key in state_dict))


def _refuse_meta_device() -> None:
    """Loading inside `with torch.device("meta")` would build weights that hold nothing (transformers refuses)."""
    probe = torch.empty(0)
    if probe.device.type == "meta":
        raise RuntimeError("cannot load weights inside a torch.device('meta') context: the model would hold no "
                           "values. Build it there without weights (BitForImageClassification(config)), or load outside")


def build(model_class: type, checkpoint: Checkpoint, **options: Any) -> nn.Module:
    """`model_class` holding the checkpoint's weights, strictly loaded, in eval mode (`options` as `load`'s:
    config, overrides, labels, new_head, ignore_mismatched_sizes, allow_non_finite)."""
    return _build(model_class, checkpoint, **options)[0]


def _build(
    model_class: type, checkpoint: Checkpoint, *, config: BitConfig | None = None,
    overrides: dict[str, Any] | None = None, labels: list[str] | None = None, new_head: bool = False,
    ignore_mismatched_sizes: bool = False, allow_non_finite: bool = False,
) -> tuple[nn.Module, dict[str, Any]]:
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
    info = load_state(model, checkpoint, ignore_mismatched_sizes=ignore_mismatched_sizes, new_head=new_head,
                      allow_non_finite=allow_non_finite)
    return model.eval(), info


def _config(checkpoint: Checkpoint, overrides: dict[str, Any], new_head: bool) -> BitConfig:
    """The checkpoint's BitConfig fields with `overrides`; a kept head without class names gets ImageNet's."""
    if not new_head and "id2label" not in overrides and "num_labels" not in overrides:
        names = checkpoint.labels or (None if _named(checkpoint.config) else known_labels(head_size(checkpoint)))
        if names is not None:
            overrides["id2label"] = dict(enumerate(names))
    unknown_groups = (checkpoint.inferred and checkpoint.naming == keymaps.TRANSFORMERS
                      and checkpoint.container == "directory" and "num_groups" not in overrides)
    try:
        config = BitConfig.from_dict(checkpoint.config, **overrides)
    except ValueError as error:
        if checkpoint.inferred and "num_groups" in str(error) and "num_groups" not in overrides:
            raise ValueError(
                f"{checkpoint.source}: {error}; {checkpoint.format} files do not store the GroupNorm groups: pass "
                "num_groups=N (the value the network was trained with)"
            ) from None
        raise
    if unknown_groups:
        # Weights alone (what transformers' Trainer saves for a model that is not its own class) say nothing of the
        # GroupNorm groups; BiT's 32 is assumed, and a network trained with others would load with a wrong function.
        logger.warning("%s has no config.json: assumed BiT's num_groups=%d; pass num_groups=N if the network was "
                       "trained with another (integrations.trainer_callback writes config.json into checkpoints)",
                       checkpoint.source, config.num_groups)
    return config


def _named(config: dict[str, Any]) -> bool:
    id2label = config.get("id2label") or {}
    return any(name != f"LABEL_{index}" for index, name in id2label.items())


def head_size(checkpoint: Checkpoint) -> int:
    """Classes of the checkpoint's head (0 when it has none)."""
    weight = checkpoint.state.get(HEAD_PREFIX + "1.weight")
    return int(weight.shape[0]) if weight is not None else 0


def load_state(model: nn.Module, checkpoint: Checkpoint, ignore_mismatched_sizes: bool = False,
               new_head: bool = False, allow_non_finite: bool = False) -> dict[str, Any]:
    """Strictly load the checkpoint into `model`: the one place keys are matched, checked and re-initialised.

    The `bit.` prefix is removed for models that are the backbone themselves (BitModel). Only the head
    (`classifier.*`) may differ: a head the model lacks is ignored; one missing from the checkpoint, one asked
    for anew (`new_head`), or one whose shape no longer fits when `ignore_mismatched_sizes=True`, starts at
    zero. Any other missing, unexpected or misshapen key raises CheckpointError listing them in the source's
    own names; so do weights holding NaN or infinity (a diverged run's), unless `allow_non_finite`. Returns
    transformers' loading info: missing (re-initialised), unexpected (ignored) and mismatched keys.
    """
    expected = model.state_dict()
    wrapped = any(key.startswith(_PREFIX) for key in expected)
    has_head = any(key.startswith(HEAD_PREFIX) for key in expected)
    state = {
        (key if wrapped or key.startswith(HEAD_PREFIX) else key.removeprefix(_PREFIX)): value
        for key, value in checkpoint.state.items()
        if not (key.startswith(HEAD_PREFIX) and (new_head or not has_head))
    }
    ignored = [key for key in checkpoint.state if key.startswith(HEAD_PREFIX) and not has_head]

    def named(keys: list[str]) -> list[str]:
        return [checkpoint.source_key(key if wrapped or key.startswith(HEAD_PREFIX) else _PREFIX + key) for key in keys]

    target = f"the inferred {describe_variant(model.config)}" if checkpoint.inferred else type(model).__name__
    subject = f"{checkpoint.source} ({checkpoint.format})" if checkpoint.inferred else checkpoint.source
    missing = [key for key in expected if key not in state and not key.startswith(HEAD_PREFIX)]
    unexpected = [key for key in state if key not in expected]
    if missing or unexpected:
        problems = [f"missing keys {named(missing)}" if missing else "", f"unexpected keys {named(unexpected)}" if unexpected else ""]
        raise CheckpointError(f"{subject} does not fit {target}: " + "; ".join(part for part in problems if part))
    mismatched = _mismatched(state, expected, checkpoint, "the model" if not checkpoint.inferred else target, named,
                             ignore_mismatched_sizes)
    # transformers 5's loading info: sets of keys (and of (key, checkpoint shape, model shape)), a list of messages.
    info = dict(missing_keys=set(), unexpected_keys=set(ignored), error_msgs=[],
                mismatched_keys={(key, tuple(state[key].shape), tuple(expected[key].shape)) for key in mismatched})
    for key in mismatched:
        state.pop(key)
    fresh = [key for key in expected if key not in state]
    info["missing_keys"] = {key for key in fresh if key not in set(mismatched)}
    if fresh:  # only the head can be fresh: the model's own reset_classifier starts it (zeros, the BiT recipe)
        model.reset_classifier(model.config.num_labels)
        state.update({key: value for key, value in model.state_dict().items() if key in fresh})
    old_head = checkpoint.state.get(HEAD_PREFIX + "1.weight")
    if new_head and has_head and old_head is not None:
        logger.info("%s: its %d-class head is replaced by a new zero-initialised %d-class head (the BiT recipe)",
                    checkpoint.source, old_head.shape[0], expected[HEAD_PREFIX + "1.weight"].shape[0])
    elif fresh and not new_head:
        logger.warning("%s: newly initialised (zeros, the BiT recipe's head) because they were %s: %s",
                       type(model).__name__, "missing or resized" if mismatched else "missing", sorted(fresh))
    _check_finite(checkpoint, {key: value for key, value in state.items() if key not in fresh}, named, allow_non_finite)
    for key, value in state.items():
        if value.dtype != expected[key].dtype and value.is_floating_point():
            state[key] = value.to(expected[key].dtype)
    model.load_state_dict(state, strict=True)
    return info


def _mismatched(state: dict[str, torch.Tensor], expected: dict[str, torch.Tensor], checkpoint: Checkpoint, where: str,
                named, ignore_mismatched_sizes: bool) -> list[str]:
    """The keys whose shapes differ; CheckpointError unless only the head differs and may start anew."""
    mismatched = [key for key in state if state[key].shape != expected[key].shape]
    fatal = [key for key in mismatched if not (ignore_mismatched_sizes and key.startswith(HEAD_PREFIX))]
    if fatal:
        hint = " (pass ignore_mismatched_sizes=True to start a new head)" if all(
            key.startswith(HEAD_PREFIX) for key in fatal) else ""
        error = MismatchedSizesError if hint else CheckpointError
        raise error(f"{checkpoint.source}: " + "; ".join(
            f"{named([key])[0]} has shape {tuple(state[key].shape)} in the checkpoint but "
            f"{tuple(expected[key].shape)} in {where}" for key in fatal) + hint)
    return mismatched


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
    raise TypeError(
        f"{model_class.__name__}.from_pretrained got unexpected keyword arguments {unknown}: it takes BitConfig "
        f"fields ({', '.join(sorted(CONFIG_FIELDS))}) and the loading arguments of transformers (config, "
        f"state_dict, dtype, device_map, revision, cache_dir, token, subfolder, variant, ...)"
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
        if set(device_map) != {""}:
            raise ValueError(
                "device_map as a dict of modules (layers spread over devices) is not supported: a BiT model fits one "
                "device; pass that device, e.g. device_map='cuda:0' or {'': 'cuda:0'}"
            )
        return _device(device_map[""])
    try:
        return torch.device(device_map)
    except (RuntimeError, TypeError):
        raise ValueError(f"device_map must be a device such as 'cpu', 'cuda:0' or 0, or 'auto', got {device_map!r}") from None
