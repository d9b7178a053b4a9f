"""Code written for transformers' BiT classes runs on these: the Trainer, export and tracing on default outputs,
the keyword arguments and attributes such code uses, transformers' exception types, and backbones for detection."""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path

import numpy as np
import pytest
import torch

from bigtransfer import (
    BitBackbone,
    BitConfig,
    BitForImageClassification,
    BitImageProcessor,
    BitModel,
    CheckpointError,
)
from conftest import TESTER, relative_error

transformers = pytest.importorskip("transformers")
PIXELS = torch.randn(2, 3, 64, 64, generator=torch.Generator().manual_seed(7))


def build(model_class=BitForImageClassification, seed=0, **overrides):
    torch.manual_seed(seed)
    model = model_class(BitConfig(**{**TESTER, **overrides})).eval()
    with torch.no_grad():
        for name, parameter in model.named_parameters():
            if "norm" in name or "classifier" in name:
                parameter.add_(0.1 * torch.randn_like(parameter))
    return model


# ---------------------------------------------------------------------------------------------------------------
# transformers' Trainer, with no subclassing.


class Images(torch.utils.data.Dataset):
    def __len__(self):
        return 12

    def __getitem__(self, index):
        generator = torch.Generator().manual_seed(index)
        pixels = torch.randn(3, 32, 32, generator=generator) + (index % 3)  # a class-dependent brightness
        return {"pixel_values": pixels, "labels": torch.tensor(index % 3)}


def _arguments(output: Path, **overrides):
    pytest.importorskip("accelerate")
    values = dict(output_dir=str(output), per_device_train_batch_size=4, max_steps=4, save_steps=2, logging_steps=1,
                  report_to=[], use_cpu=True, eval_strategy="steps", eval_steps=2, learning_rate=1e-3, seed=0)
    return transformers.TrainingArguments(**{**values, **overrides})


@pytest.mark.slow
def test_the_trainer_trains_evaluates_resumes_and_saves(tmp_path):
    from bigtransfer.integrations import trainer_callback

    processor = BitImageProcessor(size={"height": 32, "width": 32}, crop_size=32)
    model = build(num_labels=3)
    trainer = transformers.Trainer(model=model, args=_arguments(tmp_path / "out", activation_checkpointing=True),
                                   train_dataset=Images(), eval_dataset=Images(), callbacks=[trainer_callback(processor)])
    trainer.train()  # the FLOP counter, activation checkpointing, evaluation and checkpoints on the way
    assert model.is_activation_checkpointing and np.isfinite(trainer.evaluate()["eval_loss"])
    trainer.save_model(tmp_path / "saved")
    with torch.no_grad():
        expected = model.eval()(PIXELS).logits
    # What save_model writes (weights only, for a model that is not transformers' own) loads here ...
    reloaded = BitForImageClassification.from_pretrained(tmp_path / "saved", num_groups=1)
    assert relative_error(reloaded(PIXELS).logits, expected) < 1e-5
    # ... and each checkpoint, completed by the callback, loads in both libraries.
    checkpoint = tmp_path / "out" / "checkpoint-4"
    ours = BitForImageClassification.from_pretrained(checkpoint)
    theirs = transformers.BitForImageClassification.from_pretrained(checkpoint).eval()
    with torch.no_grad():
        assert relative_error(theirs(PIXELS).logits, ours(PIXELS).logits) < 1e-5
    assert BitImageProcessor.from_pretrained(checkpoint).crop_size == {"height": 32, "width": 32}
    resumed = transformers.Trainer(model=build(num_labels=3, seed=5), args=_arguments(tmp_path / "out", max_steps=6),
                                   train_dataset=Images(), eval_dataset=Images())
    resumed.train(resume_from_checkpoint=str(tmp_path / "out" / "checkpoint-4"))
    assert resumed.state.global_step == 6


# ---------------------------------------------------------------------------------------------------------------
# Export, tracing and vmap on the default (dataclass) outputs.


@pytest.mark.slow
@pytest.mark.parametrize("model_class", [BitModel, BitForImageClassification, BitBackbone], ids=lambda c: c.__name__)
def test_torch_export_and_tracing_work_on_default_outputs(model_class):
    model = build(model_class)
    with torch.no_grad():
        expected = model(PIXELS)
        program = torch.export.export(model, (PIXELS,))
        exported = program.module()(PIXELS)
        traced = torch.jit.trace(model, PIXELS, strict=False)(PIXELS)
    for name in expected.keys():
        if isinstance(expected[name], torch.Tensor):
            assert torch.allclose(exported[name], expected[name], atol=1e-5), name
            assert torch.allclose(traced[name], expected[name], atol=1e-5), name
        else:
            assert all(torch.allclose(a, b, atol=1e-5) for a, b in zip(exported[name], expected[name], strict=True))


