"""Hub resolution: names -> local paths, and the only module that touches the network. Nothing is converted
here: the files are read as they were published (`formats`).

Two kinds of names:

- Hugging Face Hub repositories (`google/bit-50`, `timm/resnetv2_50x1_bit.goog_in21k_ft_in1k`), fetched with
  `huggingface_hub` (the optional `hub` extra) into its cache; `HF_HUB_OFFLINE=1` uses the cache only.
- Google's original files (`BiT-M-R50x1`, `BiT-S-R101x3-ILSVRC2012`, `distill/R50x1_224`), downloaded from
  storage.googleapis.com/bit_models with a progress bar into `<hub cache>/bit_models/`. Each download is
  checked against its Content-Length and the MD5 Google sends, and its size and SHA-256 are recorded beside
  it; every later use re-checks them, so a truncated or corrupted cached file is detected, not loaded.

Without a network, every path fails with one sentence that says what was missing and where it was looked for.
"""

from __future__ import annotations

import base64
import dataclasses
import hashlib
import json
import logging
import os
import re
import urllib.error
import urllib.request
import zipfile
from pathlib import Path

from .errors import CheckpointError
from .files import atomic_path, read_json, write_text_atomic

logger = logging.getLogger("bigtransfer")

CONFIG_NAME = "config.json"  # a transformers repository's config (the package's other modules take the name from here)
GOOGLE_BASE_URL = "https://storage.googleapis.com/bit_models/"
GOOGLE_ARCHITECTURES = ("R50x1", "R50x3", "R101x1", "R101x3", "R152x2", "R152x4")  # what Google released
# Every file Google published with the paper and the distillation follow-up, by name -> path under the bucket.
GOOGLE_FILES: dict[str, str] = {
    f"BiT-{upstream}-{architecture}{suffix}": f"BiT-{upstream}-{architecture}{suffix}.npz"
    for upstream in ("S", "M")
    for architecture in GOOGLE_ARCHITECTURES
    for suffix in ("", "-ILSVRC2012")
}
GOOGLE_FILES.update(
    {f"distill/{name}": f"distill/{name}.npz" for name in ("R50x1_224", "R50x1_160", "R152x2_T_224", "R152x2_T_384")}
)
_CHUNK = 1 << 20
_TIMEOUT_S = 30


# ---------------------------------------------------------------------------------------------------------------
# Shared: where the cache is, and whether we may go online.


SAFE_WEIGHTS_NAME = "model.safetensors"
SAFE_WEIGHTS_INDEX_NAME = "model.safetensors.index.json"
WEIGHTS_NAME = "pytorch_model.bin"


@dataclasses.dataclass(frozen=True)
class HubOptions:
    """How names are fetched, from transformers' `from_pretrained` arguments: a Hub `revision` (branch, tag or
    commit), `cache_dir` (instead of HF_HUB_CACHE), `token`, `local_files_only` (as HF_HUB_OFFLINE=1 for this
    call), `force_download` and a `subfolder` of the repository."""

    revision: str | None = None
    cache_dir: str | os.PathLike | None = None
    token: str | bool | None = None
    local_files_only: bool = False
    force_download: bool = False
    subfolder: str | None = None
    use_safetensors: bool | None = None  # True: safetensors weights only; False: pytorch_model.bin only
    variant: str | None = None  # weight files named model.<variant>.safetensors, as transformers names them

    def cache(self) -> Path:
        return Path(self.cache_dir).expanduser() if self.cache_dir else cache_dir()

    def offline(self) -> bool:
        return self.local_files_only or offline()


DEFAULT_OPTIONS = HubOptions()


def cache_dir() -> Path:
    """The Hugging Face hub cache (HF_HUB_CACHE, else HF_HOME/hub, else ~/.cache/huggingface/hub), read now."""
    if os.environ.get("HF_HUB_CACHE"):
        return Path(os.environ["HF_HUB_CACHE"]).expanduser()
    if os.environ.get("HF_HOME"):
        return Path(os.environ["HF_HOME"]).expanduser() / "hub"
    base = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache").expanduser()
    return base / "huggingface" / "hub"


