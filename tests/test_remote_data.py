"""Shards and Parquet files in object storage, read from real servers on 127.0.0.1 (moto's S3 server and a
Range-capable HTTP server) through a proxy that injects seeded connection resets and stalls: the same samples,
labels and trained weights as the local files, batches fetched in coalesced requests, failures retried and then
reported naming the object, and credentials never written anywhere."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys

import numpy as np
import pytest
import torch
from PIL import Image

from bigtransfer.cli import main
from bigtransfer.data import EvalTransform, TransformedDataset, open_source
from bigtransfer.data import storage as storage_module
from bigtransfer.data.shards import READ_AHEAD_PARTS
from bigtransfer.train import CHECKPOINT_NAME, FinetuneConfig, finetune, load_run_state
from conftest import sigkill_when_logged, torchrun_cli

pytest.importorskip("moto.server")
pytest.importorskip("s3fs")
pytest.importorskip("webdataset")
datasets = pytest.importorskip("datasets")
loopback = pytest.importorskip("loopback")  # benchmarks/loopback.py: the servers and the fault proxy

SHARDS = "shard-{000000..000002}.tar"


@pytest.fixture(scope="module")
def local(tmp_path_factory):
    """24 JPEGs in 2 classes as a folder, as `bigtransfer shard` output (3 shards and _index.npz), as the same
    shards without the global index, and as a Parquet file."""
    skimage_data = pytest.importorskip("skimage.data")
    root = tmp_path_factory.mktemp("remote")
    for number in range(24):
        folder = root / "photos" / ("animal", "space")[number % 2]
        folder.mkdir(parents=True, exist_ok=True)
        picture = getattr(skimage_data, ("chelsea", "coffee", "rocket")[number % 3])()
        Image.fromarray(picture).convert("RGB").rotate(15 * number).resize((48, 40)).save(folder / f"{number}.jpg")
    assert main(["shard", "--data", str(root / "photos"), "--output", str(root / "shards"), "--shard-size", "8",
                 "--no-progress"]) == 0
    (root / "bare").mkdir()
    for file in (root / "shards").glob("*"):
        if file.name != "_index.npz":
            shutil.copy(file, root / "bare" / file.name)
    folder = open_source(str(root / "photos"), "all")
    features = datasets.Features({"image": datasets.Image(), "label": datasets.ClassLabel(names=folder.classes)})
    rows = {"image": [{"bytes": open(folder.path(i), "rb").read(), "path": None} for i in range(len(folder))],
            "label": folder.labels.tolist()}
    (root / "parquet").mkdir()
    datasets.Dataset.from_dict(rows, features=features).to_parquet(str(root / "parquet" / "train.parquet"))
    return root


@pytest.fixture(scope="module")
def s3(local):
    server, endpoint = loopback.start_s3()
    for prefix in ("shards", "bare", "parquet"):
        loopback.upload_folder(endpoint, local / prefix, "data", prefix)
    yield endpoint
    server.stop()


@pytest.fixture
def through(s3, monkeypatch, tmp_path):
    """Point the standard S3 variables at a fault proxy in front of the server: `through(reset=..., stall=...)`."""
    proxies = []

    def connect(**faults) -> loopback.FaultProxy:
        proxy = loopback.FaultProxy(s3, seed=len(proxies), stall_s=2.0, **faults)
        proxies.append(proxy)
        for name, value in loopback.s3_environment(proxy.url).items():
            monkeypatch.setenv(name, value)
        return proxy

    monkeypatch.setenv("BIGTRANSFER_READ_TIMEOUT", "1")
    monkeypatch.setenv("BIGTRANSFER_INDEX_CACHE", str(tmp_path / "index-cache"))
    yield connect
    for proxy in proxies:
        proxy.close()


def same_samples(remote, local) -> None:
    assert remote.classes == local.classes and np.array_equal(remote.labels, local.labels)
    for index in range(len(local)):
        assert remote.stored_bytes(index) == local.stored_bytes(index), index
        assert remote.path(index).rsplit("/", 1)[1] == local.path(index).rsplit("/", 1)[1]


@pytest.mark.slow
def test_s3_shards_read_as_the_local_ones_through_resets_and_stalls(local, through):
    proxy = through(reset=0.05, stall=0.1)
    reference = open_source(f"wds:{local}/shards/{SHARDS}", "all")
    same_samples(open_source(f"wds:s3://data/shards/{SHARDS}", "all"), reference)
    bare = open_source(f"wds:s3://data/bare/{SHARDS}", "all")  # no global index: each shard scanned once, cached
    same_samples(bare, reference)
    assert sum(proxy.faults.values()) > 0, proxy.faults
    assert bare.fingerprint() == open_source(f"wds:s3://data/bare/{SHARDS}", "all").fingerprint()


def test_the_index_cache_is_written_once_and_where_the_user_says(local, through, tmp_path):
    through()
    open_source(f"wds:s3://data/bare/{SHARDS}", "all")
    entries = sorted(path.stat().st_mtime_ns for path in (tmp_path / "index-cache").glob("*.npz"))
    assert len(entries) == 3
    open_source(f"wds:s3://data/bare/{SHARDS}", "all")
    assert sorted(path.stat().st_mtime_ns for path in (tmp_path / "index-cache").glob("*.npz")) == entries


def test_http_shards_and_a_batch_in_few_requests(local):
    server, url = loopback.start_http(local / "shards")
    try:
        remote = open_source(f"wds:{url}/{SHARDS}", "all")
        same_samples(remote, open_source(f"wds:{local}/shards/{SHARDS}", "all"))
        data = TransformedDataset(remote, EvalTransform(32))
        before = server.requests
        batch = data.__getitems__(list(range(8, 16)))  # the DataLoader's batched fetch: one shard's 8 images
        assert server.requests - before <= READ_AHEAD_PARTS  # neighbours merged within each read-ahead part
        assert all(torch.equal(image, data[8 + number][0]) for number, (image, _) in enumerate(batch))
    finally:
        server.shutdown()


def test_parquet_from_s3_reads_as_the_local_file(local, through):
    through(reset=0.02)
    remote = open_source("hf:s3://data/parquet/", "all")
    reference = open_source(f"hf:{local}/parquet", "all")
    assert remote.classes == reference.classes == ["animal", "space"]
    assert np.array_equal(remote.labels, reference.labels)
    assert all(remote.stored_bytes(index) == reference.stored_bytes(index) for index in range(len(reference)))


def test_a_failing_object_is_named_after_bounded_retries(local, through, monkeypatch):
    through(reset=1.0)  # every response cut short
    monkeypatch.setattr(storage_module, "RETRY_BUDGET_S", 1.0)
    with pytest.raises(OSError, match=r"s3://data/.*failed \d+ times in \d+ s") as caught:
        open_source(f"wds:s3://data/shards/{SHARDS}", "all")
    assert "loopback-secret" not in str(caught.value) and "loopback-key-id" not in str(caught.value)


def weights(run_dir) -> dict[str, torch.Tensor]:
    tensors, _ = load_run_state(run_dir / CHECKPOINT_NAME)
    return {key: value for key, value in tensors.items() if key.startswith("model/")}


@pytest.mark.slow
def test_fine_tuning_from_s3_gives_the_local_weights_with_and_without_faults(local, through, tmp_path):
    settings = dict(model="tiny", max_steps=4, base_lr=0.01, batch_size=8, batch_split=1, resize=40, crop=32,
                    seed=3, device="cpu", progress=False, plots=False, workers=2)
    finetune(FinetuneConfig(data=f"wds:{local}/shards/{SHARDS}", output=str(tmp_path / "local"), **settings))
    reference = weights(tmp_path / "local")
    for name, faults in (("clean", {}), ("faulty", dict(reset=0.05, stall=0.05))):
        proxy = through(**faults)
        finetune(FinetuneConfig(data=f"wds:s3://data/shards/{SHARDS}", output=str(tmp_path / name), **settings))
        run = weights(tmp_path / name)
        assert all(torch.equal(run[key], reference[key]) for key in reference), name
        assert not faults or sum(proxy.faults.values()) > 0
        for file in (tmp_path / name).rglob("*"):  # the credentials are in the environment, never in the run
            if file.is_file():
                content = file.read_bytes()
                assert b"loopback-secret" not in content and b"loopback-key-id" not in content, file
    report = json.loads((tmp_path / "faulty" / "report.json").read_text())
    assert report["data"]["data"] == f"wds:s3://data/shards/{SHARDS}"


def _cli(*arguments: str) -> subprocess.Popen:
    environment = dict(os.environ, OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1")
    return subprocess.Popen([sys.executable, "-m", "bigtransfer.cli", *arguments], env=environment,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


TRAIN = ["--model", "tiny", "--base-lr", "0.01", "--batch-size", "8", "--batch-split", "1", "--resize", "40",
         "--crop", "32", "--seed", "3", "--no-progress", "--no-plots", "--device", "cpu", "--workers", "2"]


@pytest.mark.slow
def test_sigkill_then_resume_from_s3_is_bit_exact(local, through, tmp_path):
    through(reset=0.03, stall=0.03)
    run = ["finetune", *TRAIN, "--max-steps", "12", "--save-every", "2"]
    straight = _cli(*run, "--data", f"wds:{local}/shards/{SHARDS}", "--output", str(tmp_path / "local"))
    remote = [*run, "--data", f"wds:s3://data/shards/{SHARDS}", "--output", str(tmp_path / "killed")]
    killed = _cli(*remote)
    sigkill_when_logged(killed, tmp_path / "killed")  # once a checkpoint past step 2 exists, mid-run
    _, state = load_run_state(tmp_path / "killed" / CHECKPOINT_NAME)
    assert 2 <= state["step"] < 12
    resumed = _cli(*remote, "--resume")
    for process in (straight, resumed):
        _, err = process.communicate(timeout=300)
        assert process.returncode == 0, err[-2000:]
    reference, run_weights = weights(tmp_path / "local"), weights(tmp_path / "killed")
    assert all(torch.equal(reference[key], run_weights[key]) for key in reference)


@pytest.mark.slow
def test_two_ranks_with_two_workers_each_read_s3_in_equal_steps(local, through, tmp_path):

    through(reset=0.02)
    run = ["pretrain", *TRAIN, "--max-steps", "6"]
    assert main([*run, "--workers", "0", "--data", f"wds:{local}/shards/{SHARDS}", "--output",
                 str(tmp_path / "one")]) == 0
    torchrun_cli([[*run, "--data", f"wds:s3://data/shards/{SHARDS}", "--output", str(tmp_path / "two")]], tmp_path)
    _, state = load_run_state(tmp_path / "two" / CHECKPOINT_NAME)
    assert state["step"] == 6 and json.loads((tmp_path / "two" / "run.json").read_text())["world_size"] == 2
    one, two = weights(tmp_path / "one"), weights(tmp_path / "two")
    for key in one:
        torch.testing.assert_close(two[key], one[key], rtol=0, atol=1e-5, msg=key)


def test_missing_credentials_are_named_at_once(local, through, monkeypatch, tmp_path):
    through()
    for name in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY"):
        monkeypatch.delenv(name)
    for name in ("AWS_SHARED_CREDENTIALS_FILE", "AWS_CONFIG_FILE"):
        monkeypatch.setenv(name, str(tmp_path / "none"))
    monkeypatch.setenv("AWS_EC2_METADATA_DISABLED", "true")
    with pytest.raises(PermissionError, match=r"s3://data/shards: Unable to locate credentials; give credentials in "
                                              r"the environment"):
        open_source(f"wds:s3://data/shards/{SHARDS}", "all")
