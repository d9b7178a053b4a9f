"""Hub names and Google downloads, with no network: huggingface_hub and the HTTP transport are replaced by
local files, and offline behaviour runs the real huggingface_hub against a cache built on disk."""

from __future__ import annotations

import hashlib
import json
import logging
import urllib.error
from pathlib import Path

import numpy as np
import pytest
import torch

from bigtransfer import (
    BitConfig,
    BitForImageClassification,
    BitImageProcessor,
    CheckpointError,
    checkpoints,
    hub,
    load_checkpoint,
)
from bigtransfer.checkpoints import save_npz, save_timm
from bigtransfer.cli import main
from conftest import FakeHub, FakeTransport

PIXELS = torch.randn(1, 3, 64, 64, generator=torch.Generator().manual_seed(2))
COMMIT = "0123456789abcdef0123456789abcdef01234567"


@pytest.fixture(autouse=True)
def isolated_cache(tmp_path, monkeypatch):
    """Every test gets its own hub cache and starts online (as far as the environment says)."""
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hub-cache"))
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.delenv("TRANSFORMERS_OFFLINE", raising=False)
    return tmp_path / "hub-cache"


def small_model(num_labels=3, seed=0) -> BitForImageClassification:
    torch.manual_seed(seed)
    model = BitForImageClassification(BitConfig(depths=[1, 1, 1, 1], num_labels=num_labels))
    with torch.no_grad():
        model.classifier[1].weight.normal_(std=0.05)
        model.classifier[1].bias.normal_(std=0.1)
        for name, parameter in model.named_parameters():
            if "norm" in name:
                parameter.add_(0.1 * torch.randn_like(parameter))
    return model.eval()


def logits(model) -> torch.Tensor:
    with torch.no_grad():
        output = model(PIXELS)
    return output.logits if hasattr(output, "logits") else output


def one_sentence(message: str) -> bool:
    return "\n" not in message and message.endswith(".") and ". " not in message


# ---------------------------------------------------------------------------------------------------------------
# Hugging Face Hub: a fake `hf_hub_download` serving local repositories.


@pytest.fixture
def fake_hub(monkeypatch):
    import huggingface_hub

    def install(repos, network=True):
        fake = FakeHub(repos, network)
        monkeypatch.setattr(huggingface_hub, "hf_hub_download", fake)
        return fake

    return install


def test_transformers_repository_name_resolves(tmp_path, fake_hub):
    source = small_model()
    source.save_pretrained(tmp_path / "bit-50")
    fake = fake_hub({"google/bit-50": tmp_path / "bit-50"})
    model = BitForImageClassification.from_pretrained("google/bit-50")
    assert torch.equal(logits(model), logits(source))
    assert [call[1] for call in fake.calls] == ["config.json", "model.safetensors", "preprocessor_config.json"]
    assert not any(call[2] for call in fake.calls)  # online: the cache is not forced
    assert torch.equal(logits(load_checkpoint("google/bit-50")), logits(source))


def test_the_processor_loads_from_a_hub_name_as_the_readme_shows(tmp_path, fake_hub):
    small_model().save_pretrained(tmp_path / "bit-50")
    BitImageProcessor(size={"shortest_edge": 256}, crop_size=240).save_pretrained(tmp_path / "bit-50")
    fake = fake_hub({"google/bit-50": tmp_path / "bit-50"})
    processor = BitImageProcessor.from_pretrained("google/bit-50", revision="v2")
    assert processor.size == {"shortest_edge": 256} and processor.crop_size == {"height": 240, "width": 240}
    assert fake.calls[-1][:2] == ("google/bit-50", "preprocessor_config.json") and fake.revisions[-1] == "v2"
    with pytest.raises(OSError, match="someone/empty has no preprocessor_config.json"):
        (tmp_path / "empty").mkdir()
        fake_hub({"someone/empty": tmp_path / "empty"})
        BitImageProcessor.from_pretrained("someone/empty")


def test_revision_and_dtype_reach_a_hub_load(tmp_path, fake_hub):
    small_model().save_pretrained(tmp_path / "bit-50")
    fake = fake_hub({"google/bit-50": tmp_path / "bit-50"})
    model = BitForImageClassification.from_pretrained("google/bit-50", revision="v2.0", dtype="bfloat16")
    assert set(fake.revisions) == {"v2.0"}
    assert model.dtype == torch.bfloat16