@pytest.mark.slow
def test_onnx_export_on_default_outputs(tmp_path):
    onnxruntime = pytest.importorskip("onnxruntime")
    model = build(BitForImageClassification)
    torch.onnx.export(model, (PIXELS,), tmp_path / "m.onnx", dynamo=True, input_names=["pixel_values"])
    session = onnxruntime.InferenceSession(str(tmp_path / "m.onnx"))
    logits = session.run(None, {"pixel_values": PIXELS.numpy()})[0]
    with torch.no_grad():
        assert np.allclose(logits, model(PIXELS).logits.numpy(), atol=1e-4)


def test_vmap_and_pytree_see_plain_containers():
    model = build(BitModel)
    single = torch.func.vmap(lambda image: model(image[None]).pooler_output[0])(PIXELS)
    with torch.no_grad():
        assert torch.allclose(single, model(PIXELS).pooler_output, atol=1e-5)
    output = build(BitForImageClassification)(PIXELS, labels=torch.tensor([0, 1]))
    leaves, spec = torch.utils._pytree.tree_flatten(output)
    assert len(leaves) == 2 and torch.utils._pytree.tree_unflatten(leaves, spec)["logits"] is output.logits
    assert output.get("hidden_states", "absent") == "absent" and output.get("loss") is output.loss


# ---------------------------------------------------------------------------------------------------------------
# Keyword arguments.


def test_from_pretrained_takes_transformers_loading_arguments(tmp_path, caplog):
    source = build(num_labels=3)
    source.save_pretrained(tmp_path / "repo" / "sub")
    model = BitForImageClassification.from_pretrained(pretrained_model_name_or_path=tmp_path / "repo", subfolder="sub",
                                                      low_cpu_mem_usage=True, trust_remote_code=False)
    assert torch.equal(model(PIXELS).logits, source(PIXELS).logits)
    model, info = BitForImageClassification.from_pretrained(tmp_path / "repo" / "sub", num_labels=5,
                                                            ignore_mismatched_sizes=True, output_loading_info=True)
    assert set(info) == {"missing_keys", "unexpected_keys", "mismatched_keys", "error_msgs"}
    assert sorted(key for key, _, _ in info["mismatched_keys"]) == ["classifier.1.bias", "classifier.1.weight"]
    _, info = BitModel.from_pretrained(tmp_path / "repo" / "sub", output_loading_info=True)
    assert sorted(info["unexpected_keys"]) == ["classifier.1.bias", "classifier.1.weight"]
    other = build(num_labels=3, seed=9).state_dict()
    given = BitForImageClassification.from_pretrained(tmp_path / "repo" / "sub", state_dict=other)
    assert torch.equal(given.classifier[1].weight, other["classifier.1.weight"])
    alone = BitForImageClassification.from_pretrained(None, config=BitConfig(**TESTER), state_dict=other)
    assert torch.equal(alone.classifier[1].bias, other["classifier.1.bias"])
    with pytest.raises(CheckpointError, match=r"expected pytorch_model\.bin \(use_safetensors=False\)"):
        BitForImageClassification.from_pretrained(tmp_path / "repo" / "sub", use_safetensors=False)


def test_loading_info_holds_sets_as_transformers_5s_does(tmp_path):
    build(num_labels=3).save_pretrained(tmp_path)
    _, ours = BitForImageClassification.from_pretrained(tmp_path, num_labels=5, ignore_mismatched_sizes=True,
                                                        output_loading_info=True)
    _, theirs = transformers.BitForImageClassification.from_pretrained(tmp_path, num_labels=5,
                                                                       ignore_mismatched_sizes=True,
                                                                       output_loading_info=True)
    assert {key: type(value) for key, value in ours.items()} == {key: type(value) for key, value in theirs.items()}
    assert ours["missing_keys"].isdisjoint({"classifier.1.weight"})
    assert {key for key, _, _ in ours["mismatched_keys"]} == {key for key, *_ in theirs["mismatched_keys"]}