def offline() -> bool:
    """True when HF_HUB_OFFLINE (or TRANSFORMERS_OFFLINE) is set to a true value, as huggingface_hub reads it."""
    value = os.environ.get("HF_HUB_OFFLINE") or os.environ.get("TRANSFORMERS_OFFLINE") or ""
    return value.strip().upper() in ("1", "ON", "YES", "TRUE")


# ---------------------------------------------------------------------------------------------------------------
# Google's original .npz files.


def google_file(name: str) -> str | None:
    """The bucket path of a Google BiT name or URL (any case, `.npz` optional), or None if it is not one."""
    text = str(name).strip()
    for prefix in (GOOGLE_BASE_URL, "gs://bit_models/"):
        if text.startswith(prefix):
            text = text[len(prefix):]
    text = text.removesuffix(".npz").lower()
    for known, path in GOOGLE_FILES.items():
        if known.lower() == text:
            return path
    return None


def is_google_name(name: str) -> bool:
    return google_file(name) is not None


def download_google(name: str, progress: bool = True, options: HubOptions = DEFAULT_OPTIONS) -> Path:
    """Return the cached path of a Google BiT .npz, downloading it (with a progress bar) when needed.

    A cached file whose size or SHA-256 no longer matches the record written at download time is
    downloaded again (or refused when offline).

    Example:
        >>> path = download_google("BiT-M-R50x1")  # ~/.cache/huggingface/hub/bit_models/BiT-M-R50x1.npz
    """
    relative = google_file(name)
    if relative is None:
        raise ValueError(f"unknown Google BiT checkpoint {name!r}; known: {', '.join(GOOGLE_FILES)}")
    url = GOOGLE_BASE_URL + relative
    target = options.cache() / "bit_models" / relative
    record_path = target.with_name(target.name + ".json")
    if target.is_file() and record_path.is_file() and not options.force_download:
        problem = _check_against_record(target, record_path)
        if problem is None:
            return target
        if options.offline():
            raise CheckpointError(
                f"the cached {target} is corrupted ({problem}) and HF_HUB_OFFLINE is set, so it cannot be "
                "downloaded again; delete it and retry with a network connection."
            )
        logger.warning("%s is corrupted (%s); downloading it again", target, problem)
    elif options.offline():
        raise OSError(f"{name} is not in the cache ({target}) and HF_HUB_OFFLINE is set, so it cannot be downloaded.")
    _fetch(url, target, record_path, progress)
    return target


def _open_url(url: str, timeout: float = _TIMEOUT_S):
    """The HTTP transport (a file-like response with `.headers`); tests replace it with a local stream."""
    request = urllib.request.Request(url, headers={"User-Agent": "bigtransfer"})
    return urllib.request.urlopen(request, timeout=timeout)  # noqa: S310 - fixed https URL


def _fetch(url: str, target: Path, record_path: Path, progress: bool) -> None:
    try:
        response = _open_url(url)
    except urllib.error.HTTPError as error:
        raise OSError(f"cannot download {url}: the server answered {error.code} {error.reason}.") from None
    except (urllib.error.URLError, OSError) as error:
        reason = getattr(error, "reason", error)
        raise ConnectionError(f"cannot download {url}: no network connection ({reason}).") from None
    target.parent.mkdir(parents=True, exist_ok=True)
    with response:
        headers = response.headers
        expected_size = int(headers.get("Content-Length") or 0) or None
        expected_md5 = _google_md5(headers.get("x-goog-hash", ""))
        sha256, md5, size = hashlib.sha256(), hashlib.md5(), 0
        bar = _progress_bar(expected_size, target.name) if progress else None
        try:
            with atomic_path(target) as temporary:
                with open(temporary, "wb") as handle:
                    while chunk := response.read(_CHUNK):
                        handle.write(chunk)
                        sha256.update(chunk)
                        md5.update(chunk)
                        size += len(chunk)
                        if bar is not None:
                            bar.update(len(chunk))
                if expected_size is not None and size != expected_size:
                    raise CheckpointError(f"download of {url} stopped after {size} of {expected_size} bytes; retry.")
                if expected_md5 is not None and md5.digest() != expected_md5:
                    raise CheckpointError(f"download of {url} is corrupted (its MD5 differs from the server's); retry.")
                if not zipfile.is_zipfile(temporary):
                    raise CheckpointError(f"{url} did not return a .npz archive.")
        finally:
            if bar is not None:
                bar.close()
    record = {"url": url, "size": size, "sha256": sha256.hexdigest()}
    write_text_atomic(record_path, json.dumps(record, indent=2) + "\n")


