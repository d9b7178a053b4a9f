"""from_pretrained / save_pretrained in the transformers directory layout, with strict, explained loading."""

from __future__ import annotations

import inspect
import logging
import os
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save_file

from .checkpoints.readers import read_safetensors, read_torch_pickle
from .config import CONFIG_NAME, BitConfig
from .errors import CheckpointError
from .files import atomic_path, read_json

logger = logging.getLogger("bigtransfer")

SAFE_WEIGHTS_NAME = "model.safetensors"
SAFE_WEIGHTS_INDEX_NAME = "model.safetensors.index.json"
WEIGHTS_NAME = "pytorch_model.bin"
HEAD_PREFIX = "classifier."
CONFIG_FIELDS = frozenset(inspect.signature(BitConfig.__init__).parameters) - {"self", "kwargs"}
# transformers' Hub arguments and the environment variables huggingface_hub reads instead (set those).
HUB_ENVIRONMENT = {
    "cache_dir": "HF_HUB_CACHE", "token": "HF_TOKEN", "use_auth_token": "HF_TOKEN",
    "local_files_only": "HF_HUB_OFFLINE=1", "proxies": "HTTPS_PROXY",
}
DTYPES = {
    "float32": torch.float32, "float": torch.float32, "fp32": torch.float32,
    "float16": torch.float16, "half": torch.float16, "fp16": torch.float16,
    "bfloat16": torch.bfloat16, "bf16": torch.bfloat16, "float64": torch.float64, "double": torch.float64,
}


def resolve_pretrained(path_or_name: str | os.PathLike, revision: str | None = None) -> Path:
    """A local directory holding config.json and weights; Hub names are downloaded (huggingface_hub extra) at
    `revision` (a branch, tag or commit; the default branch when None; local directories ignore it)."""
    if not str(path_or_name).strip():
        raise ValueError("the model name or path is empty")
    path = Path(path_or_name)
    if path.is_dir():
        return path
    from .checkpoints import hub

    if not path.exists() and hub.is_hub_name(str(path_or_name)):
        return hub.snapshot(str(path_or_name), revision)
    problem = "is a file, not a model directory" if path.exists() else "does not exist"
    hint = ""
    if not path.exists() and str(path_or_name).lower().startswith("bit-"):
        released = [name for name in hub.GOOGLE_FILES if "/" not in name and "-ILSVRC" not in name]
        hint = f" (Google released {', '.join(released)}, each also -ILSVRC2012)"
    raise OSError(
        f"{path_or_name} {problem}: expected a directory with {CONFIG_NAME} and weights, or a Hugging Face Hub "
        f"name such as google/bit-50{hint}"
    )


def is_single_checkpoint(path_or_name: str | os.PathLike) -> bool:
    """A weights file of any format, or a Google BiT name, rather than a transformers-layout directory."""
    from .checkpoints import hub

    return Path(path_or_name).is_file() or (not Path(path_or_name).exists() and hub.is_google_name(str(path_or_name)))


def read_directory_weights(directory: Path) -> dict[str, torch.Tensor]:
    """The state dict stored in a transformers-layout directory (safetensors preferred, sharded or not)."""
    if (directory / SAFE_WEIGHTS_NAME).is_file():
        return read_safetensors(directory / SAFE_WEIGHTS_NAME)
    if (directory / SAFE_WEIGHTS_INDEX_NAME).is_file():
        index = read_json(directory / SAFE_WEIGHTS_INDEX_NAME)
        state: dict[str, torch.Tensor] = {}
        for shard in sorted(set(index.get("weight_map", {}).values())):
            if Path(shard).name != shard:
                raise CheckpointError(f"{directory / SAFE_WEIGHTS_INDEX_NAME} names a shard outside the directory: {shard}")
            state.update(read_safetensors(directory / shard))
        return state
    if (directory / WEIGHTS_NAME).is_file():
        return read_torch_pickle(directory / WEIGHTS_NAME)
    raise CheckpointError(
        f"no weights in {directory}: expected {SAFE_WEIGHTS_NAME}, {SAFE_WEIGHTS_INDEX_NAME} or {WEIGHTS_NAME}"
    )


