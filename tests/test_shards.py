"""Sharded data: WebDataset tar shards and Hugging Face datasets / Parquet train exactly as the folder they were
made from, under torchrun (Fashion-MNIST in one shard for two ranks and their workers: no hang, the same steps)
and across a SIGKILL and --resume; bigtransfer shard's layout and global index; errors that name the shard,
member or column (the hostile cases are in test_shard_checks.py, object storage in test_remote_data.py)."""

from __future__ import annotations

import io
import json
import os
import shutil
import subprocess
import sys
import tarfile

import numpy as np
import pytest
import torch
from PIL import Image

from bigtransfer.cli import main
from bigtransfer.data import open_source
from bigtransfer.data.shard_writer import encoded
from bigtransfer.train import CHECKPOINT_NAME, load_run_state
from conftest import sigkill_when_logged, torchrun_cli

datasets = pytest.importorskip("datasets")
pytest.importorskip("webdataset")

TRAIN = ["--model", "tiny", "--max-steps", "6", "--base-lr", "0.01", "--batch-size", "8", "--batch-split", "1",
         "--resize", "36", "--crop", "32", "--seed", "3", "--no-progress", "--no-plots", "--device", "cpu"]
PHOTOS = {"animal": ("chelsea", "coffee", "astronaut"), "space": ("rocket", "hubble_deep_field", "moon")}


@pytest.fixture(scope="module")
def sources(tmp_path_factory):
    """A folder of scikit-image photographs (JPEG, 2 classes x 12), its shards (3 of 8 samples) and the same
    files as a Parquet file with datasets' Image feature."""
    skimage_data = pytest.importorskip("skimage.data")
    root = tmp_path_factory.mktemp("shards")
    for label, names in PHOTOS.items():
        (root / "photos" / label).mkdir(parents=True)
        for index in range(12):
            image = Image.fromarray(getattr(skimage_data, names[index % 3])()).convert("RGB")
            image.rotate(30 * index).resize((48, 40)).save(root / "photos" / label / f"{index:02d}.jpg")
    assert main(["shard", "--data", str(root / "photos"), "--output", str(root / "shards"), "--shard-size", "8",
                 "--no-progress"]) == 0
    folder = open_source(str(root / "photos"), "all")
    features = datasets.Features({"image": datasets.Image(), "label": datasets.ClassLabel(names=list(PHOTOS))})
    rows = {"image": [{"bytes": open(folder.path(i), "rb").read(), "path": None} for i in range(len(folder))],
            "label": folder.labels.tolist()}
    (root / "parquet").mkdir()
    datasets.Dataset.from_dict(rows, features=features).to_parquet(str(root / "parquet" / "train.parquet"))
    return dict(folder=str(root / "photos"), wds=f"wds:{root}/shards/shard-{{000000..000002}}.tar",
                hf=f"hf:{root / 'parquet'}", root=root)


def weights(run_dir) -> dict[str, torch.Tensor]:
    tensors, _ = load_run_state(run_dir / CHECKPOINT_NAME)
    return {key: value for key, value in tensors.items() if key.startswith("model/")}


def test_shards_hold_the_folder(sources):
    info = json.loads((sources["root"] / "shards" / "_info.json").read_text())
    assert info["class_names"] == ["animal", "space"] and info["splits"]["train"]["shard_lengths"] == [8, 8, 8]
    with tarfile.open(sources["root"] / "shards" / "shard-000000.tar") as tar:
        assert sorted(tar.getnames()[:2]) == ["000000000.cls", "000000000.jpg"]
    folder, shards, arrow = (open_source(sources[kind], "all") for kind in ("folder", "wds", "hf"))
    for source in (shards, arrow):
        assert source.classes == folder.classes and np.array_equal(source.labels, folder.labels)
        for index in (0, 13, 23):
            assert np.array_equal(np.asarray(source[index][0]), np.asarray(folder[index][0]))  # the same bytes
    assert "shard-000001.tar#000000013" in shards.path(13)


