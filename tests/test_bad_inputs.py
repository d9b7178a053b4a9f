"""Bad inputs at every entry point: one table of (input, expected outcome).

Each row builds its input in a fresh temporary directory and makes one call: a library function or the
CLI. The expected outcome is either an exception type and a pattern its message must match (the pattern
names the offending file, key, shape or argument, so "the message says what is wrong" is checked too), or
success with a check of the result: 16-bit, CMYK, palette and animated images are valid images and must
be processed correctly, not rejected. Image files go through both `BitImageProcessor` and the data
loaders' `load_image`. CLI rows assert a non-zero exit status and a single `bigtransfer CMD: error: ...`
line on stderr with no traceback.

`{tmp}` in a pattern stands for the row's temporary directory.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import io
import json
import os
import re
import struct
import time
import zlib
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import load_file, save_file

from bigtransfer import (
    BitConfig,
    BitForImageClassification,
    BitModel,
    CheckpointError,
    UnsafeCheckpointError,
    load_checkpoint,
)
from bigtransfer.checkpoints import read_labels, read_npz, read_safetensors, read_torch_pickle
from bigtransfer.cli import main
from bigtransfer.data import (
    ArraySource,
    BadImageError,
    CsvSource,
    ImageFolderSource,
    few_shot_indices,
    load_cifar,
    load_image,
    open_source,
)
from bigtransfer.errors import UnsafePickleError
from bigtransfer.processing import BitImageProcessor
from bigtransfer.report import read_metrics
from conftest import CHILD_PEAK_MB

pytestmark = pytest.mark.filterwarnings("ignore::PIL.Image.DecompressionBombWarning")

TINY = dict(embedding_size=8, hidden_sizes=[8, 16, 32, 64], depths=[1, 1, 1, 1], num_groups=1, num_labels=3)
SIZE = 32  # the processor's resize and crop in these rows
TRAIN = ["--batch-size", "4", "--resize", "20", "--crop", "16", "--no-progress", "--no-plots", "--device", "cpu"]


@dataclasses.dataclass(frozen=True)
class Case:
    """`call(tmp)` must raise `error` with a message matching `match`, or (error None) return a value `check` accepts."""

    id: str
    call: Callable[[Path], Any]
    error: type[BaseException] | None = None
    match: str = ""
    check: Callable[[Any, Path], None] | None = None


# ------------------------------------------------------------------------------------------------ image files


def _noise(height: int, width: int, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (height, width, 3), dtype=np.uint8)


def _saved(name: str, image: Image.Image, **options) -> Callable[[Path], Path]:
    def build(tmp: Path) -> Path:
        image.save(tmp / name, **options)
        return tmp / name

    return build


def _written(name: str, data: bytes | Callable[[], bytes]) -> Callable[[Path], Path]:
    def build(tmp: Path) -> Path:
        (tmp / name).write_bytes(data() if callable(data) else data)
        return tmp / name

    return build


@functools.cache
def _jpeg_bytes() -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(_noise(64, 64)).save(buffer, "JPEG", quality=90)
    return buffer.getvalue()


def _png_chunk(kind: bytes, body: bytes) -> bytes:
    return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body))


@functools.cache
def _bomb(width: int, height: int) -> bytes:
    """A valid 8-bit gray PNG of width x height zeros: a few hundred kB that decode to width * height bytes."""
    compressor, row = zlib.compressobj(9), b"\0" * (width + 1)  # filter byte + pixels
    rows_per_chunk = max(1, (1 << 24) // len(row))
    chunk = compressor.compress(row * rows_per_chunk)
    body = [chunk] * (height // rows_per_chunk) + [compressor.compress(row * (height % rows_per_chunk))]
    header = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)
    return b"".join([
        b"\x89PNG\r\n\x1a\n", _png_chunk(b"IHDR", header),
        _png_chunk(b"IDAT", b"".join(body) + compressor.flush()), _png_chunk(b"IEND", b""),
    ])


def _palette_with_transparency() -> Image.Image:
    image = Image.new("P", (20, 10), 1)
    image.putpalette([0, 0, 0, 200, 30, 30] + [0, 0, 0] * 254)
    image.paste(0, (0, 0, 10, 10))  # left half: index 0, declared transparent
    return image


def _animated_gif(tmp: Path) -> Path:
    frames = [Image.new("RGB", (30, 20), color) for color in ((255, 0, 0), (0, 0, 255))]
    frames[0].save(tmp / "animated.gif", save_all=True, append_images=frames[1:], duration=50, loop=0)
    return tmp / "animated.gif"


def _directory_named_jpg(tmp: Path) -> Path:
    (tmp / "folder.jpg").mkdir()
    return tmp / "folder.jpg"


_GRADIENT_16 = (np.arange(40 * 50, dtype=np.uint32).reshape(40, 50) * 32).astype(np.uint16)  # 0..63968

# name -> (build the file, processor outcome, loader outcome); an outcome is (error, pattern) or a check.
IMAGE_FILES: dict[str, tuple[Callable[[Path], Path], Any, Any]] = {}


def _image(name, build, processor, loader=None):
    IMAGE_FILES[name] = (build, processor, processor if loader is None else loader)


def _processed(result, tmp):
    pixels = result["pixel_values"]
    assert pixels.shape == (1, 3, SIZE, SIZE) and pixels.dtype == torch.float32
    assert torch.isfinite(pixels).all()


def _loaded(size):
    def check(image, tmp):
        assert isinstance(image, Image.Image) and image.mode == "RGB" and image.size == size
        assert np.asarray(image).dtype == np.uint8

    return check


def _and(*checks):
    def check(result, tmp):
        for each in checks:
            each(result, tmp)

    return check


def _sixteen_bit_scaled(result, tmp):  # 63968 / 257 = 248.9: scaled to 8 bits, not clipped to white
    array = np.asarray(result) if isinstance(result, Image.Image) else None
    if array is not None:
        assert array.max() == 249 and array.min() == 0 and (array == 255).mean() < 0.01
    else:
        pixels = result["pixel_values"]
        assert pixels.std() > 0.3 and pixels.max() < (1 - 0.4082) / 0.2758 - 0.01  # below white


def _transparent_is_white(result, tmp):
    array = np.asarray(result)
    assert (array[:, :10] == 255).all() and (array[:, 10:] == (200, 30, 30)).all()


def _first_frame(result, tmp):
    assert (np.asarray(result) == (255, 0, 0)).all()


_image("zero-byte file", _written("empty.jpg", b""), (BadImageError, r"{tmp}/empty\.jpg: not an image"))
_image("truncated JPEG", _written("half.jpg", lambda: _jpeg_bytes()[: len(_jpeg_bytes()) // 2]),
       (BadImageError, r"{tmp}/half\.jpg: .*truncated"))
_image("text file named .jpg", _written("notes.jpg", b"shopping list: eggs, milk\n"),
       (BadImageError, r"{tmp}/notes\.jpg: not an image"))
_image("JPEG with a corrupt body", _written("garbled.jpg", lambda: _jpeg_bytes()[:600] + b"\xff\xd9" * 50),
       (BadImageError, r"{tmp}/garbled\.jpg: "))
_image("missing file", lambda tmp: tmp / "nowhere.png", (FileNotFoundError, r"{tmp}/nowhere\.png"),
       (BadImageError, r"{tmp}/nowhere\.png: FileNotFoundError"))
_image("directory named .jpg", _directory_named_jpg, (IsADirectoryError, r"{tmp}/folder\.jpg"),
       (BadImageError, r"{tmp}/folder\.jpg"))
_image("1x1 pixels", _saved("dot.png", Image.new("RGB", (1, 1), (10, 200, 30))), _processed, _loaded((1, 1)))
_image("1x20000 pixels", _saved("thread.png", Image.fromarray(_noise(20000, 1))), _processed, _loaded((1, 20000)))
_image("20000x1 pixels", _saved("line.png", Image.fromarray(_noise(1, 20000))), _processed, _loaded((20000, 1)))
_image("16-bit grayscale PNG", _saved("deep.png", Image.fromarray(_GRADIENT_16)),
       _and(_processed, _sixteen_bit_scaled), _and(_loaded((50, 40)), _sixteen_bit_scaled))
_image("CMYK JPEG", _saved("print.jpg", Image.fromarray(_noise(24, 36)).convert("CMYK")),
       _processed, _loaded((36, 24)))
_image("palette with transparency", _saved("sprite.png", _palette_with_transparency(), transparency=0),
       _processed, _and(_loaded((20, 10)), _transparent_is_white))
_image("animated GIF", _animated_gif, _processed, _and(_loaded((30, 20)), _first_frame))
_image("over 2x the decompression-bomb limit", _written("bomb.png", lambda: _bomb(20000, 10000)),
       (BadImageError, r"{tmp}/bomb\.png: more pixels than PIL\.Image\.MAX_IMAGE_PIXELS"))
_image("over the decompression-bomb limit (Pillow only warns)", _written("bomb1x.png", lambda: _bomb(10000, 9000)),
       (BadImageError, r"{tmp}/bomb1x\.png: more pixels than PIL\.Image\.MAX_IMAGE_PIXELS"))


def _process_file(build):
    return lambda tmp: BitImageProcessor(size=SIZE, crop_size=SIZE)(build(tmp), return_tensors="pt")


def _load_file(build):
    return lambda tmp: load_image(build(tmp))


def _image_cases() -> list[Case]:
    cases = []
    for name, (build, processor, loader) in IMAGE_FILES.items():
        for via, call, outcome in (("processor", _process_file(build), processor), ("load_image", _load_file(build), loader)):
            if isinstance(outcome, tuple):
                cases.append(Case(f"image: {name} -> {via}", call, *outcome))
            else:
                cases.append(Case(f"image: {name} -> {via}", call, check=outcome))
    return cases


# ------------------------------------------------------------------------------------------------ tensors


@functools.cache
def _model() -> BitForImageClassification:
    torch.manual_seed(0)
    return BitForImageClassification(BitConfig(**TINY)).eval()


def _forward(pixel_values):
    def call(tmp):
        with torch.no_grad():
            return _model()(pixel_values)

    return call


def _with(value, index, fill):
    value = value.clone()
    value.view(-1)[index] = fill
    return value


_GOOD = torch.zeros(2, 3, 32, 32)


def _process(images, **options):
    return lambda tmp: BitImageProcessor(size=SIZE, crop_size=SIZE)(images, return_tensors="pt", **options)


TENSOR_CASES = [
    Case("tensor: rank 3 into the model", _forward(torch.zeros(3, 32, 32)), ValueError, r"4-D .* got shape \(3, 32, 32\)"),
    Case("tensor: rank 5 into the model", _forward(torch.zeros(1, 2, 3, 32, 32)), ValueError, r"4-D .*\(1, 2, 3, 32, 32\)"),
    Case("tensor: 4 channels into the model", _forward(torch.zeros(2, 4, 32, 32)), ValueError,
         r"4 channels .*expects 3"),
    Case("tensor: integer dtype into the model", _forward(torch.zeros(2, 3, 32, 32, dtype=torch.uint8)), TypeError,
         r"floating-point .*torch\.uint8"),
    Case("tensor: NaN into the model", _forward(_with(_GOOD, 5, float("nan"))), ValueError, "NaN"),
    Case("tensor: Inf into the model", _forward(_with(_GOOD, 7, float("inf"))), ValueError, "infinite"),
    Case("tensor: empty batch into the model", _forward(torch.zeros(0, 3, 32, 32)), ValueError,
         r"empty: shape \(0, 3, 32, 32\)"),
    Case("tensor: a numpy array into the model", _forward(np.zeros((2, 3, 32, 32), np.float32)), TypeError,
         "must be a torch.Tensor, got ndarray"),
    Case("tensor: rank 5 into the processor", _process(np.zeros((1, 2, 8, 8, 3), np.uint8)), ValueError,
         r"dimensions, got shape \(1, 2, 8, 8, 3\)"),
    Case("tensor: 2 channels into the processor", _process(np.zeros((8, 9, 2), np.uint8)), ValueError,
         r"channel axis of an image of shape \(8, 9, 2\)"),
    Case("tensor: 5 channels declared channels_last", _process(np.zeros((8, 9, 5), np.uint8),
                                                                input_data_format="channels_last"),
         ValueError, "has 5 channels"),
    Case("tensor: bool dtype into the processor", _process(np.zeros((8, 8, 3), bool)), TypeError, "dtype bool"),
    Case("tensor: complex dtype into the processor", _process(torch.zeros(3, 8, 8, dtype=torch.complex64)), TypeError,
         "complex64"),
    Case("tensor: NaN into the processor", _process(_with(torch.full((3, 8, 8), 100.0), 3, float("nan"))), ValueError,
         "NaN or Inf"),
    Case("tensor: Inf into the processor", _process(np.full((8, 8, 3), np.inf, np.float32)), ValueError, "NaN or Inf"),
    Case("tensor: empty batch into the processor", _process(np.zeros((0, 3, 8, 8), np.uint8)), ValueError,
         r"empty batch of shape \(0, 3, 8, 8\)"),
    Case("tensor: empty list into the processor", _process([]), ValueError, "empty list"),
    Case("tensor: zero-height image into the processor", _process(np.zeros((0, 8, 3), np.uint8)), ValueError,
         r"empty: shape \(0, 8, 3\)"),
    Case("tensor: int32 values above 255 into the processor", _process(np.full((8, 8, 3), 300, np.int32)), ValueError,
         r"0\.\.255 .*\[300, 300\]"),
    Case("tensor: uint16 image is 16-bit, not rejected", _process(np.full((8, 8, 3), 65535, np.uint16)),
         check=lambda result, tmp: torch.testing.assert_close(
             result["pixel_values"], BitImageProcessor(size=SIZE, crop_size=SIZE)(
                 np.full((8, 8, 3), 255, np.uint8), return_tensors="pt")["pixel_values"])),
]


# ------------------------------------------------------------------------------------------------ configs


def _config_dir(text: str):
    def call(tmp):
        (tmp / "config.json").write_text(text)
        return BitConfig.from_pretrained(tmp)

    return call


def _model_dir_with_config(text: str):
    def call(tmp):
        BitModel(BitConfig(**TINY)).save_pretrained(tmp)
        (tmp / "config.json").write_text(text)
        return BitModel.from_pretrained(tmp)

    return call


CONFIG_CASES = [
    Case("config: unknown layer type", lambda tmp: BitConfig(layer_type="transformer"), ValueError,
         "layer_type=transformer is not one of preactivation,bottleneck"),
    Case("config: negative depth", lambda tmp: BitConfig(depths=[3, -1, 6, 3]), ValueError,
         "depths must be a positive integer, got -1"),
    Case("config: out_features out of order", lambda tmp: BitConfig(out_features=["stage3", "stage1"]), ValueError,
         r"same order as stage_names, expected \['stage1', 'stage3'\]"),
    Case("config: out_indices out of range", lambda tmp: BitConfig(out_indices=[7]), ValueError,
         r"valid indices .* got \[7\]"),
    Case("config: num_groups does not divide a width", lambda tmp: BitConfig(num_groups=7), ValueError,
         "num_groups=7 does not divide"),
    Case("config: config.json that is not JSON", _config_dir("{'depths': [3, 4, 6, 3],}"), ValueError,
         r"{tmp}/config\.json is not valid JSON"),
    Case("config: config.json holding a list", _config_dir("[1, 2, 3]"), ValueError,
         r"{tmp}/config\.json must hold a JSON object, got list"),
    Case("config: config.json of another model type", _config_dir('{"model_type": "vit"}'), ValueError,
         "model_type='vit', expected 'bit'"),
    Case("config: model directory whose config.json is not JSON", _model_dir_with_config("not json"), ValueError,
         r"{tmp}/config\.json is not valid JSON"),
    Case("config: no config.json", lambda tmp: BitConfig.from_pretrained(tmp), OSError, r"no config\.json found at {tmp}"),
    Case("config: unknown variant", lambda tmp: BitConfig.from_variant("BiT-X-R50x9"), ValueError,
         "unknown BiT variant 'BiT-X-R50x9'"),
]


# ------------------------------------------------------------------------------------------------ checkpoints


def _saved_model(tmp: Path, **overrides) -> Path:
    torch.manual_seed(0)
    BitForImageClassification(BitConfig(**{**TINY, **overrides})).save_pretrained(tmp / "model")
    return tmp / "model"


def _truncated_safetensors_file(tmp):
    weights = _saved_model(tmp) / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[: weights.stat().st_size * 2 // 3])
    return read_safetensors(weights)


def _truncated_safetensors_directory(tmp):
    weights = _saved_model(tmp) / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:100])
    return BitForImageClassification.from_pretrained(tmp / "model")


def _edit_weights(edit):
    def call(tmp):
        directory = _saved_model(tmp)
        state = read_safetensors(directory / "model.safetensors")
        edit(state)
        save_file(state, str(directory / "model.safetensors"))
        return BitForImageClassification.from_pretrained(directory)

    return call


def _wrong_shape(state):
    state["bit.encoder.stages.1.layers.0.conv2.weight"] = torch.zeros(4, 4, 3, 3)


def _missing_key(state):
    del state["bit.encoder.stages.2.layers.0.conv1.weight"]


def _extra_key(state):
    state["bit.encoder.stages.9.layers.0.conv1.weight"] = torch.zeros(1)


def _other_family_npz(tmp):
    np.savez(tmp / "vit.npz", **{
        "Transformer/encoderblock_0/MlpBlock_3/Dense_0/kernel": np.zeros((8, 32), np.float32),
        "embedding/kernel": np.zeros((16, 16, 3, 8), np.float32),
    })
    return load_checkpoint(tmp / "vit.npz")


def _resnet_v1_state(tmp):  # a torchvision-style ResNet-50 (v1: BatchNorm, no weight standardization)
    state = {"conv1.weight": torch.zeros(64, 3, 7, 7), "bn1.weight": torch.ones(64), "bn1.running_mean": torch.zeros(64),
             "layer1.0.conv1.weight": torch.zeros(64, 64, 1, 1), "fc.weight": torch.zeros(1000, 2048)}
    save_file(state, str(tmp / "resnet50.safetensors"))
    return load_checkpoint(tmp / "resnet50.safetensors")


def _no_weights(tmp):
    BitConfig(**TINY).save_pretrained(tmp / "model")
    return BitForImageClassification.from_pretrained(tmp / "model")


class _RunsCode:
    """Pickles as a call to exec(): whoever unpickles it runs the code, which creates the file `marker`."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return exec, (f"open({str(self.marker)!r}, 'w').write('executed')",)


