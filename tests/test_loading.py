"""One loading path: every kind of source loads through `from_pretrained` on every model class with one model
built and one strict load, and every variant of the table round-trips through every writer.

Hub and Google names are served from local files (huggingface_hub and the HTTP transport are replaced)."""

from __future__ import annotations

import json

import pytest
import torch

from bigtransfer import (
    VARIANTS,
    BitBackbone,
    BitConfig,
    BitForImageClassification,
    BitModel,
    checkpoints,
    hub,
)
from bigtransfer.checkpoints import keymaps, save_big_transfer, save_npz, save_timm
from conftest import FakeHub, FakeTransport, relative_error

CLASSES = (BitForImageClassification, BitModel, BitBackbone)
PIXELS = torch.randn(2, 3, 64, 64, generator=torch.Generator().manual_seed(4))


@pytest.fixture(autouse=True)
def isolated_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hub-cache"))
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)


def tiny_model(seed: int = 0) -> BitForImageClassification:
    """The package's `tiny` variant (8 GroupNorm groups, which no checkpoint format but ours stores)."""
    torch.manual_seed(seed)
    model = BitForImageClassification(BitConfig.from_variant("tiny", num_labels=3)).eval()
    with torch.no_grad():
        for name, parameter in model.named_parameters():
            if "norm" in name or "classifier" in name:
                parameter.add_(0.1 * torch.randn_like(parameter))
    return model


def timm_snapshot(directory, model):
    directory.mkdir(parents=True)
    save_timm(model, directory / "model.safetensors")
    config = {"architecture": "resnetv2_50x1_bit", "num_classes": 3,
              "pretrained_cfg": {"tag": "goog_in21k", "input_size": [3, 224, 224], "crop_pct": 0.875}}
    (directory / "config.json").write_text(json.dumps(config))
    return directory


def sources(tmp_path, monkeypatch, model):
    """name -> what to pass to from_pretrained, one of every kind."""
    import huggingface_hub

    model.save_pretrained(tmp_path / "transformers")
    files = {
        "transformers directory": tmp_path / "transformers",
        "timm snapshot directory": timm_snapshot(tmp_path / "timm-dir", model),
        "timm .safetensors": save_timm(model, tmp_path / "timm.safetensors"),
        "timm .pth": save_timm(model, tmp_path / "timm.pth"),
        "Google .npz": save_npz(model, tmp_path / "google.npz"),
        "original .pth": save_big_transfer(model, tmp_path / "original.pth"),
        "original .safetensors": save_big_transfer(model, tmp_path / "original.safetensors"),
        "transformers state dict": tmp_path / "transformers" / "model.safetensors",
    }
    monkeypatch.setattr(huggingface_hub, "hf_hub_download", FakeHub({"timm/resnetv2_tiny_bit.test": tmp_path / "timm-dir"}))
    monkeypatch.setattr(hub, "_open_url", FakeTransport(files["Google .npz"]))
    files["timm Hub name"] = "timm/resnetv2_tiny_bit.test"
    files["Google name"] = "BiT-M-R50x1"
    return files


class Counter:
    """Counts the models of one class built, and the strict loads into them."""

    def __init__(self, monkeypatch, model_class):
        self.built = self.loaded = 0
        original_init, original_load = model_class.__init__, torch.nn.Module.load_state_dict

        def init(model, *args, **kwargs):
            self.built += type(model) is model_class
            original_init(model, *args, **kwargs)

        def load_state_dict(module, state, strict=True, **kwargs):
            if type(module) is model_class:
                assert strict, "the one load is strict"
                self.loaded += 1
            return original_load(module, state, strict=strict, **kwargs)

        monkeypatch.setattr(model_class, "__init__", init)
        monkeypatch.setattr(torch.nn.Module, "load_state_dict", load_state_dict)