def test_the_global_index_stands_for_the_header_scan_until_a_shard_changes(sources, tmp_path, monkeypatch):
    monkeypatch.setenv("BIGTRANSFER_INDEX_CACHE", str(tmp_path / "cache"))
    copy = tmp_path / "shards"
    shutil.copytree(sources["root"] / "shards", copy)
    pattern = f"wds:{copy}/shard-{{000000..000002}}.tar"
    indexed = open_source(pattern, "all")
    assert not (tmp_path / "cache").exists()  # the global index served every shard
    (copy / "_index.npz").rename(tmp_path / "moved.npz")
    scanned = open_source(pattern, "all")
    assert len(list((tmp_path / "cache").glob("*.npz"))) == 3  # each shard indexed once, into the named cache
    assert np.array_equal(indexed.labels, scanned.labels) and indexed.fingerprint() == scanned.fingerprint()
    assert [indexed.path(i) for i in range(24)] == [scanned.path(i) for i in range(24)]
    (tmp_path / "moved.npz").rename(copy / "_index.npz")
    shutil.copy(copy / "shard-000000.tar", copy / "shard-000002.tar")  # a shard replaced: its index is stale
    with open(copy / "shard-000002.tar", "ab") as handle:
        handle.write(bytes(10240))  # tar padding: another size, the same members
    with pytest.warns(UserWarning, match=r"shard-000002.tar: 1 shard\(s\) changed since"):
        changed = open_source(pattern, "all")
    assert np.array_equal(changed.labels[16:], scanned.labels[:8])
    assert changed.path(16).endswith("shard-000002.tar#000000000")


@pytest.mark.slow
def test_training_from_shards_equals_training_from_the_folder(sources, tmp_path):
    for kind in ("folder", "wds", "hf"):
        assert main(["finetune", *TRAIN, "--data", sources[kind], "--output", str(tmp_path / kind)]) == 0
    reference = weights(tmp_path / "folder")
    for kind in ("wds", "hf"):
        run = weights(tmp_path / kind)
        assert all(torch.equal(run[key], reference[key]) for key in reference), kind
        report = json.loads((tmp_path / kind / "report.json").read_text())
        assert report["num_images"] == 4 and report["data"]["data"] == sources[kind]  # 20 % of 12, twice


@pytest.fixture(scope="module")
def fashion(tmp_path_factory):
    """Fashion-MNIST's 2,000 test images of classes 0-1 as one tar shard and as a Parquet file of PNGs."""
    root = tmp_path_factory.mktemp("fashion")
    assert main(["shard", "--data", "fashion-mnist", "--split", "test", "--classes", "0-1", "--output",
                 str(root / "shards"), "--shard-size", "2000", "--no-progress"]) == 0
    source = open_source("fashion-mnist", "test", classes=[0, 1])
    features = datasets.Features({"image": datasets.Image(), "label": datasets.ClassLabel(names=source.classes)})
    rows = {"image": [{"bytes": encoded(source, index)[1], "path": None} for index in range(len(source))],
            "label": source.labels.tolist()}
    (root / "parquet").mkdir()
    datasets.Dataset.from_dict(rows, features=features).to_parquet(str(root / "parquet" / "test.parquet"))
    return dict(wds=f"wds:{root}/shards/shard-000000.tar", hf=f"hf:{root / 'parquet'}")


@pytest.mark.slow
def test_two_ranks_with_one_shard_and_workers_do_not_hang(fashion, tmp_path):
    for name, data in fashion.items():
        assert main(["pretrain", *TRAIN, "--data", data, "--output", str(tmp_path / f"{name}-one")]) == 0
    torchrun_cli([["pretrain", *TRAIN, "--data", data, "--output", str(tmp_path / f"{name}-two"), "--workers", "2"]
                   for name, data in fashion.items()], tmp_path)
    for name in ("wds", "hf"):
        one, two = weights(tmp_path / f"{name}-one"), weights(tmp_path / f"{name}-two")
        _, state = load_run_state(tmp_path / f"{name}-two" / CHECKPOINT_NAME)
        assert state["step"] == 6 and json.loads((tmp_path / f"{name}-two" / "run.json").read_text())["world_size"] == 2
        for key in one:
            torch.testing.assert_close(two[key], one[key], rtol=0, atol=1e-5, msg=key)