def _payload_pickle(tmp, name="pytorch_model.bin"):
    payload = {"bit.embedder.convolution.weight": torch.zeros(1), "evil": _RunsCode(tmp / "PWNED")}
    torch.save(payload, tmp / name)
    return tmp / name


def _payload_not_run(call):
    def guarded(tmp):
        try:
            return call(tmp)
        finally:
            assert not (tmp / "PWNED").exists(), "the pickle's payload ran"

    return guarded


def _model_dir_with_payload(tmp):
    BitConfig(**TINY).save_pretrained(tmp / "model")
    _payload_pickle(tmp / "model")
    return BitForImageClassification.from_pretrained(tmp / "model")


def _payload_in_model_dir(tmp):
    try:
        return _model_dir_with_payload(tmp)
    finally:
        assert not (tmp / "model" / "PWNED").exists(), "the pickle's payload ran"


def _object_npz(tmp):
    np.savez(tmp / "objects.npz", weights=np.array([_RunsCode(tmp / "PWNED")], dtype=object))
    return read_npz(tmp / "objects.npz")


def _cifar_with_payload(tmp):
    import pickle

    root = tmp / "cifar-10-batches-py"
    root.mkdir()
    (root / "batches.meta").write_bytes(pickle.dumps({b"label_names": [b"a"] * 10}, protocol=2))
    (root / "data_batch_1").write_bytes(pickle.dumps({b"data": _RunsCode(tmp / "PWNED"), b"labels": []}, protocol=2))
    return load_cifar(tmp)