def load_pretrained(
    model_class: type, path_or_name: str | os.PathLike, ignore_mismatched_sizes: bool = False,
    config: BitConfig | None = None, *, dtype: Any = "auto", torch_dtype: Any = None, device_map: Any = None,
    revision: str | None = None, **config_overrides: Any,
):
    """Build `model_class` from a directory, weights file or name; see `BitPreTrainedModel.from_pretrained`."""
    _check_overrides(model_class, config_overrides)
    if torch_dtype is not None:
        if dtype != "auto":
            raise TypeError("pass dtype or its older name torch_dtype, not both")
        dtype = torch_dtype
    device = _device(device_map)
    if config is None and is_single_checkpoint(path_or_name):
        from .checkpoints.convert import load_checkpoint

        # A new `num_labels` always starts a fresh zero head here, so ignore_mismatched_sizes has nothing to add.
        model = load_checkpoint(path_or_name, model_class, **config_overrides)
        return _placed(model, _dtype(dtype, stored=torch.float32), device, path_or_name)
    directory = resolve_pretrained(path_or_name, revision)
    if config is None:
        config = BitConfig.from_pretrained(directory, **config_overrides)
    elif config_overrides:
        raise ValueError(f"pass either config or config overrides, not both (got {sorted(config_overrides)})")
    model = model_class(config)
    state = read_directory_weights(directory)
    # "auto" as in transformers: the dtype config.json records, else the first floating weight's.
    recorded = str(config.extra.get("dtype") or config.extra.get("torch_dtype")).removeprefix("torch.")
    stored = next((value.dtype for value in state.values() if value.is_floating_point()), torch.float32)
    load_state(model, state, ignore_mismatched_sizes=ignore_mismatched_sizes, source=directory)
    return _placed(model, _dtype(dtype, DTYPES.get(recorded, stored)), device, path_or_name)


def _check_overrides(model_class: type, overrides: dict[str, Any]) -> None:
    """Keyword arguments of from_pretrained must be config fields: a typo must not vanish into the config."""
    unknown = sorted(set(overrides) - CONFIG_FIELDS)
    if not unknown:
        return
    hub = [f"{name} (set {HUB_ENVIRONMENT[name]})" for name in unknown if name in HUB_ENVIRONMENT]
    hint = f"; for the Hub's {', '.join(hub)}" if hub else ""
    raise TypeError(
        f"{model_class.__name__}.from_pretrained got unexpected keyword arguments {unknown}: it takes BitConfig "
        f"fields ({', '.join(sorted(CONFIG_FIELDS))}) and ignore_mismatched_sizes, config, dtype, torch_dtype, "
        f"device_map, revision{hint}"
    )


def _dtype(dtype: Any, stored: torch.dtype) -> torch.dtype:
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


def _placed(model: torch.nn.Module, dtype: torch.dtype, device: torch.device | None, source: Any) -> torch.nn.Module:
    """The loaded model in eval mode, cast and moved as asked, and named after its source."""
    model.name_or_path = os.fspath(source)
    return model.to(device=device, dtype=dtype).eval()


