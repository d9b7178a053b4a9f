"""The README's usage section runs as written, so it cannot drift from the API and the CLI.

Every code block under "## Usage" runs in order in one working directory that holds what the commands name
(photos/, test-photos/, train.csv, cat.jpg, dog.jpg, imagenet/train, data/cifar-10-batches-py, vtab.json, made
from scikit-image's photographs) and a Hugging Face cache holding the checkpoints they name (Google's BiT-M-R50x1,
google/bit-50), so nothing is downloaded. Only the sizes change: training commands get `SMALL_RUN` appended
(argparse lets the last value win), `distill` `SMALL_DISTILL`, `vtab1k` `SMALL_VTAB`, `export --int8` small image counts, and `--nproc_per_node 8` runs 2 processes. `NOT_RUN` lists what cannot run
on one machine, with the reason.
"""

from __future__ import annotations

import hashlib
import json
import os
import pickle
import re
import shlex
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from bigtransfer import BitConfig, BitForImageClassification, BitImageProcessor
from bigtransfer.checkpoints.writers import save_npz
from bigtransfer.cli import main

README = Path(__file__).parents[1] / "README.md"
SMALL_RUN = ["--max-steps", "1", "--batch-size", "4", "--batch-split", "1", "--resize", "36", "--crop", "32",
             "--no-progress", "--no-plots"]
SMALL_VTAB = ["--train-examples", "4", "--val-examples", "2", "--lrs", "0.01", "--steps", "1", "--batch-size", "2",
              "--batch-split", "1", "--resize", "36", "--crop", "32", "--no-progress", "--no-plots"]
SMALL_DISTILL = ["--max-steps", "1", "--batch-size", "4", "--batch-split", "1", "--crop", "32", "--teacher-crop", "32",
                 "--no-progress", "--no-plots"]
NOT_RUN = {"--nnodes 2": "needs two machines (the single-machine torchrun line runs)",
           "BiT-M-R152x2-ILSVRC2012": "the paper's ImageNet distillation: ImageNet and a 930 MB teacher"}
COMMIT = "0" * 40
PHOTOS = ("astronaut", "coffee", "chelsea", "rocket", "hubble_deep_field", "immunohistochemistry")


def usage_blocks() -> list[tuple[str, str]]:
    """(language, code) of every fenced block between "## Usage" and the next top-level section."""
    text = README.read_text(encoding="utf-8")
    usage = text.split("\n## Usage", 1)[1].split("\n## ", 1)[0]
    return re.findall(r"```(python|bash)\n(.*?)```", usage, flags=re.DOTALL)


def shell_commands(code: str) -> list[list[str]]:
    """The commands of a bash block: continuation lines joined, comments dropped."""
    joined = code.replace("\\\n", " ")
    return [shlex.split(line, comments=True) for line in joined.splitlines()
            if line.strip() and not line.lstrip().startswith("#")]