def _google_md5(header: str) -> bytes | None:
    """The MD5 in Google Cloud Storage's `x-goog-hash: crc32c=...,md5=<base64>` header, if present."""
    match = re.search(r"md5=([A-Za-z0-9+/=]+)", header)
    return base64.b64decode(match[1]) if match else None


def _check_against_record(path: Path, record_path: Path) -> str | None:
    """None when the file still has the recorded size and SHA-256, else what differs."""
    try:
        record = read_json(record_path)
    except (OSError, ValueError):
        return "its download record is unreadable"
    size = path.stat().st_size
    if size != record.get("size"):
        return f"{size} bytes instead of {record.get('size')}"
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        while chunk := handle.read(_CHUNK):
            digest.update(chunk)
    if digest.hexdigest() != record.get("sha256"):
        return "its SHA-256 differs from the one recorded at download"
    return None


def _progress_bar(total: int | None, description: str):
    try:
        from tqdm import tqdm
    except ImportError:  # tqdm comes with the hub extra; without it, download silently
        return None
    return tqdm(total=total, unit="B", unit_scale=True, unit_divisor=1024, desc=description)


# ---------------------------------------------------------------------------------------------------------------
# Hugging Face Hub repositories.

_REPO_ID = re.compile(r"[A-Za-z0-9][\w.-]*/[\w.-]+")


def is_hub_name(name: str) -> bool:
    """Whether `name` looks like a Hub repository id (`owner/name`)."""
    return bool(_REPO_ID.fullmatch(str(name))) and not str(name).startswith((".", "/"))


def local_source(source: str | os.PathLike, options: HubOptions = DEFAULT_OPTIONS) -> Path | None:
    """The existing local file or directory `source` names (a directory's `options.subfolder`), else None: the
    first rule of every source resolution (models, configs, processors)."""
    text = os.fspath(source)
    if not str(text).strip():
        raise ValueError("the model name or path is empty")
    path = Path(text).expanduser()
    if not path.exists():
        return None
    return path / options.subfolder if options.subfolder and path.is_dir() else path


def locate(source: str | os.PathLike, filename: str, options: HubOptions = DEFAULT_OPTIONS) -> Path:
    """Where `filename` (config.json, preprocessor_config.json) of `source` is: the file itself when `source` is a
    file, `filename` in a directory (its `options.subfolder`), or a Hub repository's, downloaded into the cache.

    The resolution `BitConfig.from_pretrained` and `BitImageProcessor.from_pretrained` share with model loading
    (`checkpoints.loader.resolve`, which adds weights and Google's names). OSError when there is no such file.
    """
    local = local_source(source, options)
    if local is not None:
        path = local / filename if local.is_dir() else local
        if not path.is_file():
            raise OSError(f"no {filename} found at {local} (expected a directory holding {filename})")
        return path
    text = os.fspath(source)
    if is_hub_name(text) and not os.path.isabs(text):
        return download_file(text, filename, options)
    raise OSError(f"{text!r} is neither a file, a directory holding {filename} nor a Hugging Face Hub name such as "
                  "google/bit-50")