def timm_repository(directory: Path, model: BitForImageClassification, tag="goog_in21k_ft_in1k") -> Path:
    """What a timm hub repository holds: config.json with `architecture` and `pretrained_cfg`, and weights."""
    directory.mkdir(parents=True)
    save_timm(model, directory / "model.safetensors")
    config = {
        "architecture": "resnetv2_50x1_bit",
        "num_classes": model.config.num_labels,
        "num_features": model.config.num_features,
        "pretrained_cfg": {
            "tag": tag, "input_size": [3, 448, 448], "interpolation": "bilinear", "crop_pct": 1.0,
            "crop_mode": "center", "mean": [0.5, 0.5, 0.5], "std": [0.5, 0.5, 0.5], "num_classes": 3,
        },
        "label_names": ["red", "green", "blue"],
    }
    (directory / "config.json").write_text(json.dumps(config))
    return directory


def test_timm_repository_name_loads_as_published(tmp_path, fake_hub, isolated_cache):
    source = small_model()
    name = "timm/resnetv2_50x1_bit.goog_in21k_ft_in1k"
    fake_hub({name: timm_repository(tmp_path / "timm-repo", source)})
    model = BitForImageClassification.from_pretrained(name)
    assert torch.allclose(logits(model), logits(source), atol=1e-6)
    assert model.config.ws_eps == 1e-8 and model.config.id2label == {0: "red", 1: "green", 2: "blue"}
    preprocessor = checkpoints.read(name).preprocessor_dict()  # timm's pretrained_cfg, read from the snapshot
    assert preprocessor["size"] == {"shortest_edge": 448} and preprocessor["resample"] == 2
    assert not (isolated_cache / "bigtransfer").exists()  # nothing converted or copied into the cache


def test_cli_converts_a_timm_hub_name(tmp_path, fake_hub, capsys):
    name = "timm/resnetv2_50x1_bit.goog_in21k_ft_in1k"
    fake_hub({name: timm_repository(tmp_path / "timm-repo", small_model())})
    assert main(["convert", name, str(tmp_path / "out")]) == 0
    printed = capsys.readouterr().out
    assert "timm (directory)" in printed and "timm goog_in21k_ft_in1k config" in printed


def test_no_network_fails_with_one_sentence(tmp_path, fake_hub, isolated_cache):
    fake_hub({}, network=False)
    with pytest.raises(ConnectionError) as caught:
        BitForImageClassification.from_pretrained("google/bit-50")
    message = str(caught.value)
    assert one_sentence(message) and "google/bit-50" in message and str(isolated_cache) in message