def test_variant_names_the_weight_files_on_save_and_load_in_both_libraries(tmp_path):
    model = build(num_labels=3)
    model.save_pretrained(tmp_path, variant="v1")
    assert sorted(path.name for path in tmp_path.iterdir()) == ["config.json", "model.v1.safetensors"]
    for library in (BitForImageClassification, transformers.BitForImageClassification):
        loaded = library.from_pretrained(tmp_path, variant="v1").eval()
        with torch.no_grad():
            assert relative_error(loaded(PIXELS).logits, model(PIXELS).logits) < 1e-5
    with pytest.raises(CheckpointError, match=r"model\.v2\.safetensors"):
        BitForImageClassification.from_pretrained(tmp_path, variant="v2")


def test_every_loading_keyword_of_transformers_is_applied_or_refused_by_name(tmp_path):
    model = build(num_labels=3)
    model.save_pretrained(tmp_path)
    for device_map in ("cpu", torch.device("cpu"), {"": "cpu"}, {"": torch.device("cpu")}):
        assert BitForImageClassification.from_pretrained(tmp_path, device_map=device_map).device.type == "cpu"
    accepted = dict(weights_only=True, offload_folder=str(tmp_path / "offload"), max_memory={"cpu": "1GB"},
                    offload_state_dict=True, adapter_kwargs={}, quantization_config=None, use_kernels=False,
                    tp_plan=None, proxies=None)
    loaded = BitForImageClassification.from_pretrained(tmp_path, **accepted)
    assert torch.equal(loaded(PIXELS).logits, model(PIXELS).logits)
    refused = dict(proxies={"https": "http://proxy:3128"}, weights_only=False, adapter_kwargs={"revision": "x"},
                   quantization_config={"load_in_8bit": True}, use_kernels=True, tp_plan="auto")
    for name, value in refused.items():
        with pytest.raises(ValueError, match=rf"^from_pretrained\({name}=.*is not supported: ") as error:
            BitForImageClassification.from_pretrained(tmp_path, **{name: value})
        assert "\n" not in str(error.value)
    with pytest.raises(ValueError, match="HTTPS_PROXY"):
        BitForImageClassification.from_pretrained(tmp_path, proxies={"https": "http://proxy:3128"})
    with pytest.raises(ValueError, match="device_map as a dict of modules"):
        BitForImageClassification.from_pretrained(tmp_path, device_map={"bit": "cpu", "classifier": "cpu"})


def test_key_mapping_renames_checkpoint_keys_as_transformers_does(tmp_path):
    from safetensors.torch import save_file

    model = build(num_labels=3)
    model.save_pretrained(tmp_path)
    renamed = {key.replace("bit.", "backbone.", 1): value.contiguous() for key, value in model.state_dict().items()}
    save_file(renamed, tmp_path / "model.safetensors", {"format": "pt"})
    with pytest.raises(CheckpointError):
        BitForImageClassification.from_pretrained(tmp_path)
    for library in (BitForImageClassification, transformers.BitForImageClassification):
        loaded = library.from_pretrained(tmp_path, key_mapping={r"^backbone\.": "bit."}).eval()
        with torch.no_grad():
            assert relative_error(loaded(PIXELS).logits, model(PIXELS).logits) < 1e-5


def test_hub_arguments_reach_huggingface_hub(tmp_path, monkeypatch):
    import huggingface_hub

    build(num_labels=3).save_pretrained(tmp_path / "remote")
    BitImageProcessor(crop_size=48).save_pretrained(tmp_path / "remote")
    calls = []

    def download(repo_id, filename, **kwargs):
        calls.append(kwargs)
        path = tmp_path / "remote" / filename
        if not path.is_file():
            from huggingface_hub import errors

            raise errors.EntryNotFoundError(filename)
        return str(path)

    monkeypatch.setattr(huggingface_hub, "hf_hub_download", download)
    BitForImageClassification.from_pretrained("someone/bit", cache_dir=tmp_path / "cache", token="secret",
                                              local_files_only=True, force_download=True, revision="v1")
    # Configs and processors are resolved as models are: the same Hub arguments reach huggingface_hub.
    hub_arguments = dict(cache_dir=tmp_path / "cache", token="secret", local_files_only=True, force_download=True,
                         revision="v1")
    assert BitConfig.from_pretrained("someone/bit", **hub_arguments).num_labels == 3
    assert BitImageProcessor.from_pretrained("someone/bit", **hub_arguments).crop_size == {"height": 48, "width": 48}
    assert {str(call["cache_dir"]) for call in calls} == {str(tmp_path / "cache")} and len(calls) >= 4
    assert all(call["token"] == "secret" and call["local_files_only"] and call["force_download"] for call in calls)
    assert all(call["revision"] == "v1" for call in calls)
    nested = BitImageProcessor.from_pretrained(tmp_path, subfolder="remote")  # a local subfolder, as for models
    assert nested.crop_size == {"height": 48, "width": 48}
    config, unused = BitConfig.from_pretrained("someone/bit", return_unused_kwargs=True, num_labels=7, foo=1)
    assert config.num_labels == 7 and unused == {"foo": 1}


