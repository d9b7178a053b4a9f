"""Checkpoint formats against their source implementations: timm, Google .npz, the original big_transfer code.

Real pretrained weights are not available offline, so every source model gets random weights (GroupNorm
affines and heads too, so nothing is trivially zero or one) and real BiT shapes at 64x64. The original
big_transfer code is not installable; `ReferenceResNetV2` below re-implements its model from the paper's
description (pre-activation ResNet-v2, GroupNorm(32), weight standardization with eps 1e-10, names
root / body.block{b}.unit{NN} / head) to serve as the source for the .npz and big_transfer formats.
"""

from __future__ import annotations

import json
import os
import pickle
from collections import OrderedDict
from functools import partial
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import save_file
from torch import nn

from bigtransfer import (
    BitBackbone,
    BitConfig,
    BitForImageClassification,
    CheckpointError,
    UnsafeCheckpointError,
    load_checkpoint,
)
from bigtransfer.checkpoints import (
    imagenet21k_labels,
    imagenet_labels,
    keymaps,
    read_checkpoint,
    read_labels,
    save_big_transfer,
    save_npz,
    save_timm,
    to_big_transfer,
    to_google,
    to_timm,
)
from bigtransfer.checkpoints.formats import original_preprocessing, timm_preprocessing
from bigtransfer.checkpoints.readers import file_kind, read_npz
from bigtransfer.cli import main
from conftest import record

TOLERANCE = 1e-4  # the bar: converted logits equal the source's to 1e-4
PIXELS = torch.randn(2, 3, 64, 64, generator=torch.Generator().manual_seed(1))


# ---------------------------------------------------------------------------------------------------------------
# A reference for the original big_transfer PyTorch model (written from the paper and the design notes).


class ReferenceStdConv2d(nn.Conv2d):
    """Weight standardization as the original code computes it: biased variance, eps 1e-10 inside the sqrt."""

    eps = 1e-10

    def forward(self, x):
        weight = self.weight
        mean = weight.mean(dim=(1, 2, 3), keepdim=True)
        variance = (weight - mean).pow(2).mean(dim=(1, 2, 3), keepdim=True)
        standardized = (weight - mean) / torch.sqrt(variance + self.eps)
        return F.conv2d(x, standardized, self.bias, self.stride, self.padding)


class ReferenceUnit(nn.Module):
    def __init__(self, in_channels: int, out_channels: int, mid_channels: int, stride: int):
        super().__init__()
        self.gn1 = nn.GroupNorm(32, in_channels)
        self.conv1 = ReferenceStdConv2d(in_channels, mid_channels, 1, bias=False)
        self.gn2 = nn.GroupNorm(32, mid_channels)
        self.conv2 = ReferenceStdConv2d(mid_channels, mid_channels, 3, stride=stride, padding=1, bias=False)
        self.gn3 = nn.GroupNorm(32, mid_channels)
        self.conv3 = ReferenceStdConv2d(mid_channels, out_channels, 1, bias=False)
        if stride != 1 or in_channels != out_channels:
            self.downsample = ReferenceStdConv2d(in_channels, out_channels, 1, stride=stride, bias=False)

    def forward(self, x):
        preactivated = F.relu(self.gn1(x))
        shortcut = self.downsample(preactivated) if hasattr(self, "downsample") else x
        branch = self.conv1(preactivated)
        branch = self.conv2(F.relu(self.gn2(branch)))
        branch = self.conv3(F.relu(self.gn3(branch)))
        return branch + shortcut


class ReferenceResNetV2(nn.Module):
    def __init__(self, units: list[int], width: int, head_size: int):
        super().__init__()
        self.root = nn.Sequential(OrderedDict(
            conv=ReferenceStdConv2d(3, 64 * width, 7, stride=2, padding=3, bias=False),
            pad=nn.ConstantPad2d(1, 0.0),
            pool=nn.MaxPool2d(3, stride=2),
        ))
        blocks, in_channels = OrderedDict(), 64 * width
        for block, count in enumerate(units, start=1):
            out_channels = 256 * width * 2 ** (block - 1)
            blocks[f"block{block}"] = nn.Sequential(OrderedDict(
                (f"unit{unit:02d}", ReferenceUnit(
                    in_channels if unit == 1 else out_channels, out_channels, out_channels // 4,
                    stride=2 if unit == 1 and block > 1 else 1,
                ))
                for unit in range(1, count + 1)
            ))
            in_channels = out_channels
        self.body = nn.Sequential(blocks)
        self.head = nn.Sequential(OrderedDict(
            gn=nn.GroupNorm(32, in_channels), relu=nn.ReLU(), avg=nn.AdaptiveAvgPool2d(1),
            conv=nn.Conv2d(in_channels, head_size, 1),
        ))

    def forward(self, x):
        return self.head(self.body(self.root(x)))[..., 0, 0]