def test_offline_mode_uses_only_the_cache(tmp_path, fake_hub, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    fake = fake_hub({"google/bit-50": tmp_path})
    with pytest.raises(OSError) as caught:
        load_checkpoint("google/bit-50")
    assert fake.calls and all(call[2] for call in fake.calls)  # local_files_only=True on every call
    assert one_sentence(str(caught.value)) and "HF_HUB_OFFLINE" in str(caught.value)


def test_offline_mode_loads_from_a_real_huggingface_cache(tmp_path, isolated_cache, monkeypatch):
    """The real huggingface_hub, offline, reading a cache laid out as it lays one out."""
    source = small_model(seed=1)
    repo = isolated_cache / "models--google--bit-50"
    source.save_pretrained(repo / "snapshots" / COMMIT)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(COMMIT)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    model = BitForImageClassification.from_pretrained("google/bit-50")
    assert torch.equal(logits(model), logits(source))
    with pytest.raises(OSError) as caught:
        BitForImageClassification.from_pretrained("google/bit-101")
    assert one_sentence(str(caught.value)) and "HF_HUB_OFFLINE" in str(caught.value)


def test_missing_huggingface_hub_says_how_to_install(monkeypatch):
    import sys

    monkeypatch.setitem(sys.modules, "huggingface_hub", None)
    with pytest.raises(ImportError, match=r"pip install 'bigtransfer\[hub\]'"):
        BitForImageClassification.from_pretrained("google/bit-50")


def test_repository_without_weights(tmp_path, fake_hub):
    (tmp_path / "empty").mkdir()
    (tmp_path / "empty" / "config.json").write_text("{}")
    fake_hub({"someone/empty": tmp_path / "empty"})
    with pytest.raises(CheckpointError, match="no model.safetensors or pytorch_model.bin"):
        BitForImageClassification.from_pretrained("someone/empty")


# ---------------------------------------------------------------------------------------------------------------
# Google's storage.googleapis.com/bit_models files, through a fake transport.


@pytest.fixture
def google_file(tmp_path) -> tuple[Path, BitForImageClassification]:
    source = small_model(num_labels=5, seed=2)
    return save_npz(source, tmp_path / "served.npz"), source


def test_google_name_downloads_with_progress_and_a_checked_record(google_file, monkeypatch, capsys, isolated_cache):
    served, source = google_file
    transport = FakeTransport(served)
    monkeypatch.setattr(hub, "_open_url", transport)
    model = load_checkpoint("BiT-M-R50x1")
    assert transport.urls == ["https://storage.googleapis.com/bit_models/BiT-M-R50x1.npz"]
    assert "BiT-M-R50x1.npz" in capsys.readouterr().err  # the progress bar
    cached = isolated_cache / "bit_models" / "BiT-M-R50x1.npz"
    record = json.loads(cached.with_name("BiT-M-R50x1.npz.json").read_text())
    assert record["size"] == served.stat().st_size
    assert record["sha256"] == hashlib.sha256(served.read_bytes()).hexdigest()
    assert model.config.ws_eps == 1e-10
    assert torch.allclose(logits(model), logits(source), atol=1e-4)

    load_checkpoint("bit-m-r50x1.npz")  # any case, .npz optional: served from the cache
    assert len(transport.urls) == 1


def test_corrupted_cache_is_detected(google_file, monkeypatch, caplog):
    served, _ = google_file
    transport = FakeTransport(served)
    monkeypatch.setattr(hub, "_open_url", transport)
    cached = hub.download_google("BiT-S-R101x3-ILSVRC2012")
    data = bytearray(cached.read_bytes())
    data[len(data) // 2] ^= 0xFF
    cached.write_bytes(bytes(data))

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(CheckpointError, match="corrupted.*SHA-256"):
        hub.download_google("BiT-S-R101x3-ILSVRC2012")
    monkeypatch.delenv("HF_HUB_OFFLINE")
    with caplog.at_level(logging.WARNING, logger="bigtransfer"):
        again = hub.download_google("BiT-S-R101x3-ILSVRC2012", progress=False)
    assert "corrupted" in caplog.text and len(transport.urls) == 2
    assert again.read_bytes() == served.read_bytes()


@pytest.mark.parametrize("problem", ["truncated", "wrong_md5"])
def test_bad_downloads_leave_nothing_in_the_cache(google_file, monkeypatch, isolated_cache, problem):
    served, _ = google_file
    transport = FakeTransport(served, truncate=100 if problem == "truncated" else 0, wrong_md5=problem == "wrong_md5")
    monkeypatch.setattr(hub, "_open_url", transport)
    with pytest.raises(CheckpointError, match="stopped after|MD5"):
        hub.download_google("distill/R50x1_224", progress=False)
    folder = isolated_cache / "bit_models" / "distill"
    assert not folder.exists() or not any(folder.iterdir())


def test_google_download_without_network_or_offline(monkeypatch, isolated_cache):
    def unreachable(url, timeout=None):
        raise urllib.error.URLError("[Errno -2] Name or service not known")

    monkeypatch.setattr(hub, "_open_url", unreachable)
    with pytest.raises(ConnectionError) as caught:
        load_checkpoint("BiT-M-R152x4")
    assert one_sentence(str(caught.value)) and "no network connection" in str(caught.value)

    monkeypatch.setenv("HF_HUB_OFFLINE", "true")
    with pytest.raises(OSError) as caught:
        load_checkpoint("BiT-M-R152x4")
    assert one_sentence(str(caught.value)) and "HF_HUB_OFFLINE" in str(caught.value)


def test_google_names():
    assert len(hub.GOOGLE_FILES) == 2 * 6 * 2 + 4
    assert hub.google_file("https://storage.googleapis.com/bit_models/BiT-S-R50x1.npz") == "BiT-S-R50x1.npz"
    assert hub.google_file("gs://bit_models/distill/R50x1_160.npz") == "distill/R50x1_160.npz"
    assert hub.google_file("BiT-X-R50x1") is None
    with pytest.raises(ValueError, match="unknown Google BiT checkpoint"):
        hub.download_google("BiT-X-R50x1")
    with pytest.raises(OSError, match="no such file or directory"):
        load_checkpoint("no-such-file.npz")


@pytest.mark.slow
def test_cli_converts_a_google_name(google_file, monkeypatch, capsys, tmp_path):
    served, source = google_file
    monkeypatch.setattr(hub, "_open_url", FakeTransport(served))
    assert main(["convert", "BiT-M-R50x1-ILSVRC2012", str(tmp_path / "out")]) == 0
    printed = capsys.readouterr().out
    assert "Google BiT .npz (npz)" in printed and "squash to 480x480" in printed
    model = BitForImageClassification.from_pretrained(tmp_path / "out")
    assert np.allclose(logits(model).numpy(), logits(source).numpy(), atol=1e-4)
