"""One inference module: `bigtransfer predict`, `evaluate` and `features` decode JPEGs at the size the model's
processor needs and give what a full decode gives, through the same processor the Python API uses."""

from __future__ import annotations

import json

import numpy as np
import PIL.Image
import PIL.JpegImagePlugin
import pytest
import torch

from bigtransfer import BitConfig, BitForImageClassification, BitImageProcessor
from bigtransfer.cli import main

skimage_data = pytest.importorskip("skimage.data")
PHOTOS = ("astronaut", "chelsea", "coffee", "rocket")


@pytest.fixture(scope="module")
def photos(tmp_path_factory):
    """Four scikit-image photos as 1280x960 JPEGs (a phone photo's size), in two class folders."""
    root = tmp_path_factory.mktemp("photos")
    paths = []
    for index, name in enumerate(PHOTOS):
        image = PIL.Image.fromarray(getattr(skimage_data, name)()).convert("RGB").resize((1280, 960))
        folder = root / ("a" if index % 2 else "b")
        folder.mkdir(exist_ok=True)
        paths.append(folder / f"{name}.jpg")
        image.save(paths[-1], quality=92)
    return root, paths


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory, photos):
    """`tiny` with a linear probe that tells the four photos apart (fitted on full decodes): a model whose answers
    mean something, so a change of answer would be a change of the picture the model sees."""
    _, paths = photos
    torch.manual_seed(0)
    names = dict(enumerate(PHOTOS))
    model = BitForImageClassification(BitConfig.from_variant("tiny", num_labels=4, id2label=names)).eval()
    processor = BitImageProcessor(size={"shortest_edge": 160}, crop_size=128)
    with torch.no_grad():
        pixels = processor([PIL.Image.open(path) for path in paths], return_tensors="pt").pixel_values
        features = model.bit(pixels).pooler_output.flatten(1)
        centre = features.mean(0)
        weight = 8.0 * torch.linalg.pinv(features - centre).T  # (features - centre) @ weight.T = 8 I
        model.classifier[1].weight.copy_(weight)
        model.classifier[1].bias.copy_(-weight @ centre)
    directory = tmp_path_factory.mktemp("model")
    model.save_pretrained(directory)
    processor.save_pretrained(directory)
    return directory


@pytest.fixture
def decoder_requests(monkeypatch, tmp_path):
    """The (width, height) every JPEG decode asked libjpeg for, recorded in a file so worker processes count."""
    record = tmp_path / "requests.jsonl"
    original = PIL.JpegImagePlugin.JpegImageFile.draft

    def draft(image, mode, size, *args, **kwargs):
        with open(record, "a") as handle:
            handle.write(json.dumps(list(size)) + "\n")
        return original(image, mode, size, *args, **kwargs)

    monkeypatch.setattr(PIL.JpegImagePlugin.JpegImageFile, "draft", draft)
    return lambda: [tuple(json.loads(line)) for line in record.read_text().splitlines()] if record.exists() else []


def _predict(capsys, model_dir, paths, *flags):
    assert main(["predict", "--model", str(model_dir), *map(str, paths), "--top-k", "3", "--json", *flags]) == 0
    return [json.loads(line)["predictions"] for line in capsys.readouterr().out.splitlines()]


def test_predict_decodes_jpegs_at_reduced_size_with_the_same_top_k(capsys, photos, model_dir, decoder_requests):
    _, paths = photos
    reduced = _predict(capsys, model_dir, paths)
    requests = decoder_requests()
    assert len(requests) == len(paths)
    assert all(min(size) >= 160 and size[0] < 1280 for size in requests), requests  # never below the resize
    full = _predict(capsys, model_dir, paths, "--full-decode")
    assert len(decoder_requests()) == len(paths)  # the full decode asks for nothing smaller
    for path, got, want in zip(paths, reduced, full, strict=True):
        assert got[0]["label"] == want[0]["label"] == path.stem  # each photo is still itself
        # Pixels differ by under one grey level on average (the decoder's DCT-domain downscaling).
        assert abs(got[0]["score"] - want[0]["score"]) < 0.02


def test_evaluate_and_features_decode_reduced_too(capsys, photos, model_dir, decoder_requests, tmp_path):
    root, paths = photos
    assert main(["evaluate", "--model", str(model_dir), "--data", str(root), "--json"]) == 0
    assert len(decoder_requests()) >= 1  # the held-out split's JPEGs
    assert main(["features", "--model", str(model_dir), "--data", str(root), "--output", str(tmp_path / "f.npy")]) == 0
    assert len(decoder_requests()) >= 2
    reduced = np.load(tmp_path / "f.npy")
    assert main(["features", "--model", str(model_dir), "--data", str(root), "--output", str(tmp_path / "g.npy"),
                 "--full-decode"]) == 0
    full = np.load(tmp_path / "g.npy")
    assert reduced.shape == full.shape
    assert (np.linalg.norm(reduced - full, axis=1) < 0.1 * np.linalg.norm(full, axis=1)).all()


@pytest.mark.slow
def test_the_optimized_path_gives_the_same_predictions(capsys, photos, model_dir):
    _, paths = photos
    eager = _predict(capsys, model_dir, paths)
    fast = _predict(capsys, model_dir, paths, "--optimize")
    for got, want in zip(fast, eager, strict=True):
        assert [p["label"] for p in got] == [p["label"] for p in want]
        assert np.allclose([p["score"] for p in got], [p["score"] for p in want], atol=1e-4)


def test_predict_takes_a_folder_as_its_images(capsys, photos, model_dir, tmp_path):
    root, paths = photos
    by_folder = _predict(capsys, model_dir, [root])
    assert by_folder == _predict(capsys, model_dir, sorted(paths, key=lambda path: (path.parent.name, path.name)))
    (tmp_path / "empty").mkdir()
    assert main(["predict", "--model", str(model_dir), str(tmp_path / "empty")]) == 2
    assert "is a folder with no image files" in capsys.readouterr().err


def test_a_jpeg_above_pils_pixel_limit_is_predicted_from_its_reduced_decode(capsys, model_dir, tmp_path, monkeypatch):
    # PIL refuses more than MAX_IMAGE_PIXELS; a 1/8 decode needs far fewer. The limit is lowered here so the
    # test stays small: a 1600x1200 JPEG over a 1,000,000-pixel limit, read at 1/4 for the model's 160 px.
    photo = PIL.Image.fromarray(skimage_data.chelsea()).convert("RGB").resize((1600, 1200))
    photo.save(tmp_path / "big.jpg", quality=90)
    monkeypatch.setattr(PIL.Image, "MAX_IMAGE_PIXELS", 1_000_000)
    assert main(["predict", "--model", str(model_dir), str(tmp_path / "big.jpg"), "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["predictions"]
    # Asked to decode it in full, it is refused, naming the limit and how to raise it.
    assert main(["predict", "--model", str(model_dir), str(tmp_path / "big.jpg"), "--full-decode"]) == 2
    assert "MAX_IMAGE_PIXELS" in capsys.readouterr().err