def reference_to_npz(model: ReferenceResNetV2, path: Path) -> Path:
    """Google's .npz schema, written here independently of bigtransfer's key maps (HWIO kernels)."""

    def hwio(weight):
        return weight.detach().permute(2, 3, 1, 0).numpy()

    arrays = {"resnet/root_block/standardized_conv2d/kernel": hwio(model.root.conv.weight)}
    for block_name, block in model.body.named_children():
        for unit_name, unit in block.named_children():
            prefix = f"resnet/{block_name}/{unit_name}/"
            for part, index in zip("abc", "123", strict=True):
                norm = getattr(unit, f"gn{index}")
                arrays[f"{prefix}{part}/standardized_conv2d/kernel"] = hwio(getattr(unit, f"conv{index}").weight)
                arrays[f"{prefix}{part}/group_norm/gamma"] = norm.weight.detach().numpy()
                arrays[f"{prefix}{part}/group_norm/beta"] = norm.bias.detach().numpy()
            if hasattr(unit, "downsample"):
                arrays[f"{prefix}a/proj/standardized_conv2d/kernel"] = hwio(unit.downsample.weight)
    arrays["resnet/group_norm/gamma"] = model.head.gn.weight.detach().numpy()
    arrays["resnet/group_norm/beta"] = model.head.gn.bias.detach().numpy()
    arrays["resnet/head/conv2d/kernel"] = hwio(model.head.conv.weight)
    arrays["resnet/head/conv2d/bias"] = model.head.conv.bias.detach().numpy()
    np.savez(path, **arrays)
    return path