def test_save_pretrained_shards_and_takes_a_state_dict(tmp_path):
    model = build(num_labels=3)
    model.save_pretrained(tmp_path / "sharded", max_shard_size="20kB")
    index = json.loads((tmp_path / "sharded" / "model.safetensors.index.json").read_text())
    shards = sorted(set(index["weight_map"].values()))
    assert len(shards) > 2 and not (tmp_path / "sharded" / "model.safetensors").exists()
    for library in (BitForImageClassification, transformers.BitForImageClassification):
        loaded = library.from_pretrained(tmp_path / "sharded").eval()
        with torch.no_grad():
            assert relative_error(loaded(PIXELS).logits, model(PIXELS).logits) < 1e-5
    model.save_pretrained(tmp_path / "sharded")  # one file again: the shards go
    assert sorted(path.name for path in (tmp_path / "sharded").iterdir()) == ["config.json", "model.safetensors"]
    zeros = {key: torch.zeros_like(value) for key, value in model.state_dict().items()}
    model.save_pretrained(tmp_path / "zeros", state_dict=zeros, safe_serialization=False)
    assert (tmp_path / "zeros" / "pytorch_model.bin").is_file()
    model.save_pretrained(tmp_path / "other-rank", is_main_process=False)
    assert not (tmp_path / "other-rank").exists()


def test_push_to_hub_uploads_what_save_pretrained_writes(tmp_path, monkeypatch):
    import huggingface_hub

    uploaded = {}

    class FakeApi:
        def __init__(self, token=None):
            self.token = token

        def create_repo(self, repo_id, private=None, exist_ok=False):
            uploaded["created"] = (repo_id, private, exist_ok)

        def file_exists(self, repo_id, filename, revision=None):
            return repo_id == "me/has-a-card"

        def upload_folder(self, repo_id, folder_path, commit_message, revision=None, create_pr=False):
            uploaded[repo_id] = sorted(os.listdir(folder_path))
            card = Path(folder_path) / "README.md"
            uploaded[repo_id + ":card"] = card.read_text() if card.is_file() else None
            return "commit"

    monkeypatch.setattr(huggingface_hub, "HfApi", FakeApi)
    assert build().push_to_hub("me/model", private=True) == "commit"
    BitConfig(**TESTER).push_to_hub("me/config")
    BitImageProcessor().push_to_hub("me/processor")
    assert uploaded["me/model"] == ["README.md", "config.json", "model.safetensors"]
    assert uploaded["created"][1:] == (None, True)
    assert uploaded["me/model:card"].startswith("---\nlibrary_name: transformers\npipeline_tag: image-classification")
    assert uploaded["me/config"] == ["config.json"] and uploaded["me/processor"] == ["preprocessor_config.json"]
    # save_pretrained(push_to_hub=True) uploads what it wrote: shards and variant names included.
    build().save_pretrained(tmp_path / "has-a-card", push_to_hub=True, repo_id="me/has-a-card", max_shard_size="20kB",
                            variant="v1")
    written = sorted(path.name for path in (tmp_path / "has-a-card").iterdir())
    assert uploaded["me/has-a-card"] == written and uploaded["me/has-a-card:card"] is None  # its card is kept
    assert "model.safetensors.index.v1.json" in written and "model.v1-00001-of-00003.safetensors" in written


# ---------------------------------------------------------------------------------------------------------------
# Attributes and methods.