def _tampered_download(tmp):
    """A cached Google checkpoint whose bytes no longer match the size and SHA-256 recorded at download."""
    from bigtransfer import hub

    cached = tmp / "bit_models" / "BiT-M-R50x1.npz"
    cached.parent.mkdir()
    np.savez(cached, weights=np.zeros(4, np.float32))
    record = {"url": hub.GOOGLE_BASE_URL + "BiT-M-R50x1.npz", "size": cached.stat().st_size, "sha256": "0" * 64}
    cached.with_name(cached.name + ".json").write_text(json.dumps(record))
    download = _with_environment({"HF_HUB_CACHE": str(tmp), "HF_HUB_OFFLINE": "1"},
                                 lambda _: hub.download_google("BiT-M-R50x1", progress=False))
    return download(tmp)


def _head_mismatch(tmp):
    directory = _saved_model(tmp)
    return BitForImageClassification.from_pretrained(directory, num_labels=5)


CHECKPOINT_CASES = [
    Case("checkpoint: truncated safetensors file", _truncated_safetensors_file, CheckpointError,
         r"{tmp}/model/model\.safetensors is not a readable safetensors file"),
    Case("checkpoint: truncated safetensors in a model directory", _truncated_safetensors_directory, CheckpointError,
         r"{tmp}/model/model\.safetensors is not a readable safetensors file"),
    Case("checkpoint: empty weights file", lambda tmp: read_safetensors(_written("w.safetensors", b"")(tmp)),
         CheckpointError, r"{tmp}/w\.safetensors is empty"),
    Case("checkpoint: weights file that does not exist", lambda tmp: read_safetensors(tmp / "none.safetensors"),
         OSError, r"no such weights file: {tmp}/none\.safetensors"),
    Case("checkpoint: wrong shape", _edit_weights(_wrong_shape), CheckpointError,
         r"{tmp}/model: bit\.encoder\.stages\.1\.layers\.0\.conv2\.weight has shape \(4, 4, 3, 3\) in the checkpoint "
         r"but \(8, 8, 3, 3\) in the model"),
    Case("checkpoint: missing key", _edit_weights(_missing_key), CheckpointError,
         r"{tmp}/model does not fit BitForImageClassification: missing keys "
         r"\['bit\.encoder\.stages\.2\.layers\.0\.conv1\.weight'\]"),
    Case("checkpoint: unexpected key", _edit_weights(_extra_key), CheckpointError,
         r"unexpected keys \['bit\.encoder\.stages\.9\.layers\.0\.conv1\.weight'\]"),
    Case("checkpoint: head of another size", _head_mismatch, CheckpointError,
         r"classifier\.1\.weight has shape \(3, 64\) in the checkpoint but \(5, 64\) .*ignore_mismatched_sizes=True"),
    Case("checkpoint: npz from another model family (ViT)", _other_family_npz, CheckpointError,
         r"match no known BiT naming .*Transformer/encoderblock_0"),
    Case("checkpoint: state dict of another family (ResNet v1)", _resnet_v1_state, CheckpointError,
         r"match no known BiT naming .*bn1\.running_mean"),
    Case("checkpoint: directory with no weights", _no_weights, CheckpointError,
         r"no weights in {tmp}/model: expected model\.safetensors"),
    Case("checkpoint: pickle that would run code", _payload_not_run(lambda tmp: read_torch_pickle(_payload_pickle(tmp))),
         UnsafeCheckpointError, r"refused to load {tmp}/pytorch_model\.bin: .*nothing from it was executed"),
    Case("checkpoint: model directory with a pickle that would run code", _payload_in_model_dir, UnsafeCheckpointError,
         r"refused to load {tmp}/model/pytorch_model\.bin"),
    Case("checkpoint: npz holding pickled objects", _payload_not_run(_object_npz), UnsafeCheckpointError,
         r"refused to load {tmp}/objects\.npz: it holds pickled object arrays"),
    Case("checkpoint: cached download whose hash no longer matches", _tampered_download, CheckpointError,
         r"the cached {tmp}/bit_models/BiT-M-R50x1\.npz is corrupted \(its SHA-256 differs"),
    Case("dataset: CIFAR batch that would run code", _payload_not_run(_cifar_with_payload), UnsafePickleError,
         r"{tmp}/cifar-10-batches-py/data_batch_1: refusing to load global (builtins|__builtin__)\.exec"),
]


# ------------------------------------------------------------------------------------------------ data sets


def _folder(tmp: Path, layout: dict[str, int]) -> Path:
    root = tmp / "images"
    for index, (name, count) in enumerate(layout.items()):
        (root / name).mkdir(parents=True)
        for number in range(count):
            Image.fromarray(_noise(12, 12, seed=index * 100 + number)).save(root / name / f"{number}.png")
    return root


def _empty_folder(tmp):
    (tmp / "images").mkdir()
    return ImageFolderSource(tmp / "images")


def _class_without_images(tmp):
    root = _folder(tmp, {"cat": 3, "dog": 0})
    (root / "dog" / "readme.txt").write_text("no images here")
    return ImageFolderSource(root)


def _csv(tmp, text):
    (tmp / "labels.csv").write_text(text)
    return tmp / "labels.csv"


def _csv_missing_file(tmp):
    _folder(tmp, {"cat": 2})
    return CsvSource(_csv(tmp, "path,label\nimages/cat/0.png,cat\nimages/cat/7.png,cat\n"))


def _csv_three_columns(tmp):
    _folder(tmp, {"cat": 2})
    return CsvSource(_csv(tmp, "images/cat/0.png,cat\nimages/cat/1.png,cat,extra\n"))


def _labels_beyond_head(tmp):
    logits = torch.zeros(4, 3)
    return _model().loss(logits, torch.tensor([0, 1, 2, 3]))


DATA_CASES = [
    Case("dataset: empty folder", _empty_folder, ValueError, r"image folder {tmp}/images has no class sub-folders"),
    Case("dataset: a class folder with no images", _class_without_images, ValueError,
         r"class folder {tmp}/images/dog contains no images"),
    Case("dataset: CSV row pointing at a missing file", _csv_missing_file, ValueError,
         r"{tmp}/labels\.csv row 3: image file not found: {tmp}/images/cat/7\.png"),
    Case("dataset: CSV row with three columns", _csv_three_columns, ValueError,
         r"{tmp}/labels\.csv row 2: expected 'path,label'"),
    Case("dataset: CSV with no rows", lambda tmp: CsvSource(_csv(tmp, "path,label\n")), ValueError,
         r"{tmp}/labels\.csv lists no images"),
    Case("dataset: data spec that does not exist", lambda tmp: open_source(tmp / "nowhere"), ValueError,
         r"data spec '{tmp}/nowhere' does not exist; accepted: "),
    Case("dataset: labels outside the head's range (loss)", _labels_beyond_head, ValueError,
         r"labels must be in \[0, 2\] \(num_labels=3\), got values from 0 to 3"),
    Case("dataset: labels outside the class list", lambda tmp: ArraySource(np.zeros((2, 4, 4), np.uint8), [0, 3], ["a", "b"], "arrays"),
         ValueError, r"arrays: labels must lie in \[0, 2\), got \[0, 3\]"),
    Case("dataset: more shots than the smallest class has", lambda tmp: few_shot_indices(np.array([0, 0, 0, 1]), 2, 0, ["cat", "dog"]),
         ValueError, r"class 1 \('dog'\) has 1"),
    Case("dataset: truncated CIFAR batch", lambda tmp: load_cifar(_truncated_cifar(tmp)), ValueError,
         r"{tmp}/cifar-10-batches-py/data_batch_1 is not a readable pickle"),
]