def hub_options(arguments: dict) -> HubOptions:
    """HubOptions from transformers' loading keywords, removed from `arguments` (the rest are the caller's own)."""
    names = {"revision", "cache_dir", "token", "local_files_only", "force_download", "subfolder", "use_safetensors",
             "variant"}
    return HubOptions(**{name: arguments.pop(name) for name in names if name in arguments})


def download(repo_id: str, options: HubOptions = DEFAULT_OPTIONS) -> Path:
    """The cached snapshot directory of a transformers or timm repository: config.json plus its weights.

    Only the files a BiT model needs are fetched (model.safetensors, else pytorch_model.bin, and the
    preprocessor config); with HF_HUB_OFFLINE set, only the cache is used.
    """
    try:
        config = _fetch_from_hub(repo_id, CONFIG_NAME, options)
    except _Unreachable:
        raise _unreachable_error(repo_id, options) from None
    if config is None:
        raise CheckpointError(f"{repo_id} has no {CONFIG_NAME}, so it is neither a transformers nor a timm model repository.")
    unreachable = False
    safe, index, pickled = weight_names(options.variant)
    names = {None: (safe, index, pickled), True: (safe, index), False: (pickled,)}
    for filename in names[options.use_safetensors]:
        try:
            weights = _fetch_from_hub(repo_id, filename, options)
        except _Unreachable:
            unreachable = True
            continue
        if weights is None:
            continue
        if weights.name.endswith(".index.json"):
            for shard in shard_names(weights):
                try:
                    if _fetch_from_hub(repo_id, shard, options) is None:
                        raise CheckpointError(f"{repo_id} lists the shard {shard} but does not have it.")
                except _Unreachable:
                    raise _unreachable_error(repo_id, options) from None
        break
    else:
        if unreachable:
            raise _unreachable_error(repo_id, options)
        shown = {None: f"{safe} or {pickled}", True: safe, False: pickled}
        raise CheckpointError(f"{repo_id} has no {shown[options.use_safetensors]}.")
    try:
        _fetch_from_hub(repo_id, "preprocessor_config.json", options)
    except _Unreachable:
        pass  # optional: a default preprocessor config is used without it
    return config.parent


def push_folder(repo_id: str, write, *, commit_message: str | None = None, private: bool | None = None,
                token: str | bool | None = None, revision: str | None = None, create_pr: bool = False,
                model_card: str | None = None):
    """Write files with `write(directory)` into a temporary directory and upload them to the Hub repository
    `repo_id` (created when missing), as transformers' `push_to_hub` does; `model_card` becomes README.md unless
    the repository has one. Returns huggingface_hub's CommitInfo."""
    import tempfile

    hub, _ = _import_hub()
    api = hub.HfApi(token=token) if token not in (None, True) else hub.HfApi()
    api.create_repo(repo_id, private=private, exist_ok=True)
    with tempfile.TemporaryDirectory() as directory:
        write(Path(directory))
        if model_card is not None and not api.file_exists(repo_id, "README.md", revision=revision):
            (Path(directory) / "README.md").write_text(model_card, encoding="utf-8")
        return api.upload_folder(repo_id=repo_id, folder_path=directory, commit_message=commit_message or "Upload with bigtransfer",
                                 revision=revision, create_pr=create_pr)


def model_card(repo_id: str, pipeline_tag: str) -> str:
    """A model card with the metadata transformers writes (library_name, tags) and the task."""
    return (
        f"---\nlibrary_name: transformers\npipeline_tag: {pipeline_tag}\ntags:\n- transformers\n- bit\n"
        f"- bigtransfer\n---\n\n# {repo_id}\n\nA BiT (Big Transfer: ResNet-v2 with GroupNorm and Weight "
        "Standardization) model in transformers' layout: it loads with `transformers.AutoModel.from_pretrained"
        f"(\"{repo_id}\")` (width 1) and with `bigtransfer.BitForImageClassification.from_pretrained(\"{repo_id}\")`.\n"
    )