def test_attributes_and_methods_code_for_transformers_uses(tmp_path):
    model = build(BitForImageClassification)
    theirs = transformers.BitForImageClassification(transformers.BitConfig(**TESTER))
    assert model.base_model is model.bit and model.bit.base_model is model.bit
    assert model.get_memory_footprint() == theirs.get_memory_footprint()
    assert model.num_parameters(exclude_embeddings=True) == theirs.num_parameters(exclude_embeddings=True)
    model.activation_checkpointing_enable(every_n_layers=2, activation_checkpointing_kwargs={"use_reentrant": False})
    assert model.is_activation_checkpointing and model.is_gradient_checkpointing
    model.train()(PIXELS, labels=torch.tensor([0, 1])).loss.backward()
    model.gradient_checkpointing_disable()
    assert not model.is_activation_checkpointing
    for parameter in model.parameters():
        parameter.requires_grad_(False)
    model.enable_input_require_grads()
    assert model(PIXELS).logits.requires_grad
    model.disable_input_require_grads()
    assert not model(PIXELS).logits.requires_grad
    backbone = BitBackbone(BitConfig(**TESTER))
    their_backbone = transformers.BitBackbone(transformers.BitConfig(**TESTER))
    assert backbone.out_feature_channels == their_backbone.out_feature_channels
    config = BitConfig()
    assert config.use_return_dict and config.dtype is None and transformers.BitConfig().dtype is None
    config.to_json_file(tmp_path / "c.json")
    assert BitConfig.from_json_file(tmp_path / "c.json") == config
    BitImageProcessor(crop_size=99).to_json_file(tmp_path / "p.json")
    assert BitImageProcessor.from_json_file(tmp_path / "p.json").crop_size == {"height": 99, "width": 99}


def test_processor_steps_equal_transformers():
    from transformers.image_utils import SizeDict

    ours, theirs = BitImageProcessor(), transformers.BitImageProcessor()
    image = torch.randint(0, 256, (3, 90, 70), dtype=torch.uint8, generator=torch.Generator().manual_seed(1))
    a, b = ours.resize(image, SizeDict(shortest_edge=48)), theirs.resize(image, SizeDict(shortest_edge=48), resample=3)
    assert a.shape == b.shape and (a.float() - b.float()).abs().max() <= 1
    a, b = ours.center_crop(a, SizeDict(height=40, width=40)), theirs.center_crop(b, SizeDict(height=40, width=40))
    assert a.shape == b.shape == (3, 40, 40)
    a = ours.normalize(ours.rescale(a, 1 / 255), [0.5] * 3, [0.25] * 3)
    b = theirs.normalize(theirs.rescale(b, 1 / 255), [0.5] * 3, [0.25] * 3)
    assert (a - b).abs().max() < 0.02
    assert isinstance(ours.rescale(image.numpy(), 0.5), np.ndarray)


# ---------------------------------------------------------------------------------------------------------------
# Behaviour that code written for transformers relies on.


def test_a_head_of_another_size_raises_what_transformers_raises(tmp_path):
    build(num_labels=3).save_pretrained(tmp_path)
    with pytest.raises(RuntimeError, match="classifier.1.weight has shape"):
        BitForImageClassification.from_pretrained(tmp_path, num_labels=5)


def test_loading_inside_a_meta_device_context_is_refused(tmp_path):
    build().save_pretrained(tmp_path)
    with torch.device("meta"), pytest.raises(RuntimeError, match="inside a torch.device\\('meta'\\) context"):
        BitForImageClassification.from_pretrained(tmp_path)
    with torch.device("meta"):
        assert BitForImageClassification(BitConfig(**TESTER)).classifier[1].weight.is_meta


def test_a_hand_rolled_ema_through_data_is_seen_in_eval_mode():
    ema, online = build(seed=1), build(seed=2)
    with torch.no_grad():
        ema(PIXELS)  # fills the standardized-weight cache
        for kept, new in zip(ema.parameters(), online.parameters(), strict=True):
            kept.data.mul_(0.5).add_(new.data, alpha=0.5)
        fresh = BitForImageClassification(ema.config)
        fresh.load_state_dict(ema.state_dict())
        assert torch.allclose(ema(PIXELS).logits, fresh.eval()(PIXELS).logits, atol=1e-6)


# ---------------------------------------------------------------------------------------------------------------
# Backbones for dense tasks.