def randomize(model: nn.Module, seed: int) -> nn.Module:
    """Random GroupNorm affines and head (timm zero-initialises its head; pretrained weights are never trivial)."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for module in model.modules():
            if isinstance(module, nn.GroupNorm):
                module.weight.copy_(1 + 0.2 * torch.randn(module.weight.shape, generator=generator))
                module.bias.copy_(0.1 * torch.randn(module.bias.shape, generator=generator))
            elif isinstance(module, nn.Conv2d):
                module.weight.copy_(torch.randn(module.weight.shape, generator=generator))
                if module.bias is not None:  # only heads have a bias
                    module.weight.mul_(0.05)
                    module.bias.copy_(0.1 * torch.randn(module.bias.shape, generator=generator))
            elif isinstance(module, nn.Linear):
                module.weight.copy_(0.05 * torch.randn(module.weight.shape, generator=generator))
                module.bias.copy_(0.1 * torch.randn(module.bias.shape, generator=generator))
    return model.eval()


def reference(units, width, head_size, seed=0) -> ReferenceResNetV2:
    torch.manual_seed(seed)
    return randomize(ReferenceResNetV2(units, width, head_size), seed)


def timm_bit(layers, width_factor=1, num_classes=1000, seed=0):
    """A timm ResNetV2 built exactly as timm builds `resnetv2_*_bit` (fixed stem, StdConv2d eps 1e-8)."""
    from timm.layers import StdConv2d
    from timm.models.resnetv2 import ResNetV2

    torch.manual_seed(seed)
    model = ResNetV2(
        layers=list(layers), width_factor=width_factor, num_classes=num_classes, stem_type="fixed",
        conv_layer=partial(StdConv2d, eps=1e-8),
    )
    return randomize(model, seed)


def max_difference(model, source, pixels=PIXELS) -> float:
    """Largest |logit difference|, recorded for the end-of-run summary (the README's conversion figure)."""
    return record("converted checkpoints vs their source, |logit difference|", logit_difference(model, source, pixels))


def logit_difference(model, source, pixels=PIXELS) -> float:
    with torch.no_grad():
        ours = model(pixels).logits
        theirs = source(pixels)
    assert ours.shape == theirs.shape
    return (ours - theirs).abs().max().item()


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """One intra-op thread: these small inputs gain nothing from more, and shared CI machines lose a lot."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def timm_r50x1():
    import timm

    torch.manual_seed(0)
    return randomize(timm.create_model("resnetv2_50x1_bit", pretrained=False, num_classes=1000), seed=0)


@pytest.fixture(scope="module")
def timm_r50x1_file(timm_r50x1, tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("timm") / "resnetv2_50x1_bit.goog_in21k_ft_in1k.safetensors"
    save_file({key: value.contiguous() for key, value in timm_r50x1.state_dict().items()}, str(path))
    return path


# ---------------------------------------------------------------------------------------------------------------
# timm state dicts.


def test_timm_r50x1_safetensors_reproduces_timm_logits(timm_r50x1, timm_r50x1_file):
    model = load_checkpoint(timm_r50x1_file)
    config = model.config
    assert (config.depths, config.width_factor, config.num_labels) == ([3, 4, 6, 3], 1, 1000)
    assert config.ws_eps == 1e-8  # timm's StdConv2d eps
    assert max_difference(model, timm_r50x1) < TOLERANCE
    assert model.config.id2label[281] == "tabby, tabby cat"  # a 1000-class head gets ImageNet names


@pytest.mark.slow
@pytest.mark.parametrize("suffix", [".pth", ".bin"])
def test_timm_pickles_width2_inferred(tmp_path, suffix):
    source = timm_bit([1, 1, 2, 1], width_factor=2, num_classes=7, seed=1)
    state = source.state_dict()
    if suffix == ".bin":  # a training checkpoint wrapping a DataParallel state dict
        state = {"state_dict": {"module." + key: value for key, value in state.items()}, "epoch": 3}
    torch.save(state, tmp_path / f"weights{suffix}")
    model = load_checkpoint(tmp_path / f"weights{suffix}")
    config = model.config
    assert (config.depths, config.width_factor, config.embedding_size) == ([1, 1, 2, 1], 2, 128)
    assert config.stage_widths == [512, 1024, 2048, 4096] and config.num_labels == 7
    assert max_difference(model, source) < TOLERANCE


@pytest.fixture(scope="module")
def timm_r101x1():
    import timm

    torch.manual_seed(0)
    return randomize(timm.create_model("resnetv2_101x1_bit", pretrained=False, num_classes=1000), seed=3)


def float64_difference(model, source, pixels) -> float:
    """Max logit difference computed in float64 (on copies), free of float32 rounding."""
    import copy

    with torch.no_grad():
        ours = copy.deepcopy(model).double()(pixels.double()).logits
        theirs = copy.deepcopy(source).double()(pixels.double())
    return (ours - theirs).abs().max().item()


def assert_reproduces(model, source, pixels) -> None:
    """Equal to 1e-4 in float64, and in float32 no further from the exact logits than the source itself is.

    In R101 with random weights, float32 rounding alone moves the source's logits by ~3e-4 from the exact
    (float64) values, so a float32 comparison measures rounding, not conversion.
    """
    import copy

    with torch.no_grad():
        exact = copy.deepcopy(source).double()(pixels.double())
        ours_error = (model(pixels).logits.double() - exact).abs().max().item()
        theirs_error = (source(pixels).double() - exact).abs().max().item()
    assert float64_difference(model, source, pixels) < TOLERANCE
    assert ours_error <= 2 * theirs_error + 1e-5


@pytest.mark.slow
def test_timm_r101x1_depth_inferred(tmp_path, timm_r101x1):
    torch.save(timm_r101x1.state_dict(), tmp_path / "r101.pth")
    model = load_checkpoint(tmp_path / "r101.pth")
    assert (model.config.depths, model.config.width_factor, model.config.num_labels) == ([3, 4, 23, 3], 1, 1000)
    assert_reproduces(model, timm_r101x1, PIXELS[:1, :, :32, :32])


@pytest.mark.slow
def test_timm_r101x1_as_npz_reads_in_timm_and_here(tmp_path, timm_r101x1):
    import timm

    path = save_npz(keymaps.to_transformers(timm_r101x1.state_dict(), keymaps.TIMM), tmp_path / "BiT-S-R101x1.npz")
    reloaded = timm.create_model("resnetv2_101x1_bit", pretrained=False, num_classes=1000).eval()
    reloaded.load_pretrained(str(path))  # timm's own .npz loader
    assert all(torch.equal(reloaded.state_dict()[key], value) for key, value in timm_r101x1.state_dict().items())
    model = load_checkpoint(path)
    assert model.config.ws_eps == 1e-10 and model.config.depths == [3, 4, 23, 3]
    assert_reproduces(model, timm_r101x1, PIXELS[:1, :, :32, :32])


# ---------------------------------------------------------------------------------------------------------------
# Google .npz files.


def test_npz_from_timm_r50x1_is_read_by_timm_and_matches_the_original_code(tmp_path, timm_r50x1):
    import timm

    path = save_npz(keymaps.to_transformers(timm_r50x1.state_dict(), keymaps.TIMM), tmp_path / "BiT-S-R50x1.npz")
    reloaded = timm.create_model("resnetv2_50x1_bit", pretrained=False, num_classes=1000).eval()
    reloaded.load_pretrained(str(path))  # timm's _load_weights for Google's files
    assert all(torch.equal(reloaded.state_dict()[key], value) for key, value in timm_r50x1.state_dict().items())

    model = load_checkpoint(path)
    assert model.config.ws_eps == 1e-10 and model.config.depths == [3, 4, 6, 3]
    original = ReferenceResNetV2([3, 4, 6, 3], 1, 1000).eval()
    original.load_state_dict(to_big_transfer(model))  # the original code's naming, read from the .npz here
    assert max_difference(model, original) < TOLERANCE
    assert max_difference(model, timm_r50x1) < TOLERANCE


@pytest.mark.slow
def test_npz_written_from_the_original_model_width2(tmp_path):
    import timm.models.resnetv2 as timm_resnetv2

    source = reference([2, 1, 1, 1], width=2, head_size=218, seed=4)
    path = reference_to_npz(source, tmp_path / "BiT-M-R-custom.npz")
    model = load_checkpoint(path)
    assert (model.config.depths, model.config.width_factor) == ([2, 1, 1, 1], 2)
    assert max_difference(model, source) < TOLERANCE

    # timm reads the independently written file into a model that agrees too.
    theirs = timm_bit([2, 1, 1, 1], width_factor=2, num_classes=218, seed=9)
    timm_resnetv2._load_weights(theirs, str(path))
    assert max_difference(model, theirs.eval()) < TOLERANCE


def test_npz_standardized_conv2d_n_naming_quirk(tmp_path):
    source = reference([1, 1, 1, 1], width=1, head_size=5, seed=5)
    path = reference_to_npz(source, tmp_path / "plain.npz")
    arrays = dict(np.load(path))
    quirky, counter = {}, 0
    for key, value in arrays.items():
        if key.endswith("standardized_conv2d/kernel") and "root_block" not in key:
            counter += 1
            key = key.replace("standardized_conv2d/", f"standardized_conv2d_{counter}/")
        quirky[key] = value
    np.savez(tmp_path / "quirky.npz", **quirky)
    plain, renamed = read_checkpoint(path), read_checkpoint(tmp_path / "quirky.npz")
    assert plain.state.keys() == renamed.state.keys()
    assert all(torch.equal(plain.state[key], renamed.state[key]) for key in plain.state)
    assert max_difference(load_checkpoint(tmp_path / "quirky.npz"), source) < TOLERANCE


def test_ws_eps_comes_from_the_source(tmp_path):
    """With a nearly constant filter the eps decides the output: 1e-10 reproduces the original code, 1e-8 does not."""
    source = reference([1, 1, 1, 1], width=1, head_size=10, seed=6)
    with torch.no_grad():
        conv = source.body.block2.unit01.conv2
        conv.weight.mul_(1e-5)  # per-filter variance ~1e-10, comparable to the eps
    path = reference_to_npz(source, tmp_path / "tiny-variance.npz")
    model = load_checkpoint(path)
    assert model.config.ws_eps == 1e-10
    assert max_difference(model, source) < TOLERANCE
    wrong_eps = load_checkpoint(path, ws_eps=1e-8)
    assert logit_difference(wrong_eps, source) > 1e-2  # the control: not a parity figure


# ---------------------------------------------------------------------------------------------------------------
# The original big_transfer PyTorch naming.


def test_big_transfer_training_checkpoint_r50x1(tmp_path):
    source = reference([3, 4, 6, 3], width=1, head_size=100, seed=7)
    # The original train.py saves {"step", "model" (a DataParallel state dict), "optim"}.
    optimizer = torch.optim.SGD(source.parameters(), lr=0.003, momentum=0.9)
    wrapped = {"module." + key: value for key, value in source.state_dict().items()}
    torch.save({"step": 500, "model": wrapped, "optim": optimizer.state_dict()}, tmp_path / "bit.pth.tar")
    model = load_checkpoint(tmp_path / "bit.pth.tar")
    assert (model.config.depths, model.config.width_factor, model.config.num_labels) == ([3, 4, 6, 3], 1, 100)
    assert model.config.ws_eps == 1e-10
    assert max_difference(model, source) < TOLERANCE


def test_big_transfer_safetensors_width2(tmp_path):
    source = reference([1, 2, 1, 1], width=2, head_size=3, seed=8)
    save_file(source.state_dict(), str(tmp_path / "bit.safetensors"))
    model = load_checkpoint(tmp_path / "bit.safetensors")
    assert (model.config.depths, model.config.width_factor) == ([1, 2, 1, 1], 2)
    assert max_difference(model, source) < TOLERANCE


# ---------------------------------------------------------------------------------------------------------------
# Writers and round trips.


def small_model(num_labels=5, width_factor=1, seed=10, depths=(1, 1, 2, 1)) -> BitForImageClassification:
    torch.manual_seed(seed)
    config = BitConfig(depths=list(depths), width_factor=width_factor, embedding_size=64 * width_factor, num_labels=num_labels)
    return randomize(BitForImageClassification(config), seed)


def assert_same_state(actual: dict, expected: dict) -> None:
    assert actual.keys() == expected.keys()
    for key, value in expected.items():
        assert actual[key].dtype == value.dtype and torch.equal(actual[key], value), key


def test_round_trips_are_lossless(tmp_path):
    model = small_model()
    state = model.state_dict()
    assert_same_state(keymaps.to_transformers(to_timm(model), keymaps.TIMM), state)
    google = {key: torch.from_numpy(value) for key, value in to_google(model).items()}
    assert_same_state(keymaps.to_transformers(google, keymaps.GOOGLE), state)
    assert_same_state(keymaps.to_transformers(to_big_transfer(model), keymaps.BIG_TRANSFER), state)
    # Through files, and back from each format's own naming.
    for path in (
        save_timm(model, tmp_path / "timm.safetensors"), save_timm(model, tmp_path / "timm.pth"),
        save_npz(model, tmp_path / "google.npz"), save_big_transfer(model, tmp_path / "original.pth"),
    ):
        assert_same_state(read_checkpoint(path).state, state)
    timm_state = to_timm(model)
    assert_same_state(to_timm(keymaps.to_transformers(timm_state)), timm_state)


@pytest.mark.slow
def test_fine_tuned_model_goes_back_to_timm_and_npz(tmp_path):
    from safetensors.torch import load_file
    from timm.models.resnetv2 import _load_weights

    model = small_model(num_labels=4, width_factor=2, depths=[1, 1, 1, 1])
    save_timm(model, tmp_path / "fine-tuned.safetensors")
    theirs = timm_bit([1, 1, 1, 1], width_factor=2, num_classes=4, seed=99)
    theirs.load_state_dict(load_file(str(tmp_path / "fine-tuned.safetensors")), strict=True)
    assert max_difference(model, theirs) < TOLERANCE
    other = timm_bit([1, 1, 1, 1], width_factor=2, num_classes=4, seed=98)
    _load_weights(other, str(save_npz(model, tmp_path / "fine-tuned.npz")))
    assert max_difference(model, other) < TOLERANCE


# ---------------------------------------------------------------------------------------------------------------
# Strict loading: every problem is reported, in the source's own names.


def test_missing_unexpected_and_misshapen_keys_are_named(tmp_path):
    state = timm_bit([1, 1, 1, 1], num_classes=3).state_dict()
    missing = {key: value for key, value in state.items() if key != "stages.1.blocks.0.conv2.weight"}
    torch.save(missing, tmp_path / "missing.pth")
    with pytest.raises(CheckpointError, match=r"missing keys \['stages\.1\.blocks\.0\.conv2\.weight"):
        load_checkpoint(tmp_path / "missing.pth")

    torch.save({**state, "stages.0.blocks.0.extra.weight": torch.zeros(1)}, tmp_path / "unexpected.pth")
    with pytest.raises(CheckpointError, match=r"unexpected keys.*stages\.0\.blocks\.0\.extra\.weight"):
        load_checkpoint(tmp_path / "unexpected.pth")

    torch.save({**state, "stages.0.blocks.0.conv2.weight": torch.zeros(64, 64, 1, 1)}, tmp_path / "shape.pth")
    with pytest.raises(CheckpointError, match=r"stages\.0\.blocks\.0\.conv2\.weight.*\(64, 64, 1, 1\).*\(64, 64, 3, 3\)"):
        load_checkpoint(tmp_path / "shape.pth")


def test_non_bit_checkpoints_are_refused(tmp_path):
    import timm

    torch.save(timm.create_model("resnetv2_50", pretrained=False).state_dict(), tmp_path / "batchnorm.pth")
    with pytest.raises(CheckpointError, match="running_mean"):
        load_checkpoint(tmp_path / "batchnorm.pth")
    torch.save({"features.0.weight": torch.zeros(3)}, tmp_path / "other.pth")
    with pytest.raises(CheckpointError, match="no known BiT naming"):
        load_checkpoint(tmp_path / "other.pth")
    (tmp_path / "text.bin").write_text("not weights")
    with pytest.raises(CheckpointError, match="not a safetensors, torch.save or .npz"):
        load_checkpoint(tmp_path / "text.bin")


class _RunsCode:
    """Unpickling this creates a directory: the side effect a refused pickle must not have."""

    def __init__(self, marker: Path):
        self.marker = str(marker)

    def __reduce__(self):
        return (os.makedirs, (self.marker,))


def test_malicious_pickles_are_refused_without_side_effects(tmp_path, capsys):
    marker = tmp_path / "pwned"
    torch.save({"stem.conv.weight": torch.zeros(1), "payload": _RunsCode(marker)}, tmp_path / "evil.pth")
    with open(tmp_path / "evil-legacy.bin", "wb") as handle:
        pickle.dump({"payload": _RunsCode(marker)}, handle, protocol=2)
    np.savez(tmp_path / "evil.npz", payload=np.array([_RunsCode(marker)], dtype=object))
    for name in ("evil.pth", "evil-legacy.bin", "evil.npz"):
        with pytest.raises(UnsafeCheckpointError, match="refused"):
            load_checkpoint(tmp_path / name)
        assert not marker.exists()

    assert main(["convert", str(tmp_path / "evil.pth"), str(tmp_path / "out")]) == 2
    assert "refused" in capsys.readouterr().err
    assert not marker.exists() and not (tmp_path / "out").exists()


def test_file_kind_comes_from_the_bytes(tmp_path, timm_r50x1_file):
    (tmp_path / "weights.pth").write_bytes(timm_r50x1_file.read_bytes())
    assert file_kind(tmp_path / "weights.pth") == "safetensors"
    with open(tmp_path / "arrays.bin", "wb") as handle:
        np.savez(handle, a=np.zeros(2))
    assert file_kind(tmp_path / "arrays.bin") == "npz" and list(read_npz(tmp_path / "arrays.bin")) == ["a"]


# ---------------------------------------------------------------------------------------------------------------
# `bigtransfer convert`.


@pytest.mark.slow
def test_convert_timm_writes_a_directory_transformers_loads(tmp_path, capsys, timm_r50x1, timm_r50x1_file):
    import transformers

    out = tmp_path / "converted"
    assert main(["convert", str(timm_r50x1_file), str(out)]) == 0
    printed = capsys.readouterr().out
    assert "format:        timm (safetensors)" in printed
    assert "variant:       R50x1" in printed and "1000 classes" in printed and "25,549,352" in printed
    assert sorted(p.name for p in out.iterdir()) == ["config.json", "model.safetensors", "preprocessor_config.json"]
    preprocessor = json.loads((out / "preprocessor_config.json").read_text())
    assert preprocessor["size"] == {"shortest_edge": 448} and preprocessor["crop_size"] == {"height": 448, "width": 448}
    assert preprocessor["resample"] == 2 and preprocessor["image_mean"] == [0.5] * 3 and preprocessor["do_center_crop"]

    theirs = transformers.BitForImageClassification.from_pretrained(out).eval()
    with torch.no_grad():
        difference = (theirs(PIXELS).logits - timm_r50x1(PIXELS)).abs().max().item()
    assert difference < TOLERANCE
    assert theirs.config.id2label[281] == "tabby, tabby cat"
    processor = transformers.BitImageProcessor.from_pretrained(out)
    assert processor.crop_size["height"] == 448


@pytest.mark.slow
def test_convert_npz_and_big_transfer_and_transformers_directories(tmp_path, capsys):
    import transformers

    source = reference([1, 1, 2, 1], width=1, head_size=12, seed=11)
    npz = reference_to_npz(source, tmp_path / "BiT-M-R-small.npz")
    assert main(["convert", str(npz), str(tmp_path / "from-npz")]) == 0
    printed = capsys.readouterr().out
    assert "Google BiT .npz (npz)" in printed and "12 classes" in printed and "ws eps:        1e-10" in printed
    preprocessor = json.loads((tmp_path / "from-npz" / "preprocessor_config.json").read_text())
    assert preprocessor["size"] == {"height": 224, "width": 224} and not preprocessor["do_center_crop"]
    assert preprocessor["image_std"] == [0.5] * 3
    ours = BitForImageClassification.from_pretrained(tmp_path / "from-npz")
    assert ours.config.ws_eps == 1e-10 and max_difference(ours, source) < TOLERANCE
    theirs = transformers.BitForImageClassification.from_pretrained(tmp_path / "from-npz").eval()
    with torch.no_grad():
        assert (theirs(PIXELS).logits - source(PIXELS)).abs().max().item() < TOLERANCE

    torch.save(source.state_dict(), tmp_path / "original.pth")
    assert main(["convert", str(tmp_path / "original.pth"), str(tmp_path / "from-original"), "--image-size", "128"]) == 0
    assert "original big_transfer PyTorch (torch pickle)" in capsys.readouterr().out
    preprocessor = json.loads((tmp_path / "from-original" / "preprocessor_config.json").read_text())
    assert preprocessor["size"] == {"height": 128, "width": 128}
    assert max_difference(BitForImageClassification.from_pretrained(tmp_path / "from-original"), source) < TOLERANCE

    assert main(["convert", str(tmp_path / "from-npz"), str(tmp_path / "again")]) == 0
    assert "transformers (directory)" in capsys.readouterr().out
    assert json.loads((tmp_path / "again" / "preprocessor_config.json").read_text()) == json.loads(
        (tmp_path / "from-npz" / "preprocessor_config.json").read_text()
    )
    assert max_difference(BitForImageClassification.from_pretrained(tmp_path / "again"), source) < TOLERANCE


def test_convert_new_head_and_labels(tmp_path, capsys):
    source = reference([1, 1, 1, 1], width=1, head_size=1000, seed=12)
    npz = reference_to_npz(source, tmp_path / "BiT-S-R-small-ILSVRC2012.npz")
    assert main(["convert", str(npz), str(tmp_path / "ten"), "--num-labels", "10"]) == 0
    assert "10 classes" in capsys.readouterr().out
    model = BitForImageClassification.from_pretrained(tmp_path / "ten")
    assert model.config.num_labels == 10 and not model.classifier[1].weight.any() and not model.classifier[1].bias.any()

    (tmp_path / "labels.txt").write_text("cat\ndog\nbird\n\n")
    assert main(["convert", str(npz), str(tmp_path / "three"), "--labels", str(tmp_path / "labels.txt")]) == 0
    model = BitForImageClassification.from_pretrained(tmp_path / "three")
    assert model.config.id2label == {0: "cat", 1: "dog", 2: "bird"}
    assert main(["convert", str(npz), str(tmp_path / "x"), "--labels", str(tmp_path / "labels.txt"), "--num-labels", "4"]) == 2
    assert "num_labels=4 but 3 labels" in capsys.readouterr().err

    kept = load_checkpoint(npz)  # the checkpoint's own 1000-class head, named after ImageNet
    assert kept.config.id2label[0] == "tench, Tinca tinca" and max_difference(kept, source) < TOLERANCE


def test_backbone_and_base_model_from_any_format(tmp_path):
    source = reference([1, 1, 1, 1], width=1, head_size=6, seed=13)
    npz = reference_to_npz(source, tmp_path / "small.npz")
    backbone = load_checkpoint(npz, BitBackbone, out_features=["stage2", "stage4"])
    with torch.no_grad():
        maps = backbone(PIXELS).feature_maps
    assert [tuple(m.shape[1:]) for m in maps] == [(512, 8, 8), (2048, 2, 2)]


# ---------------------------------------------------------------------------------------------------------------
# Preprocessing and labels.


def test_preprocessing_follows_the_source():
    assert timm_preprocessing("resnetv2_50x1_bit.goog_in21k", 21843, "R50x1").to_preprocessor_config()["size"] == {
        "shortest_edge": 256
    }
    assert timm_preprocessing("x.safetensors", 1000, "R152x4").image_size == 480
    distilled = timm_preprocessing("resnetv2_50x1_bit.goog_distilled_in1k.bin", 1000, "R50x1")
    assert (distilled.image_size, distilled.resample, distilled.crop_pct) == (224, "bicubic", 0.875)
    assert original_preprocessing("BiT-M-R50x1.npz", 21843).image_size == 224
    assert original_preprocessing("BiT-M-R50x1-ILSVRC2012.npz", 1000).image_size == 480
    assert original_preprocessing("BiT-S-R50x1.npz", 1000).image_size == 224
    assert original_preprocessing("distill/R50x1_160.npz", 1000).image_size == 160
    config = original_preprocessing("BiT-M-R50x1-ILSVRC2012.npz", 1000).to_preprocessor_config()
    assert config["size"] == {"height": 480, "width": 480} and config["do_center_crop"] is False
    assert config["image_mean"] == (0.5,) * 3 and config["rescale_factor"] == 1 / 255


def test_imagenet21k_labels_follow_timm_and_reach_converted_21k_heads(tmp_path):
    from timm.data import ImageNetInfo

    info = ImageNetInfo("imagenet-21k-goog")  # Google's class order, as timm's goog_in21k heads use it
    labels = imagenet21k_labels()
    assert len(labels) == 21843 == len(set(labels))
    for index, label in enumerate(labels):
        lemma = info.index_to_description(index)
        assert label in (lemma, f"{lemma} ({info.index_to_label_name(index)})"), index
    torch.manual_seed(0)
    config = BitConfig(embedding_size=32, hidden_sizes=[128, 256, 512, 1024], depths=[1, 1, 1, 1], num_labels=21843)
    save_timm(BitForImageClassification(config), tmp_path / "in21k.safetensors")
    id2label = load_checkpoint(tmp_path / "in21k.safetensors").config.id2label
    assert id2label[2397] == "tabby, tabby cat" and id2label == dict(enumerate(labels))


def test_imagenet_labels_and_labels_files(tmp_path):
    labels = imagenet_labels()
    assert len(labels) == 1000 and all(labels) and labels[0] == "tench, Tinca tinca"
    assert labels[999] == "toilet tissue, toilet paper, bathroom tissue"
    (tmp_path / "excel.txt").write_bytes("cat\r\ndog\r\n".encode("utf-8-sig"))  # a byte-order mark, CRLF
    assert read_labels(tmp_path / "excel.txt") == ["cat", "dog"]
    (tmp_path / "bad.txt").write_text("a\n\nb\n")
    with pytest.raises(ValueError, match="line 2 is empty"):
        read_labels(tmp_path / "bad.txt")