def _truncated_cifar(tmp):
    import pickle

    root = tmp / "cifar-10-batches-py"
    root.mkdir()
    (root / "batches.meta").write_bytes(pickle.dumps({b"label_names": [b"a"] * 10}, protocol=2))
    batch = pickle.dumps({b"data": np.zeros((4, 3072), np.uint8), b"labels": [0, 1, 2, 3]}, protocol=2)
    (root / "data_batch_1").write_bytes(batch[: len(batch) // 2])
    return tmp


# ------------------------------------------------------------------------------------------------ CLI


@dataclasses.dataclass
class CliResult:
    code: int
    out: str
    err: str


def _cli(*argv: str | Callable[[Path], str]):
    """Run `bigtransfer ARGV` in this process; arguments may be functions of the row's directory."""

    def call(tmp):
        out, err = io.StringIO(), io.StringIO()
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
            try:
                code = main([arg(tmp) if callable(arg) else arg for arg in argv])
            except SystemExit as exit_:  # argparse's own errors
                code = exit_.code
        return CliResult(code, out.getvalue(), err.getvalue())

    return call


def _fails(pattern: str):
    """A non-zero exit with one `bigtransfer CMD: error: ...` line matching `pattern` and no traceback."""

    def check(result: CliResult, tmp):
        errors = [line for line in result.err.splitlines() if re.match(r"bigtransfer \w+: error: ", line)]
        assert result.code != 0, result
        assert "Traceback" not in result.err, result.err
        assert len(errors) == 1 and result.err.strip().endswith(errors[0]), result.err  # log lines may come first
        assert re.search(pattern.replace("{tmp}", re.escape(str(tmp))), errors[0]), errors[0]

    return check


def _data(layout):
    return lambda tmp: str(_folder(tmp, layout) if not (tmp / "images").exists() else tmp / "images")


def _folder_with_a_truncated_jpeg(tmp):
    root = _folder(tmp, {"a": 4, "b": 4})
    (root / "b" / "broken.jpg").write_bytes(_jpeg_bytes()[:700])
    return str(root)


def _model_dir(tmp):
    return str(_saved_model(tmp)) if not (tmp / "model").exists() else str(tmp / "model")


def _file(name, data=b""):
    def build(tmp):
        (tmp / name).write_bytes(data)
        return str(tmp / name)

    return build


CLI_CASES = [
    Case("cli: predict a missing image file", _cli("predict", "--model", _model_dir, lambda tmp: str(tmp / "gone.jpg")),
         check=_fails(r"{tmp}/gone\.jpg")),
    Case("cli: predict a truncated image file",
         _cli("predict", "--model", _model_dir, lambda tmp: str(_written("half.jpg", _jpeg_bytes()[:900])(tmp))),
         check=_fails(r"cannot read image {tmp}/half\.jpg: .*truncated")),
    Case("cli: predict with a model directory that does not exist",
         _cli("predict", "--model", lambda tmp: str(tmp / "no-model"), _file("a.png")),
         check=_fails(r"{tmp}/no-model does not exist: expected a directory with config\.json and weights")),
    Case("cli: predict --top-k 0", _cli("predict", "--model", _model_dir, "--top-k", "0", _file("a.png")),
         check=_fails(r"argument --top-k: must be >= 1, got 0$")),
    Case("cli: finetune on data that does not exist",
         _cli("finetune", "--model", "tiny", "--data", lambda tmp: str(tmp / "nothing"), "--output",
              lambda tmp: str(tmp / "run"), *TRAIN),
         check=_fails(r"data spec '{tmp}/nothing' does not exist")),
    Case("cli: finetune with negative steps",
         _cli("finetune", "--model", "tiny", "--data", _data({"a": 3, "b": 3}), "--output", lambda tmp: str(tmp / "run"),
              "--max-steps", "-5", *TRAIN),
         check=_fails(r"argument --max-steps: must be >= 1, got -5$")),
    Case("cli: finetune with a word for a number",
         _cli("finetune", "--model", "tiny", "--data", _data({"a": 3, "b": 3}), "--output", lambda tmp: str(tmp / "run"),
              *TRAIN, "--workers", "two"),
         check=_fails(r"argument --workers: expected an integer, got 'two'$")),
    Case("cli: finetune with more shots than the smallest class",
         _cli("finetune", "--model", "tiny", "--data", _data({"big": 12, "small": 3}), "--output",
              lambda tmp: str(tmp / "run"), "--shots", "5", *TRAIN),
         check=_fails(r"5-shot sampling needs 5 examples per class, but class 1 \('small'\) has 2")),
    Case("cli: finetune into a file",
         _cli("finetune", "--model", "tiny", "--data", _data({"a": 3, "b": 3}), "--output",
              lambda tmp: _file("taken.txt", b"notes")(tmp), *TRAIN),
         check=_fails(r"output {tmp}/taken\.txt is a file: a run needs a directory")),
    Case("cli: finetune with batch size 0",
         _cli("finetune", "--model", "tiny", "--data", _data({"a": 3, "b": 3}), "--output", lambda tmp: str(tmp / "run"),
              *TRAIN, "--batch-size", "0"),
         check=_fails(r"argument --batch-size: must be >= 1, got 0$")),
    Case("cli: finetune with an unknown model",
         _cli("finetune", "--model", "resnet9000", "--data", _data({"a": 3, "b": 3}), "--output",
              lambda tmp: str(tmp / "run"), *TRAIN),
         check=_fails(r"resnet9000 does not exist: expected a directory")),
    Case("cli: finetune with DataLoader workers meets a truncated image",
         _cli("finetune", "--model", "tiny", "--data", lambda tmp: _folder_with_a_truncated_jpeg(tmp), "--output",
              lambda tmp: str(tmp / "run"), "--max-steps", "8", "--workers", "2", *TRAIN),
         check=_fails(r"^bigtransfer finetune: error: cannot read image {tmp}/images/b/broken\.jpg: \w+Error: ")),
    Case("cli: evaluate a directory with no weights",
         _cli("evaluate", "--model", lambda tmp: str(BitConfig(**TINY).save_pretrained(tmp / "m").parent),
              "--data", _data({"a": 2, "b": 2})),
         check=_fails(r"no weights in {tmp}/m")),
    Case("cli: convert a file that does not exist",
         _cli("convert", lambda tmp: str(tmp / "missing.npz"), lambda tmp: str(tmp / "out")),
         check=_fails(r"{tmp}/missing\.npz")),
    Case("cli: convert a truncated safetensors file",
         _cli("convert", lambda tmp: _file("w.safetensors", b"\x10\x00\x00\x00\x00\x00\x00\x00{\"a\":")(tmp),
              lambda tmp: str(tmp / "out")),
         check=_fails(r"{tmp}/w\.safetensors")),
]


def _debug_shows_the_traceback(tmp):
    return main(["--debug", "predict", "--model", str(tmp / "no-model"), str(tmp / "a.png")])


CLI_CASES.append(Case("cli: --debug raises instead of printing one line", _debug_shows_the_traceback, OSError,
                      r"{tmp}/no-model does not exist"))

# ------------------------------------------------------------------------------------------------ hostile inputs
# Each class of failure found by trying hostile and careless inputs: outputs that are the user's, files that would
# hang a reader, resource bombs (run in a child process whose peak memory is measured), decoders that fail in
# unexpected ways, numbers that are silently wrong, and messages that do not say what is wrong.

BOMB_MEMORY_MB = 600  # what a refused bomb may cost a child process on top of importing the package


def _in_child(code: str):
    """Run `code` (with `path` bound to the row's file) in a fresh interpreter; returns (exit code, stderr, MB)."""
    import subprocess
    import sys

    def call(tmp):
        script = (
            "import sys\nimport bigtransfer, bigtransfer.checkpoints, bigtransfer.data\n"
            f"before = {CHILD_PEAK_MB}\n"
            f"path = {str(tmp)!r}\n"
            "try:\n" + "".join(f"    {line}\n" for line in code.splitlines()) +
            "except (ValueError, OSError) as error:\n    print(type(error).__name__, error, file=sys.stderr)\n"
            "else:\n    print('no error', file=sys.stderr)\n"
            f"print('MB', {CHILD_PEAK_MB} - before, file=sys.stderr)\n"
        )
        done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120)
        megabytes = float(done.stderr.strip().splitlines()[-1].split()[-1])
        return done.returncode, done.stderr, megabytes

    return call


def _refused_cheaply(pattern: str):
    def check(result, tmp):
        code, err, megabytes = result
        assert code == 0 and "no error" not in err and "Traceback" not in err, err
        assert re.search(pattern.replace("{tmp}", re.escape(str(tmp))), err), err
        assert megabytes < BOMB_MEMORY_MB, f"the refusal cost {megabytes:.0f} MB"

    return check


def _bomb_npz(tmp):
    """400 MB of zeros declared by an .npy member deflated to under 2 MB (the 2 MB -> 2.6 GB file, smaller)."""
    import zipfile

    header = io.BytesIO()
    np.lib.format.write_array_header_1_0(header, {"descr": "<f4", "fortran_order": False, "shape": (100_000_000,)})
    with zipfile.ZipFile(tmp / "bomb.npz", "w", zipfile.ZIP_DEFLATED, compresslevel=1) as archive:
        with archive.open("resnet/root_block/standardized_conv2d/kernel.npy", "w", force_zip64=True) as member:
            member.write(header.getvalue())
            for _ in range(25):
                member.write(bytes(16 << 20))
    return tmp / "bomb.npz"


def _lying_npz(tmp):
    """A 1 kB .npy member whose header declares 9 GB (numpy allocates what the header says before reading)."""
    import zipfile

    header = io.BytesIO()
    np.lib.format.write_array_header_1_0(header, {"descr": "<f4", "fortran_order": False, "shape": (2_300_000_000,)})
    with zipfile.ZipFile(tmp / "lying.npz", "w") as archive:
        archive.writestr("resnet/root_block/standardized_conv2d/kernel.npy", header.getvalue() + bytes(1000))
    return tmp / "lying.npz"


def _stride_zero_torch_file(tmp):
    """A small torch file holding one float expanded (stride 0) to 9 GB."""
    torch.save({"stem.conv.weight": torch.zeros(1).expand(64, 3, 7, 7 * 1_000_000)}, tmp / "expanded.pth")
    return tmp / "expanded.pth"


def _allocating_pickle(tmp):
    """117 bytes that ask numpy for a 3.5 GB array shell."""
    import pickle

    body = (pickle.PROTO + b"\x02" + pickle.GLOBAL + b"numpy.core.multiarray\n_reconstruct\n" + pickle.GLOBAL
            + b"numpy\nndarray\n" + pickle.BININT + struct.pack("<i", 875_000_000) + pickle.TUPLE1 + pickle.SHORT_BINBYTES
            + b"\x01b" + pickle.TUPLE3 + pickle.REDUCE + pickle.STOP)
    (tmp / "data_batch_1").write_bytes(body)
    return tmp / "data_batch_1"


def _billion_laughs_pickle(tmp):
    """A kilobyte of lists made of two references to the previous one, 60 deep: 2^60 leaves."""
    import pickle

    value: Any = [1]
    for _ in range(60):
        value = [value, value]
    (tmp / "data_batch_1").write_bytes(pickle.dumps({b"data": np.zeros((1, 3072), np.uint8), b"labels": value}, 2))
    (tmp / "batches.meta").write_bytes(pickle.dumps({b"label_names": [b"c"] * 10}, 2))
    return tmp


def _config_file(values):
    def build(tmp):
        (tmp / "model").mkdir()
        config = BitConfig(**TINY).to_dict()
        config.update(values)
        (tmp / "model" / "config.json").write_text(json.dumps(config))
        return tmp / "model"

    return build


def _huge_config_file(tmp):
    (tmp / "model").mkdir()
    with open(tmp / "model" / "config.json", "wb") as handle:  # 3 GB, sparse: nothing is written to disk
        handle.truncate(3 << 30)
    return tmp / "model"


def _csv_with(rows: str):
    def build(tmp):
        Image.fromarray(_noise(8, 8)).save(tmp / "a.png")
        (tmp / "list.csv").write_text(rows)
        return tmp / "list.csv"

    return build


def _many_scans_jpeg(tmp, scans=12_000):
    """A progressive JPEG followed by thousands of copies of one of its scans (decoded again for each)."""
    buffer = io.BytesIO()
    Image.fromarray(_noise(64, 64)).save(buffer, "JPEG", progressive=True, quality=90)
    data = buffer.getvalue()
    last_scan = data.rindex(b"\xff\xda")
    repeated = data[last_scan:-2] * scans
    (tmp / "scans.jpg").write_bytes(data[:-2] + repeated + b"\xff\xd9")
    return tmp / "scans.jpg"


def _phone_photo_with_a_mistyped_tag(tmp):
    """Orientation 6 (stored on its side) and ImageWidth written as ASCII: Pillow's exif_transpose raises on it."""
    entries = [(0x0100, 2, 4, struct.unpack("<I", b"six\0")[0]), (0x0112, 3, 1, 6)]  # (tag, type, count, value)
    ifd = struct.pack("<H", len(entries)) + b"".join(struct.pack("<HHII", *entry) for entry in entries) + b"\0" * 4
    exif = b"Exif\0\0" + b"II*\0" + struct.pack("<I", 8) + ifd
    Image.fromarray(_noise(40, 60)).save(tmp / "phone.jpg", exif=exif, quality=95)  # 60 wide as stored, 40 shown
    return tmp / "phone.jpg"


def _fifo(name):
    def build(tmp):
        os.mkfifo(tmp / name)
        return tmp / name

    return build


def _folder_with_a_fifo(tmp):
    root = _folder(tmp, {"a": 3, "b": 3})
    os.mkfifo(root / "b" / "pipe.jpg")
    return str(root)


def _folder_with_a_link_loop(tmp):
    root = _folder(tmp, {"a": 3, "b": 3})
    (root / "a" / "again").symlink_to(root / "a", target_is_directory=True)
    (root / "b" / "up").symlink_to(root, target_is_directory=True)
    return ImageFolderSource(root, val_fraction=0)


def _unit_float_tiff(tmp):
    Image.fromarray(np.linspace(0, 1, 32 * 32, dtype=np.float32).reshape(32, 32), mode="F").save(tmp / "unit.tif")
    return tmp / "unit.tif"


def _big_endian_npz(tmp):
    from bigtransfer.checkpoints import to_google

    torch.manual_seed(1)
    model = BitForImageClassification(BitConfig(depths=[1, 1, 1, 1], num_labels=3)).eval()
    np.savez(tmp / "big-endian.npz", **{k: v.astype(v.dtype.newbyteorder(">")) for k, v in to_google(model).items()})
    loaded = load_checkpoint(tmp / "big-endian.npz")
    pixels = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        return (loaded(pixels).logits - model(pixels).logits).abs().max().item()


def _non_finite_weights(tmp):
    directory = _saved_model(tmp)
    state = load_file(directory / "model.safetensors")
    state["bit.norm.weight"][0] = float("nan")
    save_file(state, directory / "model.safetensors")
    return directory


def _label_escapes(tmp):
    torch.manual_seed(0)
    names = {0: "cat\x1b[2J\x1b[Hfake prompt$ ", 1: "dog\rcat", 2: "ok"}
    BitForImageClassification(BitConfig(**{**TINY, "id2label": names})).save_pretrained(tmp / "model")
    Image.fromarray(_noise(32, 32)).save(tmp / "a.png")
    return str(tmp / "model")


def _shard_index_with_a_list(tmp):
    directory = _saved_model(tmp)
    (directory / "model.safetensors").rename(directory / "model-00001-of-00001.safetensors")
    (directory / "model.safetensors.index.json").write_text(json.dumps({"weight_map": ["model-00001-of-00001.safetensors"]}))
    return directory


def _run_folder(tmp):
    data = _data({"a": 3, "b": 3})(tmp)
    assert main(["finetune", "--model", "tiny", "--data", str(data), "--output", str(tmp / "run"), "--max-steps", "1",
                 *TRAIN]) == 0
    return str(tmp / "run")


def _users_folder(tmp):
    (tmp / "mine").mkdir()
    (tmp / "mine" / "thesis.txt").write_text("years of work")
    (tmp / "mine" / "report.json").write_text("{}")
    return str(tmp / "mine")


def _intact(*names):
    def check(result, tmp):
        _fails("")(result, tmp)
        for name in names:
            assert (tmp / name).exists(), name

    return check


HOSTILE_CASES = [
    # Outputs are the user's: never written into, over or above what a command reads.
    Case("output: finetune into a folder of the user's", _cli(
        "finetune", "--model", "tiny", "--data", _data({"a": 3, "b": 3}), "--output", _users_folder, *TRAIN),
        check=_and(_intact("mine/thesis.txt", "mine/report.json"),
                   _fails(r"--output {tmp}/mine already holds files that are not a bigtransfer run directory "
                          r"\(report\.json, thesis\.txt\).*--overwrite"))),
    Case("output: finetune into the parent of --model", _cli(
        "finetune", "--model", _model_dir, "--data", _data({"a": 3, "b": 3}), "--output", lambda tmp: str(tmp), *TRAIN),
        check=_and(_intact("model/config.json", "model/model.safetensors"),
                   _fails(r"--output {tmp} contains the input {tmp}/model"))),
    Case("output: finetune into the data folder", _cli(
        "finetune", "--model", "tiny", "--data", _data({"a": 3, "b": 3}), "--output", lambda tmp: str(tmp / "images" / "a"),
        *TRAIN), check=_fails(r"--output {tmp}/images/a is inside the input {tmp}/images")),
    Case("output: evaluate into a run directory", _cli(
        "evaluate", "--model", _model_dir, "--data", _data({"a": 3, "b": 3}), "--output", _run_folder), check=_and(_intact("run/report.json", "run/run.json"),
                                                  _fails(r"--output {tmp}/run already holds files that are not a "
                                                         r"bigtransfer evaluation"))),
    Case("output: convert into a folder of the user's", _cli("convert", lambda tmp: str(_saved_model(tmp)), _users_folder),
         check=_and(_intact("mine/thesis.txt"), _fails(r"OUT_DIR {tmp}/mine already holds files that are not a BiT model"))),
    Case("output: convert a model onto itself", _cli("convert", _model_dir, _model_dir),
         check=_fails(r"OUT_DIR {tmp}/model is the input {tmp}/model")),
    Case("output: export into the model directory", _cli(
        "export", "--model", _model_dir, "--output", lambda tmp: str(tmp / "model" / "m.onnx"), "--no-check", "--time", "0"),
        check=_fails(r"--output {tmp}/model/m\.onnx is inside the input {tmp}/model")),
    Case("output: an export that fails its check leaves nothing", _cli(
        "export", "--model", _model_dir, "--output", lambda tmp: str(tmp / "out.onnx"), "--tolerance", "1e-30",
        "--time", "0"),
        check=_and(_fails(r"differs from the PyTorch model .* more than the tolerance 1e-30"),
                   lambda result, tmp: _only(tmp, {"model"}))),
    # Files that would hang a reader.
    Case("hang: predict a FIFO named .jpg", _cli("predict", "--model", _model_dir, lambda tmp: str(_fifo("x.jpg")(tmp))),
         check=_fails(r"cannot read image {tmp}/x\.jpg: {tmp}/x\.jpg is a FIFO \(named pipe\), not a regular file")),
    Case("hang: a FIFO in a class folder is not an image", lambda tmp: len(open_source(_folder_with_a_fifo(tmp), val_fraction=0)),
         check=lambda count, tmp: _equal(count, 6)),
    Case("hang: a FIFO as a weights file", lambda tmp: load_checkpoint(_fifo("w.safetensors")(tmp)),
         OSError, r"{tmp}/w\.safetensors is a FIFO \(named pipe\), not a regular file"),
    Case("hang: a billion-laughs CIFAR pickle", lambda tmp: load_cifar(_billion_laughs_pickle(tmp)), ValueError,
         r"{tmp}/data_batch_1: labels must be a list of integers"),
    Case("hang: symbolic link loops in an image folder", _folder_with_a_link_loop,
         check=lambda source, tmp: _equal(len(source), 6)),
    # Resource bombs, refused before they allocate (a child process's peak memory is measured).
    Case("bomb: a 2 MB .npz that inflates to 400 MB", lambda tmp: _in_child(
        "bigtransfer.checkpoints.read_npz(path + '/bomb.npz')")(_bomb_npz(tmp).parent),
        check=_refused_cheaply(r"CheckpointError {tmp}/bomb\.npz: its members declare .* refused as a possible zip bomb")),
    Case("bomb: an .npy header declaring 9 GB in a 1 kB member", lambda tmp: _in_child(
        "bigtransfer.checkpoints.read_npz(path + '/lying.npz')")(_lying_npz(tmp).parent),
        check=_refused_cheaply(r"declares shape \(2300000000,\) of float32 \(9,200,000,000 bytes\) but holds")),
    Case("bomb: a torch file with a stride-0 tensor declaring 9 GB", lambda tmp: _in_child(
        "bigtransfer.load_checkpoint(path + '/expanded.pth')")(_stride_zero_torch_file(tmp).parent),
        check=_refused_cheaply(r"stem\.conv\.weight declares \(64, 3, 7, 7000000\) .* over 4 stored bytes")),
    Case("bomb: a 117-byte CIFAR pickle asking for 3.5 GB", lambda tmp: _in_child(
        "bigtransfer.data.safe_pickle.safe_load(path + '/data_batch_1')")(_allocating_pickle(tmp).parent),
        check=_refused_cheaply(r"refusing to allocate an array of shape \(875000000,\)")),
    Case("bomb: config.json with 100,000,000 labels", lambda tmp: BitConfig.from_pretrained(
        _config_file({"id2label": None, "label2id": None, "num_labels": 100_000_000})(tmp)), ValueError,
        r"num_labels must be at most 1,000,000, got 100000000"),
    Case("bomb: config.json with 100,000 layers in a stage", lambda tmp: BitConfig.from_pretrained(
        _config_file({"depths": [100_000, 1, 1, 1]})(tmp)), ValueError, r"depths must be at most 1,000, got 100000"),
    Case("bomb: config.json whose shape needs 1e10 parameters", lambda tmp: BitConfig.from_pretrained(
        _config_file({"hidden_sizes": [64, 128, 256, 60000], "depths": [1, 1, 1, 900], "num_groups": 1})(tmp)),
        ValueError, r"describes a network of [\d,]+ parameters .* more than the 4,000,000,000"),
    Case("bomb: a 3 GB config.json", lambda tmp: BitConfig.from_pretrained(_huge_config_file(tmp)), ValueError,
         r"{tmp}/model/config\.json is 3,221,225,472 bytes, more than a JSON file can be"),
    Case("bomb: a CSV label of 1,000,000,000", lambda tmp: CsvSource(_csv_with("a.png,0\na.png,1000000000\n")(tmp)),
         ValueError, r"{tmp}/list\.csv: label 1000000000 would make 1,000,000,001 classes"),
    Case("bomb: a progressive JPEG of 12,000 scans", lambda tmp: load_image(_many_scans_jpeg(tmp)), BadImageError,
         r"cannot read image {tmp}/scans\.jpg: a progressive JPEG of 12\d\d\d scans"),
    Case("bomb: --classes 0-99999999999", _cli(
        "finetune", "--model", "tiny", "--data", "digits", "--output", lambda tmp: str(tmp / "r"), "--classes",
        "0-99999999999"), check=_fails(r"argument --classes: '0-99999999999' spans more than 1,000,000 classes")),
    # Decoders that fail in unexpected ways: the skip policy applies, and metadata does not stop a photo.
    Case("skip: a phone photo with a mistyped EXIF tag comes out upright",
         lambda tmp: load_image(_phone_photo_with_a_mistyped_tag(tmp)).size, check=lambda size, tmp: _equal(size, (40, 60))),
    Case("skip: a file PIL fails on with an unusual error is a bad image",
         lambda tmp: load_image(_written("odd.gif", b"GIF89a" + b"\xff" * 20)(tmp)), BadImageError,
         r"cannot read image {tmp}/odd\.gif"),
    # Numbers that were silently wrong.
    Case("numbers: NaN weights are refused on load", lambda tmp: BitForImageClassification.from_pretrained(
        _non_finite_weights(tmp)), CheckpointError,
        r"{tmp}/model: 1 tensor\(s\) hold NaN or infinite values: \['bit\.norm\.weight'\].*allow_non_finite=True"),
    Case("numbers: evaluate with NaN weights exits non-zero", _cli(
        "evaluate", "--model", lambda tmp: str(_non_finite_weights(tmp)), "--data", _data({"a": 3, "b": 3})),
        check=_fails(r"hold NaN or infinite values")),
    Case("numbers: --json is valid JSON when a class has no images", _cli(
        "evaluate", "--model", _model_dir, "--data", _data({"a": 3, "b": 3, "c": 1}), "--split", "test", "--json"),
        check=lambda result, tmp: _strict_json(result.out)),
    Case("numbers: a float TIFF in [0, 1] is scaled, not black", lambda tmp: np.asarray(load_image(_unit_float_tiff(tmp))).max(),
         check=lambda value, tmp: _equal(int(value), 255)),
    Case("numbers: a big-endian .npz loads", _big_endian_npz, check=lambda difference, tmp: _equal(difference < 1e-4, True)),
    Case("numbers: convert --labels renames label2id too", lambda tmp: _converted_labels(tmp),
         check=lambda config, tmp: _equal((config["id2label"], config["label2id"]),
                                          ({"0": "x", "1": "y", "2": "z"}, {"x": 0, "y": 1, "z": 2}))),
    Case("numbers: --resume after the data changed", lambda tmp: _resume_after_new_images(tmp), ValueError,
         r"cannot resume {tmp}/run: settings differ from the checkpoint's \(data_fingerprint: '(\d+) examples, 2 classes, "
         r"sha256 \w+' -> '\d+ examples, 2 classes"),
    # Messages that say what is wrong (the "unexpected" fallback is for bugs only).
    Case("message: a full disk while writing weights", lambda tmp: _in_child(
        "import resource, signal\nsignal.signal(signal.SIGXFSZ, signal.SIG_IGN)\n"
        "resource.setrlimit(resource.RLIMIT_FSIZE, (1 << 16, resource.RLIM_INFINITY))\n"
        "from bigtransfer.checkpoints import save_timm\nfrom bigtransfer import BitConfig, BitForImageClassification\n"
        "save_timm(BitForImageClassification(BitConfig.from_variant('tiny')), path + '/w.safetensors')")(tmp),
        check=_refused_cheaply(r"OSError cannot write {tmp}/w\.safetensors: .*File too large")),
    Case("message: metrics.jsonl lines that are not records", lambda tmp: read_metrics(
        _written("metrics.jsonl", b'[1, 2]\n"text"\n{"step": 1, "loss": 0.5}\n{"step": 2')(tmp)),
        check=lambda records, tmp: _equal(records, [{"step": 1, "loss": 0.5}])),
    Case("message: a shard index whose weight_map is a list", lambda tmp: BitModel.from_pretrained(
        _shard_index_with_a_list(tmp)), CheckpointError,
        r"{tmp}/model/model\.safetensors\.index\.json: weight_map must map tensor names to shard file names"),
    Case("message: a CSV field past csv's size limit", lambda tmp: CsvSource(_csv_with("a.png," + "x" * 200_000 + "\n")(tmp)),
         ValueError, r"{tmp}/list\.csv row 1: not a readable CSV row"),
    Case("message: a Latin-1 CSV", lambda tmp: CsvSource(_written("list.csv", "café.png,a\n".encode("latin-1"))(tmp)),
         ValueError, r"{tmp}/list\.csv is not UTF-8 text"),
    Case("message: a Latin-1 labels file", lambda tmp: read_labels(_written("labels.txt", "café\n".encode("latin-1"))(tmp)),
         ValueError, r"{tmp}/labels\.txt is not UTF-8 text"),
    Case("message: config.json with a 5,000-digit number", lambda tmp: BitConfig.from_pretrained(
        _written("config.json", b'{"num_labels": ' + b"9" * 5000 + b"}")(tmp)), ValueError,
        r"{tmp}/config\.json is not valid JSON"),
    Case("message: export --opset 13", _cli("export", "--model", _model_dir, "--output", lambda tmp: str(tmp / "m.onnx"),
                                           "--opset", "13", "--time", "0"),
         check=_and(_fails(r"opset 13 is not supported: torch\.onnx's exporter writes opset 18 or newer"),
                    lambda result, tmp: _only(tmp, {"model"}))),
    Case("message: out of memory on the command line", lambda tmp: _out_of_memory_cli(tmp),
         check=_fails(r"error: out of memory \([\d.]+ [GM]iB free now\); free memory \(other programs\) or use a machine")),
    Case("message: class names are printed escaped", _cli("predict", "--model", _label_escapes, lambda tmp: str(tmp / "a.png"),
                                                          "--top-k", "3"),
         check=lambda result, tmp: _equal(("\x1b" in result.out, "\r" in result.out, "\\x1b[2J" in result.out), (False, False, True))),
]


def _resume_after_new_images(tmp):
    from bigtransfer.train import FinetuneConfig, finetune

    data = _folder(tmp, {"a": 3, "b": 3})
    settings = dict(model="tiny", data=str(data), output=tmp / "run", eval_data=str(data), batch_size=2, max_steps=2,
                    resize=20, crop=16, progress=False, plots=False)
    finetune(FinetuneConfig(**settings))
    Image.fromarray(_noise(12, 12, seed=7)).save(data / "a" / "new.png")
    return finetune(FinetuneConfig(**settings, resume=True))


def _only(tmp: Path, names: set[str]) -> None:
    left = {entry.name for entry in tmp.iterdir()}
    assert left == names, f"left behind: {sorted(left - names)}"


def _equal(actual, expected) -> None:
    assert actual == expected, (actual, expected)


def _strict_json(text: str) -> None:
    def refuse(constant):
        raise AssertionError(f"{constant} is not JSON")

    report = json.loads(text, parse_constant=refuse)
    assert None in report["per_class_accuracy"].values()  # the class without images, as null


def _converted_labels(tmp):
    (tmp / "labels.txt").write_text("x\ny\nz\n")
    assert main(["convert", str(_saved_model(tmp)), str(tmp / "out"), "--labels", str(tmp / "labels.txt")]) == 0
    return json.loads((tmp / "out" / "config.json").read_text())


def _out_of_memory_cli(tmp):
    import bigtransfer.commands.convert as convert_command

    original = convert_command.convert_checkpoint

    def exhausted(*args, **kwargs):
        raise MemoryError()

    convert_command.convert_checkpoint = exhausted
    try:
        return _cli("convert", "x.npz", str(tmp / "out"))(tmp)
    finally:
        convert_command.convert_checkpoint = original




# ------------------------------------------------------------------------------------------------ round three
# Multi-file outputs, staged leftovers, links out of the output, bounds, the processor against the decoder.


def _killed_writer(name: str):
    """What a process writing `name` through `files.staged_outputs` leaves when SIGKILL stops it half-way."""
    import subprocess
    import sys

    def build(tmp):
        code = ("import os, signal\nfrom bigtransfer.files import staged_outputs\n"
                f"with staged_outputs({str(tmp / name)!r}) as staging:\n"
                f"    staging.path({str(tmp / name)!r}).write_bytes(b'half')\n"
                "    os.kill(os.getpid(), signal.SIGKILL)\n")
        subprocess.run([sys.executable, "-c", code], check=False, timeout=120)
        assert _staged(tmp, name), "the killed writer left nothing to sweep"

    return build


def _staged(tmp: Path, name: str) -> list[str]:
    return [entry.name for entry in tmp.iterdir() if entry.name.startswith(f".{name}.")]


def _then(build, *argv):
    """`build(tmp)` first, then the CLI with `argv`."""
    command = _cli(*argv)
    return lambda tmp: (build(tmp), command(tmp))[1]


def _succeeds(*checks):
    def check(result, tmp):
        assert result.code == 0, result
        for extra in checks:
            extra(tmp)

    return check


def _users_labels(tmp):
    (tmp / "x.labels.npy").write_bytes(b"the user's own labels")
    return str(tmp / "x.npy")


def _with_environment(variables: dict[str, str], call):
    def run(tmp):
        saved = {key: os.environ.get(key) for key in variables}
        os.environ.update(variables)
        try:
            return call(tmp)
        finally:
            for key, value in saved.items():
                if value is None:
                    os.environ.pop(key, None)
                else:
                    os.environ[key] = value

    return run


def _linked_tensorboard(tmp):
    (tmp / "elsewhere").mkdir()
    (tmp / "run").mkdir()
    (tmp / "run" / "tensorboard").symlink_to(tmp / "elsewhere")
    return str(tmp / "run")


def _tensorboard_file(tmp):
    (tmp / "run").mkdir()
    (tmp / "run" / "tensorboard").write_text("notes")
    return str(tmp / "run")


def _trainer_callback_into_a_link(tmp):
    import types

    from bigtransfer.integrations import trainer_callback

    (tmp / "users").mkdir()
    (tmp / "out").mkdir()
    (tmp / "out" / "checkpoint-5").symlink_to(tmp / "users")
    arguments = types.SimpleNamespace(output_dir=str(tmp / "out"))
    state = types.SimpleNamespace(is_world_process_zero=True, global_step=5)
    return trainer_callback().on_save(arguments, state, None, model=_model())


def _ndarray_pickle(tmp):
    """30 bytes calling numpy.ndarray((875000000,), float32) directly: a 3.5 GB array the file does not hold."""
    import pickle

    body = (pickle.PROTO + b"\x02" + pickle.GLOBAL + b"numpy\nndarray\n" + pickle.BININT + struct.pack("<i", 875_000_000)
            + pickle.TUPLE1 + pickle.SHORT_BINBYTES + b"\x02f4" + pickle.TUPLE2 + pickle.REDUCE + pickle.STOP)
    (tmp / "data_batch_1").write_bytes(body)
    return tmp / "data_batch_1"


def _float_tiff(name: str, scale: float, offset: float = 0.0):
    def build(tmp):
        ramp = np.linspace(0, 1, 48 * 40, dtype=np.float32).reshape(48, 40) * scale + offset
        Image.fromarray(ramp, mode="F").save(tmp / name)
        return tmp / name

    return build


def _sixteen_bit(name: str):
    def build(tmp):
        Image.fromarray((np.linspace(0, 1, 48 * 40).reshape(48, 40) * 65535).astype(np.uint16)).save(tmp / name)
        return tmp / name

    return build


def _processor_against_decoder(build):
    """(largest |processor - decoder| in grey levels, the decoder's middle pixel) over one file, the processor
    given the path and the opened PIL image."""
    def call(tmp):
        path = build(tmp)
        decoded = np.asarray(load_image(path), dtype=np.float32).transpose(2, 0, 1)
        processor = BitImageProcessor(do_resize=False, do_center_crop=False, do_normalize=False)
        with Image.open(path) as opened:
            inputs = [path, opened]
            outputs = [processor(item, return_tensors="np")["pixel_values"][0] * 255 for item in inputs]
        return max(float(np.abs(output - decoded).max()) for output in outputs), int(decoded[0, 24, 20])

    return call


def _agrees(difference_and_middle, tmp):
    difference, middle = difference_and_middle
    assert difference <= 0.5, f"the processor and the decoder differ by {difference} grey levels"
    assert 120 <= middle <= 135, f"the middle of a 0..max ramp reads {middle}, not mid-grey"


def _damaged_run_checkpoint(tmp):
    from safetensors import safe_open

    from bigtransfer.train import CHECKPOINT_NAME, FinetuneConfig, finetune

    data = _folder(tmp, {"a": 3, "b": 3})
    settings = dict(model="tiny", data=str(data), output=tmp / "run", eval_data=str(data), batch_size=2, max_steps=2,
                    resize=20, crop=16, progress=False, plots=False)
    finetune(FinetuneConfig(**settings))
    checkpoint = tmp / "run" / CHECKPOINT_NAME
    with safe_open(str(checkpoint), framework="pt") as handle:
        tensors, metadata = {key: handle.get_tensor(key) for key in handle.keys()}, handle.metadata()
    tensors["rng/numpy"] = tensors["rng/numpy"][:100]  # "state vector is the wrong size", once
    save_file(tensors, checkpoint, metadata)
    return finetune(FinetuneConfig(**settings, resume=True))


def _fewshot(*extra):
    return _cli("fewshot", "--model", _model_dir, "--data", _data({"a": 4, "b": 4}), "--no-progress", *extra)


HARDEN_CASES = [
    Case("output: features beside a labels file of the user's", _cli(
        "features", "--model", _model_dir, "--data", _data({"a": 2, "b": 2}), "--output", _users_labels),
        check=_and(_fails(r"--output {tmp}/x\.npy would replace {tmp}/x\.labels\.npy, not written with it .*--overwrite"),
                   lambda result, tmp: _equal((tmp / "x.labels.npy").read_bytes(), b"the user's own labels"),
                   lambda result, tmp: _equal((tmp / "x.npy").exists(), False))),
    Case("output: features --overwrite replaces them, all three together", _cli(
        "features", "--model", _model_dir, "--data", _data({"a": 2, "b": 2}), "--output", _users_labels, "--overwrite"),
        check=_succeeds(lambda tmp: _equal(np.load(tmp / "x.labels.npy").tolist(), [0, 0, 1, 1]),
                        lambda tmp: _equal(len(json.loads((tmp / "x.index.json").read_text())["paths"]), 4))),
    Case("output: features into folders that do not exist yet", _cli(
        "features", "--model", _model_dir, "--data", _data({"a": 2, "b": 2}), "--output", lambda tmp: str(tmp / "a/b/x.npy")),
        check=_succeeds(lambda tmp: _equal(sorted(p.name for p in (tmp / "a/b").iterdir()),
                                           ["x.index.json", "x.labels.npy", "x.npy"]))),
    Case("stale: a killed features run's staged files are swept by the next", _then(
        _killed_writer("x.npy"), "features", "--model", _model_dir, "--data", _data({"a": 2, "b": 2}), "--output",
        lambda tmp: str(tmp / "x.npy")),
        check=_succeeds(lambda tmp: _equal(_staged(tmp, "x.npy"), []), lambda tmp: _equal(np.load(tmp / "x.npy").shape[0], 4))),
    Case("stale: a killed shard run's staged folder is swept by the next", _then(
        _killed_writer("shards"), "shard", "--data", _data({"a": 2, "b": 2}), "--output", lambda tmp: str(tmp / "shards"),
        "--no-progress"),
        check=_succeeds(lambda tmp: _equal(_staged(tmp, "shards"), []),
                        lambda tmp: _equal(sorted(p.name for p in (tmp / "shards").iterdir())[-1], "shard-000000.tar"))),
    Case("stray: RANK=1 without torchrun still writes the features", _with_environment({"RANK": "1"}, _cli(
        "features", "--model", _model_dir, "--data", _data({"a": 2, "b": 2}), "--output", lambda tmp: str(tmp / "x.npy"))),
        check=_succeeds(lambda tmp: _equal(np.load(tmp / "x.npy").shape[0], 4))),
    Case("stray: RANK=1 without torchrun still prints the evaluation", _with_environment({"RANK": "1"}, _cli(
        "evaluate", "--model", _model_dir, "--data", _data({"a": 2, "b": 2}), "--split", "all", "--json")),
        check=lambda result, tmp: _equal(json.loads(result.out)["num_images"], 4)),
    Case("link: RUN_DIR/tensorboard a symbolic link out of the run", _cli(
        "finetune", "--model", "tiny", "--data", _data({"a": 3, "b": 3}), "--output", _linked_tensorboard, "--overwrite",
        "--report-to", "tensorboard", "--max-steps", "1", *TRAIN),
        check=_and(_fails(r"{tmp}/run/tensorboard is a symbolic link \(to {tmp}/elsewhere\); TensorBoard event files are "
                          r"written only inside {tmp}/run"),
                   lambda result, tmp: _equal(list((tmp / "elsewhere").iterdir()), []))),
    Case("message: RUN_DIR/tensorboard is a file", _cli(
        "finetune", "--model", "tiny", "--data", _data({"a": 3, "b": 3}), "--output", _tensorboard_file, "--overwrite",
        "--report-to", "tensorboard", "--max-steps", "1", *TRAIN),
        check=_fails(r"{tmp}/run/tensorboard is a file; TensorBoard event files go into a folder of that name")),
    Case("link: the Trainer callback and a checkpoint-N that is a symbolic link", _trainer_callback_into_a_link,
         ValueError, r"{tmp}/out/checkpoint-5 is a symbolic link; config\.json is written only inside {tmp}/out"),
    Case("bounds: fewshot --seeds 1000000000", _fewshot("--seeds", "1000000000", "--shots", "1"),
         check=_fails(r"seeds must be an integer from 1 to 1,000 .*got 1000000000")),
    Case("bounds: fewshot --shots 50000", _fewshot("--shots", "1,50000"),
         check=_fails(r"shots must be integers from 1 to 10,000 .*got \[1, 50000\]")),
    Case("meaning: fewshot on one class", _cli("fewshot", "--model", _model_dir, "--data", _data({"only": 6}),
                                               "--shots", "1", "--no-progress"),
         check=_fails(r"few-shot classification needs at least 2 classes, but {tmp}/images has 1 \('only'\)")),
    Case("output: fewshot --output into folders that do not exist yet", _fewshot("--shots", "1", "--seeds", "1",
                                                                              "--output", lambda tmp: str(tmp / "a/b/c")),
         check=_succeeds(lambda tmp: _equal((tmp / "a/b/c/fewshot.json").is_file(), True))),
    Case("output: evaluate --output into folders that do not exist yet", _cli(
        "evaluate", "--model", _model_dir, "--data", _data({"a": 2, "b": 2}), "--split", "all", "--output",
        lambda tmp: str(tmp / "a/b/c")),
        check=_succeeds(lambda tmp: _equal((tmp / "a/b/c/report.json").is_file(), True))),
    Case("bomb: a 30-byte pickle calling numpy.ndarray for 3.5 GB", lambda tmp: _in_child(
        "bigtransfer.data.safe_pickle.safe_load(path + '/data_batch_1')")(_ndarray_pickle(tmp).parent),
        check=_refused_cheaply(r"UnsafePickleError {tmp}/data_batch_1: refusing to allocate an array of shape \(875000000,\)")),
    Case("message: a run checkpoint damaged on disk", _damaged_run_checkpoint, ValueError,
         r"cannot resume from {tmp}/run/checkpoint\.safetensors: it is damaged .*start the run again with --overwrite"),
    Case("message: a full disk while writing features names the file", lambda tmp: _in_child(
        "import resource, signal\nsignal.signal(signal.SIGXFSZ, signal.SIG_IGN)\n"
        "resource.setrlimit(resource.RLIMIT_FSIZE, (1 << 12, resource.RLIM_INFINITY))\nimport numpy as np\n"
        "from bigtransfer.inference import write_features\n"
        "write_features(path + '/x.npy', np.zeros((100, 64), np.float32), np.zeros(100, np.int64))")(tmp),
        check=_and(_refused_cheaply(r"OSError cannot write {tmp}/x\.npy: .*(File too large|is the disk full)"),
                   lambda result, tmp: _equal(sorted(p.name for p in tmp.iterdir()), []))),
    Case("message: vtab task classes: 5", lambda tmp: __import__("bigtransfer.vtab").vtab.read_tasks(
        _written("tasks.json", b'{"tasks": [{"name": "t", "data": "digits", "classes": 5}]}')(tmp)), ValueError,
        r'{tmp}/tasks\.json: task 1 \(t\): "classes" must be a non-empty list of class indices or names, or a string'),
    Case("message: a float TIFF outside every range names the file", lambda tmp: load_image(_float_tiff("odd.tif", 1e6, -5)(tmp)),
         BadImageError, r"cannot read image {tmp}/odd\.tif: ValueError: .*a floating-point image with values in \[-5, 999995\]; expected "
         r"\[0, 1\], 0\.\.255 or 0\.\.65535"),
    Case("agree: a float TIFF in [0, 1], processor and decoder", _processor_against_decoder(_float_tiff("unit.tif", 1.0)),
         check=_agrees),
    Case("agree: a float TIFF in 0..255, processor and decoder", _processor_against_decoder(_float_tiff("byte.tif", 255.0)),
         check=_agrees),
    Case("agree: a float TIFF in 0..65535, processor and decoder", _processor_against_decoder(_float_tiff("wide.tif", 65535.0)),
         check=_agrees),
    Case("agree: a 16-bit PNG, processor and decoder", _processor_against_decoder(_sixteen_bit("deep.png")), check=_agrees),
    Case("agree: a 16-bit TIFF, processor and decoder", _processor_against_decoder(_sixteen_bit("deep.tif")), check=_agrees),
]

CASES = _image_cases() + TENSOR_CASES + CONFIG_CASES + CHECKPOINT_CASES + DATA_CASES + CLI_CASES + HOSTILE_CASES + HARDEN_CASES


def test_the_table_is_large_enough():
    assert len(CASES) >= 40 and len({case.id for case in CASES}) == len(CASES)


@pytest.mark.parametrize("case", CASES, ids=[case.id for case in CASES])
def test_bad_input(case: Case, tmp_path: Path):
    started = time.perf_counter()
    with _deadline(60):  # a hang (a FIFO, a billion laughs) fails the row instead of the whole run
        if case.error is not None:
            with pytest.raises(case.error) as raised:
                case.call(tmp_path)
            assert re.search(case.match.replace("{tmp}", re.escape(str(tmp_path))), str(raised.value)), str(raised.value)
            assert "\n" not in str(raised.value).strip(), "an error message is one line"
        else:
            case.check(case.call(tmp_path), tmp_path)
    assert time.perf_counter() - started < 20, "a bad input must fail fast, not hang"


@contextlib.contextmanager
def _deadline(seconds: int):
    import signal

    def expired(signum, frame):
        raise TimeoutError(f"still running after {seconds} s: it hangs")

    previous = signal.signal(signal.SIGALRM, expired)
    signal.alarm(seconds)
    try:
        yield
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, previous)