def weight_names(variant: str | None = None) -> tuple[str, str, str]:
    """(model.safetensors, its shard index, pytorch_model.bin), named for `variant` as transformers names them
    (model.fp16.safetensors, model.safetensors.index.fp16.json, pytorch_model.fp16.bin)."""
    if variant is None:
        return SAFE_WEIGHTS_NAME, SAFE_WEIGHTS_INDEX_NAME, WEIGHTS_NAME
    if not isinstance(variant, str) or not variant or "/" in variant or "\\" in variant:
        raise ValueError(f"variant must be a non-empty name without path separators, got {variant!r}")
    return tuple(f"{stem}.{variant}.{suffix}" for stem, suffix in
                 (name.rsplit(".", 1) for name in (SAFE_WEIGHTS_NAME, SAFE_WEIGHTS_INDEX_NAME, WEIGHTS_NAME)))


def shard_names(index_path: Path) -> list[str]:
    """The shard files a model.safetensors.index.json lists (CheckpointError when its weight_map is not a map of
    tensor names to file names in the same directory)."""
    weight_map = read_json(index_path).get("weight_map")
    if not isinstance(weight_map, dict) or not all(isinstance(shard, str) for shard in weight_map.values()):
        raise CheckpointError(f"{index_path}: weight_map must map tensor names to shard file names")
    outside = [shard for shard in weight_map.values() if Path(shard).name != shard or shard in ("", ".", "..")]
    if outside:
        raise CheckpointError(f"{index_path} names a shard outside the directory: {outside[0]}")
    return sorted(set(weight_map.values()))


def download_file(repo_id: str, filename: str, options: HubOptions = DEFAULT_OPTIONS) -> Path:
    """The cached path of one file of a Hub repository (OSError when it has none or it cannot be reached)."""
    try:
        path = _fetch_from_hub(repo_id, filename, options)
    except _Unreachable:
        raise _unreachable_error(repo_id, options) from None
    if path is None:
        raise OSError(f"{repo_id} has no {filename} on the Hugging Face Hub.")
    return path


def _fetch_from_hub(repo_id: str, filename: str, options: HubOptions) -> Path | None:
    """huggingface_hub's download of one file (the cache only when offline); None when the repository lacks it."""
    hub, errors = _import_hub()
    revision = options.revision
    try:
        return Path(hub.hf_hub_download(
            repo_id, filename, revision=revision, cache_dir=options.cache(), local_files_only=options.offline(),
            **{key: value for key, value in (("token", options.token), ("force_download", options.force_download),
                                             ("subfolder", options.subfolder)) if value},
        ))
    except errors.LocalEntryNotFoundError:
        raise _Unreachable from None
    except errors.EntryNotFoundError:  # the repository has no such file
        return None
    except errors.RepositoryNotFoundError:
        raise OSError(
            f"{repo_id} is not a model repository on the Hugging Face Hub (or it is private or gated; log in "
            "with `hf auth login`)."
        ) from None
    except errors.RevisionNotFoundError:
        raise OSError(f"{repo_id} has no revision {revision!r} on the Hugging Face Hub.") from None


class _Unreachable(Exception):
    """A file that is neither cached nor downloadable right now (offline, or no network)."""


def _unreachable_error(repo_id: str, options: HubOptions) -> OSError:
    if options.offline():
        return OSError(
            f"{repo_id} is not in the Hugging Face cache ({options.cache()}) and HF_HUB_OFFLINE is set, so it cannot "
            "be downloaded."
        )
    return ConnectionError(
        f"cannot download {repo_id}: the Hugging Face Hub cannot be reached (no network connection?) and no copy "
        f"is cached in {options.cache()}."
    )


def _import_hub():
    try:
        import huggingface_hub
        from huggingface_hub import utils as hub_errors
    except ImportError:
        raise ImportError(
            "loading models by Hub name needs huggingface_hub: pip install 'bigtransfer[hub]'."
        ) from None
    return huggingface_hub, hub_errors