def load_state(
    model: torch.nn.Module, state: dict[str, torch.Tensor], ignore_mismatched_sizes: bool = False, source: Any = "checkpoint"
) -> None:
    """Strictly load `state` into `model`.

    The `bit.` prefix is added or removed to fit the model (BitModel vs. models that wrap it). Only the head
    (`classifier.*`) may differ: a head missing from the checkpoint, or one whose shape no longer fits when
    `ignore_mismatched_sizes=True`, is zero-initialised with a warning; a checkpoint head is ignored by models
    without one. Any other missing, unexpected or misshapen key raises CheckpointError that lists them.
    """
    expected = model.state_dict()
    state = _match_prefix(state, expected)
    head_only = [key for key in state if key.startswith(HEAD_PREFIX) and key not in expected]
    for key in head_only:  # a classification checkpoint loaded into BitModel or BitBackbone
        state.pop(key)
    missing = [key for key in expected if key not in state]
    unexpected = [key for key in state if key not in expected]
    if unexpected or any(not key.startswith(HEAD_PREFIX) for key in missing):
        raise CheckpointError(
            f"{source} does not fit {type(model).__name__}: "
            + "; ".join(
                part
                for part in (
                    f"missing keys {[key for key in missing if not key.startswith(HEAD_PREFIX)]}" if missing else "",
                    f"unexpected keys {unexpected}" if unexpected else "",
                )
                if part
            )
        )
    mismatched = [key for key in expected if key in state and state[key].shape != expected[key].shape]
    reinitialised = list(missing)
    fatal = []
    for key in mismatched:
        if ignore_mismatched_sizes and key.startswith(HEAD_PREFIX):
            state.pop(key)
            reinitialised.append(key)
        else:
            fatal.append(
                f"{key} has shape {tuple(state[key].shape)} in the checkpoint but {tuple(expected[key].shape)} in the model"
            )
    if fatal:
        hint = " (pass ignore_mismatched_sizes=True to start a new head)" if all(
            key.startswith(HEAD_PREFIX) for key in mismatched
        ) else ""
        raise CheckpointError(f"{source}: " + "; ".join(fatal) + hint)
    for key in reinitialised:
        state[key] = torch.zeros_like(expected[key])
    if reinitialised:
        logger.warning(
            "%s: newly initialised (zeros, the BiT recipe's head) because they were %s: %s", type(model).__name__,
            "missing or resized" if mismatched else "missing", sorted(reinitialised)
        )
    for key, value in state.items():
        if value.dtype != expected[key].dtype and value.is_floating_point():
            state[key] = value.to(expected[key].dtype)
    model.load_state_dict(state, strict=True)


def _match_prefix(state: dict[str, torch.Tensor], expected: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    prefix = "bit."
    model_wrapped = any(key.startswith(prefix) for key in expected)
    checkpoint_wrapped = any(key.startswith(prefix) for key in state)
    if model_wrapped and not checkpoint_wrapped:
        return {(key if key.startswith(HEAD_PREFIX) else prefix + key): value for key, value in state.items()}
    if checkpoint_wrapped and not model_wrapped:
        return {key.removeprefix(prefix): value for key, value in state.items()}
    return dict(state)


def save_pretrained(model: torch.nn.Module, save_directory: str | os.PathLike, safe_serialization: bool = True) -> None:
    """config.json + model.safetensors (or pytorch_model.bin), each written atomically."""
    directory = Path(save_directory)
    if directory.exists() and not directory.is_dir():
        raise NotADirectoryError(f"cannot save model: {directory} is a file, not a directory")
    directory.mkdir(parents=True, exist_ok=True)
    config = model.config
    config.extra["architectures"] = [type(model).__name__]
    parameter = next(model.parameters(), None)  # recorded as transformers does, for dtype="auto"
    config.extra["dtype"] = str(parameter.dtype if parameter is not None else torch.float32).removeprefix("torch.")
    config.extra.pop("torch_dtype", None)
    config.save_pretrained(directory)
    state = {key: value.detach().cpu().contiguous() for key, value in model.state_dict().items()}
    if safe_serialization:
        with atomic_path(directory / SAFE_WEIGHTS_NAME) as temporary:
            save_file(state, str(temporary), metadata={"format": "pt"})
        (directory / WEIGHTS_NAME).unlink(missing_ok=True)
    else:
        with atomic_path(directory / WEIGHTS_NAME) as temporary:
            torch.save(state, temporary)
        (directory / SAFE_WEIGHTS_NAME).unlink(missing_ok=True)
