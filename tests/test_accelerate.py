"""Mixed precision where transformers users train: the Trainer with bf16=True and accelerate's Accelerator rebuild the
model's outputs (`type(out)({...})`) after casting them; pipelines take model objects. Each runs on transformers' own
BiT too, with the same weights and data, and the losses agree within bf16's precision."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from bigtransfer import BitConfig, BitForImageClassification, BitImageProcessor, BitModel
from bigtransfer.modeling import (
    BaseModelOutputWithPoolingAndNoAttention,
    ImageClassifierOutputWithNoAttention,
)
from conftest import TESTER, relative_error

transformers = pytest.importorskip("transformers")
accelerate = pytest.importorskip("accelerate")


class Images(torch.utils.data.Dataset):
    def __len__(self):
        return 16

    def __getitem__(self, index):
        generator = torch.Generator().manual_seed(index)
        pixels = torch.randn(3, 32, 32, generator=generator) + (index % 3)
        return {"pixel_values": pixels, "labels": torch.tensor(index % 3)}


def _pair(tmp_path):
    """This package's model and transformers' BiT holding the same weights."""
    torch.manual_seed(0)
    ours = BitForImageClassification(BitConfig(**TESTER))
    ours.save_pretrained(tmp_path / "weights")
    return ours, transformers.BitForImageClassification.from_pretrained(tmp_path / "weights")


def test_outputs_rebuild_as_transformers_model_outputs_do():
    loss, logits = torch.tensor(0.5), torch.ones(2, 3)
    built = ImageClassifierOutputWithNoAttention(loss=loss, logits=logits)
    rebuilt = type(built)({key: value * 2 for key, value in built.items()})  # accelerate's convert_to_fp32
    assert rebuilt.loss == 1.0 and torch.equal(rebuilt["logits"], logits * 2) and rebuilt.hidden_states is None
    assert rebuilt[0] == 1.0 and torch.equal(rebuilt[1], logits * 2) and len(rebuilt.to_tuple()) == 2
    no_loss = ImageClassifierOutputWithNoAttention({"logits": logits})
    assert torch.equal(no_loss[0], logits) and list(no_loss.keys()) == ["logits"]
    theirs = transformers.modeling_outputs.ImageClassifierOutputWithNoAttention({"logits": logits})
    assert list(theirs.keys()) == list(no_loss.keys()) and len(theirs.to_tuple()) == len(no_loss.to_tuple())
    with pytest.raises(TypeError, match="no fields"):
        ImageClassifierOutputWithNoAttention({"logit": logits})


@pytest.mark.slow
def test_trainer_in_bf16_trains_evaluates_and_saves_like_transformers_bit(tmp_path):
    losses = {}
    for name, model in zip(["ours", "theirs"], _pair(tmp_path), strict=True):
        arguments = transformers.TrainingArguments(
            output_dir=str(tmp_path / name), bf16=True, use_cpu=True, per_device_train_batch_size=4, max_steps=4,
            logging_steps=1, learning_rate=1e-3, report_to=[], seed=0, save_strategy="no")
        trainer = transformers.Trainer(model=model, args=arguments, train_dataset=Images(), eval_dataset=Images())
        trainer.train()
        evaluation = trainer.evaluate()
        trainer.save_model(tmp_path / name / "saved")
        losses[name] = [entry["loss"] for entry in trainer.state.log_history if "loss" in entry]
        losses[name].append(evaluation["eval_loss"])
    assert np.all(np.isfinite(losses["ours"])) and len(losses["ours"]) == 5
    assert np.allclose(losses["ours"], losses["theirs"], rtol=2e-2, atol=2e-2), losses
    reloaded = BitForImageClassification.from_pretrained(tmp_path / "ours" / "saved", num_groups=1)
    assert reloaded.config.num_labels == 3


@pytest.mark.slow
def test_accelerator_in_bf16_prepares_accumulates_and_restores_state(tmp_path):
    losses = {}
    for name, model in zip(["ours", "theirs"], _pair(tmp_path), strict=True):
        accelerator = accelerate.Accelerator(mixed_precision="bf16", cpu=True, gradient_accumulation_steps=2)
        optimizer = torch.optim.SGD(model.parameters(), lr=0.01)
        loader = torch.utils.data.DataLoader(Images(), batch_size=4)
        model, optimizer, loader = accelerator.prepare(model, optimizer, loader)
        losses[name] = []
        for batch in loader:
            with accelerator.accumulate(model):
                loss = model(**batch).loss
                accelerator.backward(loss)
                optimizer.step()
                optimizer.zero_grad()
            assert loss.dtype == torch.float32  # accelerate's rebuilt output
            losses[name].append(loss.item())
        accelerator.save_state(tmp_path / name / "state")
        weights = {key: value.clone() for key, value in model.state_dict().items()}
        with torch.no_grad():
            for parameter in model.parameters():
                parameter.zero_()
        accelerator.load_state(tmp_path / name / "state")
        assert all(torch.equal(model.state_dict()[key], value) for key, value in weights.items())
    assert np.allclose(losses["ours"], losses["theirs"], rtol=2e-2, atol=2e-2), losses


def test_feature_extraction_pipeline_takes_a_model_object():
    # pool=True: transformers' pipelines turn outputs that are not its own ModelOutput into plain dicts, which have
    # no position 0 (the README's differences table); the pooled features are read by name.
    torch.manual_seed(0)
    model = BitModel(BitConfig(**TESTER)).eval()
    processor = BitImageProcessor(size={"shortest_edge": 32}, crop_size=32)
    pipe = transformers.pipeline("image-feature-extraction", model=model, image_processor=processor,
                                 device="cpu", return_tensors=True, pool=True)
    image = np.random.default_rng(0).integers(0, 256, (40, 48, 3), dtype=np.uint8)
    features = pipe(Image.fromarray(image))
    with torch.no_grad():
        expected = model(processor(Image.fromarray(image), return_tensors="pt")["pixel_values"])
    assert isinstance(expected, BaseModelOutputWithPoolingAndNoAttention)
    assert relative_error(features.flatten(), expected.pooler_output.flatten()) < 1e-6


@pytest.mark.skipif(not torch.cuda.is_available(), reason="fp16 mixed precision with a GradScaler needs a CUDA device")
def test_trainer_in_fp16_with_a_grad_scaler_trains_like_transformers_bit(tmp_path):
    losses = {}
    for name, model in zip(["ours", "theirs"], _pair(tmp_path), strict=True):
        arguments = transformers.TrainingArguments(
            output_dir=str(tmp_path / name), fp16=True, per_device_train_batch_size=4, max_steps=4, logging_steps=1,
            learning_rate=1e-3, report_to=[], seed=0, save_strategy="no")
        trainer = transformers.Trainer(model=model, args=arguments, train_dataset=Images())
        trainer.train()
        losses[name] = [entry["loss"] for entry in trainer.state.log_history if "loss" in entry]
    assert np.all(np.isfinite(losses["ours"])) and np.allclose(losses["ours"], losses["theirs"], rtol=2e-2, atol=2e-2)


def test_image_classification_pipeline_takes_a_model_object():
    torch.manual_seed(0)
    model = BitForImageClassification(BitConfig(**TESTER)).eval()
    processor = BitImageProcessor(size={"shortest_edge": 32}, crop_size=32)
    pipe = transformers.pipeline("image-classification", model=model, image_processor=processor, device="cpu")
    image = Image.fromarray(np.random.default_rng(1).integers(0, 256, (40, 48, 3), dtype=np.uint8))
    with torch.no_grad():
        probabilities = model(processor(image, return_tensors="pt")["pixel_values"]).logits.softmax(-1)[0]
    predictions = pipe(image)
    assert [entry["label"] for entry in predictions] == [
        model.config.id2label[int(index)] for index in probabilities.argsort(descending=True)]
    assert abs(predictions[0]["score"] - probabilities.max().item()) < 1e-5