def _cli(*arguments: str) -> subprocess.Popen:
    environment = dict(os.environ, OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1")
    return subprocess.Popen([sys.executable, "-m", "bigtransfer.cli", *arguments], env=environment,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


@pytest.mark.slow
@pytest.mark.parametrize("kind", ["wds", "hf"])
def test_sigkill_then_resume_is_bit_exact(sources, tmp_path, kind):
    run = ["finetune", *TRAIN, "--max-steps", "12", "--data", sources[kind], "--save-every", "2"]
    straight = _cli(*run, "--output", str(tmp_path / "straight"))
    killed = _cli(*run, "--output", str(tmp_path / "killed"))
    sigkill_when_logged(killed, tmp_path / "killed")  # once a checkpoint past step 2 exists, mid-run
    _, state = load_run_state(tmp_path / "killed" / CHECKPOINT_NAME)
    assert 2 <= state["step"] < 12
    resumed = _cli(*run, "--output", str(tmp_path / "killed"), "--resume")
    for process in (straight, resumed):
        _, err = process.communicate(timeout=300)
        assert process.returncode == 0, err[-2000:]
    first, second = weights(tmp_path / "straight"), weights(tmp_path / "killed")
    assert all(torch.equal(first[key], second[key]) for key in first)


def test_errors_name_the_shard_member_or_column(sources, tmp_path):
    bad = tmp_path / "bad.tar"
    with tarfile.open(bad, "w") as tar:
        for name, data in (("a.jpg", b"\xff\xd8"), ("a.cls", b"cat")):
            member = tarfile.TarInfo(name)
            member.size = len(data)
            tar.addfile(member, io.BytesIO(data))
    with pytest.raises(ValueError, match=r"bad.tar: label member a.cls holds 'cat', expected an integer"):
        open_source(f"wds:{bad}", "all")
    (tmp_path / "zipped.tar").write_bytes(b"\x1f\x8b" + bytes(600))
    with pytest.raises(ValueError, match="not a readable uncompressed tar shard"):
        open_source(f"wds:{tmp_path / 'zipped.tar'}", "all")
    with pytest.raises(ValueError, match="pipe: commands are not read"):
        open_source("wds:pipe:curl -s https://example.com/shard-{000..009}.tar", "all")
    with pytest.raises(ValueError, match=r"ftp://example.com/s.tar: unsupported location; local paths and "):
        open_source("wds:ftp://example.com/s.tar", "all")
    with pytest.raises(ValueError, match="credentials do not belong in a data location"):
        open_source("wds:https://user:secret@example.com/s.tar", "all")
    with pytest.raises(FileNotFoundError, match=r"1 of 4 shard file\(s\) not found, e.g. .*shard-000003.tar"):
        open_source(f"wds:{sources['root']}/shards/shard-{{000000..000003}}.tar", "all")
    with pytest.raises(ValueError, match=r"no column 'img' \(columns: image, label\)"):
        open_source(f"{sources['hf']}#image=img", "all")


def test_a_missing_extra_is_named(sources, tmp_path, monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, "datasets", None)
    monkeypatch.setitem(sys.modules, "webdataset", None)
    monkeypatch.setitem(sys.modules, "webdataset.shardlists", None)
    with pytest.raises(ImportError, match=r"pip install 'bigtransfer\[hf\]'"):
        open_source(sources["hf"], "all")
    assert main(["shard", "--data", "digits", "--output", str(tmp_path / "out")]) == 1
    assert "writing shards needs webdataset: pip install 'bigtransfer[wds]'" in capsys.readouterr().err
    assert not (tmp_path / "out").exists()