def _photos(count: int, size: tuple[int, int]) -> list[Image.Image]:
    skimage_data = pytest.importorskip("skimage.data")
    images = [Image.fromarray(getattr(skimage_data, name)()).convert("RGB") for name in PHOTOS]
    return [images[index % len(images)].rotate(90 * (index // len(images))).resize(size) for index in range(count)]


def _image_folder(root: Path, per_class: int = 4) -> None:
    for index, image in enumerate(_photos(2 * per_class, (64, 48))):
        folder = root / ("ab"[index % 2])
        folder.mkdir(parents=True, exist_ok=True)
        image.save(folder / f"{index}.jpg")


def _cifar(root: Path) -> None:
    """CIFAR-10's python pickles, filled with 32x32 crops of the photographs (30 per class: 25-shot sets fit)."""
    root.mkdir(parents=True)
    crops = np.stack([np.asarray(image) for image in _photos(300, (32, 32))])
    rows = crops.transpose(0, 3, 1, 2).reshape(300, 3072)  # CIFAR's row layout: the R plane, then G, then B
    labels = [index % 10 for index in range(300)]
    for name in ("data_batch_1", "test_batch"):
        (root / name).write_bytes(pickle.dumps({b"data": rows, b"labels": labels}, protocol=2))
    names = ["airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck"]
    (root / "batches.meta").write_bytes(pickle.dumps({b"label_names": [n.encode() for n in names]}, protocol=2))


def _cache(cache: Path) -> None:
    """The Hugging Face cache as bigtransfer and huggingface_hub lay it out, holding the named checkpoints."""
    torch.manual_seed(0)
    google = cache / "bit_models" / "BiT-M-R50x1.npz"
    google.parent.mkdir(parents=True)
    save_npz(BitForImageClassification(BitConfig.from_variant("tiny", num_labels=10)), google)
    record = {"url": "https://storage.googleapis.com/bit_models/BiT-M-R50x1.npz", "size": google.stat().st_size,
              "sha256": hashlib.sha256(google.read_bytes()).hexdigest()}
    google.with_name(google.name + ".json").write_text(json.dumps(record))
    repo = cache / "models--google--bit-50"
    hub_model = BitForImageClassification(BitConfig.from_variant("tiny", num_labels=3))
    with torch.no_grad():  # logits of a trained model's size (a random head gives ~0.1, where fp32 rounding shows)
        hub_model.classifier[1].weight.mul_(100)
    hub_model.save_pretrained(repo / "snapshots" / COMMIT)
    BitImageProcessor(size={"shortest_edge": 40}, crop_size={"height": 32, "width": 32}).save_pretrained(
        repo / "snapshots" / COMMIT)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(COMMIT)


def _demo_model(directory: Path) -> None:
    """What `demo --quick` leaves for the quick start: a tiny BiT with 5 classes and its squash processor."""
    torch.manual_seed(0)
    BitForImageClassification(BitConfig.from_variant("tiny", num_labels=5)).save_pretrained(directory)
    BitImageProcessor.squash(28).save_pretrained(directory)


@pytest.fixture
def workspace(tmp_path, monkeypatch):
    _image_folder(tmp_path / "photos")
    _image_folder(tmp_path / "test-photos", per_class=2)
    _image_folder(tmp_path / "imagenet" / "train")
    _cifar(tmp_path / "data" / "cifar-10-batches-py")
    rows = [f"{path.relative_to(tmp_path)},{path.parent.name}" for path in sorted((tmp_path / "photos").rglob("*.jpg"))]
    (tmp_path / "train.csv").write_text("path,label\n" + "\n".join(rows) + "\n")
    tasks = [{"name": "photos", "group": "natural", "data": "photos", "test": "test-photos"},
             {"name": "digits", "group": "structured", "data": "digits"}]
    (tmp_path / "vtab.json").write_text(json.dumps({"tasks": tasks}))
    cat, dog = _photos(3, (64, 48))[2], _photos(3, (64, 48))[1]
    cat.save(tmp_path / "cat.jpg")
    dog.save(tmp_path / "dog.jpg")
    _cache(tmp_path / "cache")
    _demo_model(tmp_path / "runs" / "demo-quick" / "upstream" / "tiny-5classes" / "model")
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "cache"))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.chdir(tmp_path)
    return tmp_path


def _run_shell(command: list[str], workspace: Path) -> None:
    if command[0] == "bigtransfer":
        argv = command[1:]
        if argv[0] in ("finetune", "pretrain"):
            argv += SMALL_RUN
        elif argv[0] == "distill":
            argv += SMALL_DISTILL
        elif argv[0] == "vtab1k":
            argv += SMALL_VTAB
        elif "--int8" in argv:
            argv += ["--calibration-images", "4", "--check-images", "4"]
        assert main(argv) == 0, " ".join(command)
        return
    assert command[0] == "torchrun", command
    arguments = command[1:]
    arguments[arguments.index("--nproc_per_node") + 1] = "2"
    command = [sys.executable, "-m", "torch.distributed.run", *arguments, *SMALL_RUN]
    result = subprocess.run(command, cwd=workspace, capture_output=True, text=True, timeout=600,
                            env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert result.returncode == 0, result.stderr[-3000:]


@pytest.mark.slow
def test_the_usage_section_runs_as_written(workspace):
    blocks = usage_blocks()
    assert [language for language, _ in blocks].count("bash") >= 2 and len(blocks) >= 5
    namespace = {"images": _photos(2, (64, 48)), "__name__": "readme"}
    ran, skipped = 0, []
    for language, code in blocks:
        if language == "python":
            exec(compile(code, "README.md", "exec"), namespace)  # noqa: S102 - the README's own examples
            ran += 1
            continue
        for command in shell_commands(code):
            reasons = [marker for marker in NOT_RUN if marker in " ".join(command)]
            if reasons:
                skipped += reasons
            else:
                _run_shell(command, workspace)
                ran += 1
    assert sorted(skipped) == sorted(NOT_RUN), "every NOT_RUN entry names a README command, once"
    assert ran >= 13
    # What the examples promise: the run's model, the evaluation, predictions and features, the conversion.
    assert (workspace / "runs" / "photos" / "model" / "config.json").is_file()
    assert json.loads((workspace / "runs" / "photos" / "eval" / "report.json").read_text())["data"]["split"] == "all of it"
    assert (workspace / "features.index.json").is_file() and (workspace / "converted" / "model.safetensors").is_file()
    assert (workspace / "model.onnx").is_file() and (workspace / "runs" / "photos-ddp" / "model").is_dir()
    assert any("fewshot_25shot" in line for line in (workspace / "runs" / "bit-s" / "metrics.jsonl").open())
    assert (workspace / "runs" / "bit-s" / "fewshot" / "fewshot.json").is_file()
    assert set(json.loads((workspace / "runs" / "vtab" / "vtab1k.json").read_text())["groups"]) == {"natural", "structured"}
    assert (workspace / "model-int8.onnx").is_file() and namespace["report"].operators["QLinearConv"] > 0
    assert (workspace / "shards" / "_info.json").is_file() and len(list((workspace / "shards").glob("*.tar"))) == 2