@pytest.mark.slow
@pytest.mark.parametrize("model_class", CLASSES, ids=lambda cls: cls.__name__)
def test_every_source_loads_on_every_class_with_one_build_and_one_strict_load(tmp_path, monkeypatch, model_class):
    model = tiny_model()
    with torch.no_grad():
        expected = model.bit(PIXELS, output_hidden_states=True)
    for name, source in sources(tmp_path, monkeypatch, model).items():
        with monkeypatch.context() as patch:
            counter = Counter(patch, model_class)
            loaded = model_class.from_pretrained(source)
        assert (counter.built, counter.loaded) == (1, 1), name
        assert loaded.config.num_groups == 8, name
        with torch.no_grad():
            output = loaded(PIXELS)
            if model_class is BitForImageClassification:
                got, want = output.logits, model(PIXELS).logits
            elif model_class is BitModel:
                got, want = output.pooler_output, expected.pooler_output
            else:
                got, want = output.feature_maps[-1], expected.hidden_states[-1]
        assert relative_error(got, want) < 1e-5, name  # .npz and the original code: WS eps 1e-10, not 1e-8


def test_a_local_timm_snapshot_directory_loads_everywhere(tmp_path):
    model = tiny_model()
    directory = timm_snapshot(tmp_path / "snapshot", model)
    for loaded in (BitForImageClassification.from_pretrained(directory), bigtransfer_load(directory)):
        with torch.no_grad():
            assert torch.allclose(loaded(PIXELS).logits, model(PIXELS).logits, atol=1e-5)


def bigtransfer_load(source):
    from bigtransfer import load_checkpoint

    return load_checkpoint(source)


@pytest.mark.parametrize("suffix", [".safetensors", ".pth", ".npz", "-original.pth", "-original.safetensors"])
def test_tiny_round_trips_through_every_writer(tmp_path, suffix):
    model = tiny_model(seed=3)
    path = tmp_path / f"tiny{suffix.replace('-original', '')}"
    writer = save_npz if suffix == ".npz" else save_big_transfer if "original" in suffix else save_timm
    writer(model, path)
    loaded = BitForImageClassification.from_pretrained(path)
    assert (loaded.config.num_groups, loaded.config.embedding_size, loaded.config.depths) == (8, 32, [1, 1, 1, 1])
    for key, value in model.state_dict().items():
        assert torch.equal(loaded.state_dict()[key], value), key


@pytest.mark.parametrize("variant", [name for name in VARIANTS if name != "tiny"])
@pytest.mark.parametrize("naming", [keymaps.TIMM, keymaps.GOOGLE, keymaps.BIG_TRANSFER, keymaps.TRANSFORMERS])
def test_every_variant_round_trips_through_every_key_map(variant, naming):
    """The writers are these key maps plus a file write (tested above): on meta tensors, every variant's
    architecture comes back from every format's names and shapes."""
    with torch.device("meta"):
        model = BitForImageClassification(BitConfig.from_variant(variant))
    state = keymaps.from_transformers(model.state_dict(), naming)
    back = keymaps.to_transformers(state, naming)
    assert {key: value.shape for key, value in back.items()} == {key: value.shape for key, value in model.state_dict().items()}
    inferred = BitConfig(**keymaps.infer_architecture(back))
    expected = BitConfig.from_variant(variant)
    for field in ("depths", "width_factor", "num_labels", "num_groups", "stage_widths", "embedding_size"):
        assert getattr(inferred, field) == getattr(expected, field), field


def test_the_reader_names_what_the_tensors_cannot_tell(tmp_path):
    config = BitConfig(embedding_size=16, hidden_sizes=[16, 32, 64, 128], depths=[1, 1, 1, 1], num_groups=2, num_labels=2)
    model = BitForImageClassification(config).eval()
    save_timm(model, tmp_path / "odd.pth")
    with pytest.raises(ValueError, match=r"num_groups=32 does not divide .* do not store the GroupNorm groups: pass num_groups=N"):
        BitForImageClassification.from_pretrained(tmp_path / "odd.pth")
    loaded = BitForImageClassification.from_pretrained(tmp_path / "odd.pth", num_groups=2)
    with torch.no_grad():
        assert torch.equal(loaded(PIXELS).logits, model(PIXELS).logits)
    save_timm(model, tmp_path / "odd.safetensors")  # safetensors metadata records the groups
    assert checkpoints.read(tmp_path / "odd.safetensors").config["num_groups"] == 2