def _same_weights_in_timm():
    import re

    timm = pytest.importorskip("timm")
    from bigtransfer.backbones import create_model
    from bigtransfer.checkpoints import to_timm

    ours = create_model("BiT-S-R50x1")
    with torch.no_grad():
        for parameter in ours.parameters():
            parameter.add_(0.02 * torch.randn_like(parameter))
    theirs = timm.create_model("resnetv2_50x1_bit", features_only=True, pretrained=False).eval()
    state = {re.sub(r"^(stem|stages)\.", r"\1_", key): value for key, value in to_timm(ours.state_dict()).items()
             if not key.startswith(("head", "norm"))}
    theirs.load_state_dict(state, strict=True)
    full = timm.create_model("resnetv2_50x1_bit", pretrained=False, num_classes=1000).eval()
    full.load_state_dict(to_timm(ours.state_dict()))
    return ours.eval(), theirs, full


@pytest.mark.slow
def test_features_only_equals_timm_features_only_on_the_same_weights():
    from bigtransfer.backbones import BitFeatures

    ours, theirs, full = _same_weights_in_timm()
    features = BitFeatures(ours.bit).eval()
    with torch.no_grad():
        for got, want in zip(features(PIXELS), theirs(PIXELS), strict=True):
            assert relative_error(got, want) < 1e-4
        assert relative_error(ours.forward_features(PIXELS), full.forward_features(PIXELS)) < 1e-4
        assert relative_error(ours.forward_head(ours.forward_features(PIXELS)), full(PIXELS)) < 1e-4
    assert features.feature_info.channels() == theirs.feature_info.channels()
    assert features.feature_info.reduction() == theirs.feature_info.reduction()
    ours.reset_classifier(7)
    full.reset_classifier(7)
    assert ours(PIXELS).logits.shape == full(PIXELS).shape == (2, 7) and not ours.classifier[1].weight.any()


def test_a_dpt_hybrid_directory_gives_its_bit_backbone(tmp_path):
    backbone = transformers.BitConfig(global_padding="same", layer_type="bottleneck", depths=[1, 1, 1],
                                      hidden_sizes=[16, 32, 64], embedding_size=16, num_groups=4,
                                      embedding_dynamic_padding=True, out_features=["stage1", "stage2", "stage3"])
    config = transformers.DPTConfig(is_hybrid=True, backbone_config=backbone.to_dict(), image_size=64, hidden_size=32,
                                    num_hidden_layers=2, num_attention_heads=2, intermediate_size=37,
                                    neck_hidden_sizes=[16, 32, 32, 32], fusion_hidden_size=16,
                                    backbone_featmap_shape=[1, 64, 4, 4])
    torch.manual_seed(0)
    dpt = transformers.DPTForDepthEstimation(config).eval()
    dpt.save_pretrained(tmp_path / "dpt")
    ours = BitBackbone.from_pretrained(tmp_path / "dpt")
    assert ours.config.layer_type == "bottleneck" and ours.config.global_padding == "SAME"
    with torch.no_grad():
        expected = dpt.dpt.embeddings.backbone(PIXELS).feature_maps
        for got, want in zip(ours(PIXELS).feature_maps, expected, strict=True):
            assert relative_error(got, want) < 1e-5


@pytest.mark.slow
def test_the_detection_example_trains_faster_rcnn_on_bit_features(tmp_path):
    pytest.importorskip("torchvision")
    import runpy

    example = Path(__file__).resolve().parents[1] / "examples" / "detect_fashion_mnist.py"
    result = runpy.run_path(str(example), run_name="example")["main"](steps=3, output=tmp_path / "detector")
    assert len(result["losses"]) == 3 and all(np.isfinite(result["losses"]))
    assert result["boxes"] >= 0 and (tmp_path / "detector" / "model.pt").is_file()


def test_bit_under_an_fpn_is_a_torchvision_backbone():
    pytest.importorskip("torchvision")
    from bigtransfer.backbones import fpn_backbone

    levels = fpn_backbone(build(BitModel), out_channels=32)(PIXELS)
    assert list(levels) == ["0", "1", "2", "3", "pool"]
    assert [tuple(level.shape[-2:]) for level in levels.values()] == [(16, 16), (8, 8), (4, 4), (2, 2), (1, 1)]


def test_logging_names_the_fresh_head(tmp_path, caplog):
    build(BitModel).save_pretrained(tmp_path)
    with caplog.at_level(logging.WARNING, logger="bigtransfer"):
        BitForImageClassification.from_pretrained(tmp_path, num_labels=4)
    assert "classifier.1.weight" in caplog.text


@pytest.mark.slow
def test_a_training_step_with_labels_compiles_as_one_graph():
    # aot_eager traces exactly what Inductor would (dynamo + AOT autograd), without its slow code generation.
    model = build(num_labels=3).train()
    labels = torch.tensor([0, 2])
    eager_loss = model(PIXELS, labels=labels).loss
    eager_loss.backward()
    expected = {name: p.grad.clone() for name, p in model.named_parameters()}
    model.zero_grad()
    compiled = torch.compile(model, fullgraph=True, backend="aot_eager")
    loss = compiled(pixel_values=PIXELS, labels=labels).loss
    loss.backward()
    assert abs(loss.item() - eager_loss.item()) < 1e-5
    assert all(relative_error(p.grad, expected[name]) < 1e-4 for name, p in model.named_parameters())
    with pytest.raises(ValueError, match=r"labels must be in \[0, 2\]"):
        model(PIXELS, labels=torch.tensor([0, 3]))  # eager keeps the clear error


def test_from_config_loss_function_and_batch_feature_data_work_as_in_transformers():
    config = BitConfig(**TESTER)
    for library in (transformers, None):
        model_class, config_class = ((library.BitForImageClassification, library.BitConfig) if library
                                     else (BitForImageClassification, BitConfig))
        assert model_class._from_config(config_class(**TESTER), dtype=torch.bfloat16).dtype == torch.bfloat16
        model = model_class._from_config(config_class(**TESTER)).eval()
        labels = torch.tensor([0, 2])
        default = model(PIXELS, labels=labels).loss
        assert torch.allclose(model.loss_function(labels, model(PIXELS).logits, model.config), default)
        model.loss_function = lambda labels, logits, config, **kwargs: logits.sum() * 0 + 7
        assert model(PIXELS, labels=labels).loss.item() == 7
    assert BitForImageClassification.from_config(config).config == config
    image = np.zeros((8, 8, 3), dtype=np.uint8)
    ours = BitImageProcessor()(image, return_tensors="pt").data
    theirs = transformers.BitImageProcessor()(image, return_tensors="pt").data
    assert type(ours) is type(theirs) and list(ours) == list(theirs)


@pytest.mark.parametrize("settings", [{}, dict(image_mean=[0.5, 0.5, 0.5], image_std=[0.5] * 3, resample=2,
                                               size={"height": 48, "width": 48}, crop_size=32, do_center_crop=False)])
def test_processor_to_dict_equals_transformers_value_for_value_and_type(settings):
    ours, theirs = BitImageProcessor(**settings).to_dict(), transformers.BitImageProcessor(**settings).to_dict()
    # resample is always PIL's Resampling here (an int enum); transformers keeps an int given as an int.
    assert ours.pop("resample") == theirs.pop("resample")
    assert {key: (value, type(value)) for key, value in ours.items()} == {
        key: (value, type(value)) for key, value in theirs.items()}


def test_integrations_are_reachable_after_import_without_loading_transformers():
    import subprocess
    import sys

    code = ("import sys, bigtransfer; bigtransfer.integrations.trainer_callback; "
            "assert 'transformers' not in sys.modules and 'peft' not in sys.modules")
    subprocess.run([sys.executable, "-c", code], check=True, env={**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)})


def test_weights_saved_without_a_config_name_the_groups_they_lack(tmp_path, caplog):
    from safetensors.torch import save_file

    model = build(num_labels=3)  # num_groups=1, which no weights file records
    save_file({key: value.contiguous() for key, value in model.state_dict().items()}, tmp_path / "model.safetensors",
              {"format": "pt"})  # what the Trainer's save_model writes for it
    with pytest.raises(ValueError, match=r"do not store the GroupNorm groups: pass num_groups=N"):
        BitForImageClassification.from_pretrained(tmp_path)
    reloaded = BitForImageClassification.from_pretrained(tmp_path, num_groups=1)
    assert relative_error(reloaded(PIXELS).logits, model(PIXELS).logits) < 1e-5
    wide = build(num_labels=3, hidden_sizes=[128, 128, 128, 128], embedding_size=32)  # 32 groups divide these widths
    save_file({key: value.contiguous() for key, value in wide.state_dict().items()}, tmp_path / "model.safetensors",
              {"format": "pt"})
    with caplog.at_level(logging.WARNING, logger="bigtransfer"):
        BitForImageClassification.from_pretrained(tmp_path)
    assert "assumed BiT's num_groups=32" in caplog.text
