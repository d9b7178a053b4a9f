"""The VTAB-1k-style protocol end to end on two small local tasks: seeded train/val draws written to the run,
the sweep scored on the validation part, the best retrained on both and tested; task files and their errors."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from PIL import Image

from bigtransfer import BitConfig, BitForImageClassification
from bigtransfer.cli import main
from bigtransfer.report import read_report
from bigtransfer.vtab import read_tasks

SMALL = ["--train-examples", "12", "--val-examples", "6", "--lrs", "0.01,0.003", "--steps", "2,3", "--batch-size", "6",
         "--batch-split", "1", "--resize", "20", "--crop", "16", "--no-progress", "--no-plots"]


@pytest.fixture(scope="module")
def workspace(tmp_path_factory):
    """Task files beside their data: scikit-image photographs in two classes (a pool and a test folder), a CSV
    train800 / val200 / test of the same images, and a tiny model."""
    skimage_data = pytest.importorskip("skimage.data")
    root = tmp_path_factory.mktemp("vtab")
    names = {"animal": ("chelsea", "coffee", "astronaut"), "space": ("rocket", "hubble_deep_field", "moon")}
    rows = {"train800": [], "val200": [], "test": []}
    for split, count in (("pool", 10), ("test", 3)):
        for label, images in names.items():
            (root / "photos" / split / label).mkdir(parents=True)
            for index in range(count):
                image = Image.fromarray(getattr(skimage_data, images[index % 3])()).convert("RGB")
                path = root / "photos" / split / label / f"{index}.jpg"
                image.rotate(36 * index + (18 if split == "test" else 0)).resize((40, 32)).save(path)
                part = "test" if split == "test" else "train800" if index < 6 else "val200"
                rows[part].append(f"{path.relative_to(root)},{label}")
    for part, lines in rows.items():
        (root / f"{part}.csv").write_text("path,label\n" + "\n".join(lines) + "\n")
    torch.manual_seed(0)
    BitForImageClassification(BitConfig.from_variant("tiny", num_labels=2)).save_pretrained(root / "model")
    tasks = {"tasks": [
        {"name": "photos", "group": "natural", "data": "photos/pool", "test": "photos/test"},
        {"name": "digits", "group": "structured", "data": "digits", "classes": [0, 1, 2]},
    ]}
    (root / "tasks.json").write_text(json.dumps(tasks))
    return root


@pytest.mark.slow
def test_two_tasks_end_to_end(workspace, tmp_path, capsys):
    output = tmp_path / "vtab"
    argv = ["vtab1k", "--model", str(workspace / "model"), "--tasks", str(workspace / "tasks.json"),
            "--output", str(output), *SMALL]
    assert main(argv) == 0
    table = capsys.readouterr().out
    summary = json.loads((output / "vtab1k.json").read_text())
    assert [task["name"] for task in summary["tasks"]] == ["photos", "digits"] and "mean over 2 task(s)" in table
    for task in summary["tasks"]:
        splits = json.loads((output / task["name"] / "splits.json").read_text())
        train, val = set(splits["train800"]["indices"]), set(splits["val200"]["indices"])
        assert len(train) == 12 and len(val) == 6 and not train & val and splits["seed"] == 0
        assert [(entry["lr"], entry["steps"]) for entry in task["sweep"]] == [(0.01, 2), (0.01, 3), (0.003, 2), (0.003, 3)]
        best = max(task["sweep"], key=lambda entry: entry["val_top1"])
        assert task["chosen"] == dict(lr=best["lr"], steps=best["steps"]) and task["train_images"] == 18
        for entry in task["sweep"]:  # each sweep run was scored on exactly the val200 images
            run = output / task["name"] / "sweep" / f"lr{entry['lr']:g}-steps{entry['steps']}"
            report = read_report(run / "report.json")
            assert report.num_images == 6 and report.top1 == entry["val_top1"]
        final = read_report(output / task["name"] / "final" / "report.json")
        assert final.top1 == task["test_top1"] and final.num_images == task["test_images"]
    photos = json.loads((output / "photos" / "splits.json").read_text())
    assert all(path.startswith(str(workspace / "photos" / "pool")) for path in photos["train800"]["paths"])
    assert summary["tasks"][0]["test_images"] == 6  # the whole test folder
    assert summary["mean"] == pytest.approx(np.mean([task["test_top1"] for task in summary["tasks"]]))
    assert summary["groups"] == {"natural": summary["tasks"][0]["test_top1"], "structured": summary["tasks"][1]["test_top1"]}
    # The same command again continues: every run is complete, so nothing trains and the results stand.
    before = (output / "photos" / "final" / "metrics.jsonl").read_text()
    assert main(argv) == 0
    assert json.loads((output / "vtab1k.json").read_text())["tasks"] == summary["tasks"]
    assert (output / "photos" / "final" / "metrics.jsonl").read_text() == before


@pytest.mark.slow
def test_given_train800_and_val200_are_used_as_they_are(workspace, tmp_path):
    (tmp_path / "tasks.json").write_text(json.dumps({"tasks": [{
        "name": "csv", "train800": str(workspace / "train800.csv"), "val200": str(workspace / "val200.csv"),
        "test": str(workspace / "test.csv")}]}))
    assert main(["vtab1k", "--model", str(workspace / "model"), "--tasks", str(tmp_path / "tasks.json"),
                 "--output", str(tmp_path / "out"), *SMALL]) == 0
    task = json.loads((tmp_path / "out" / "vtab1k.json").read_text())["tasks"][0]
    assert task["train_images"] == 20 and task["test_images"] == 6
    splits = json.loads((tmp_path / "out" / "csv" / "splits.json").read_text())
    assert splits["train800"]["images"] == 12 and splits["val200"]["images"] == 8


@pytest.mark.parametrize(("tasks", "message"), [
    ({"task": []}, r'expected \{"tasks"'),
    ({"tasks": [{"data": "digits"}]}, r'task 1: expected an object with a "name"'),
    ({"tasks": [{"name": "a", "data": "digits", "tset": "x"}]}, r"task 1 \(a\): unknown field\(s\) \['tset'\]"),
    ({"tasks": [{"name": "a", "data": 5}]}, r'"data" must be a string'),
    ({"tasks": [{"name": "a", "data": "digits"}, {"name": "a", "data": "digits"}]}, "task names repeat"),
    ({"tasks": [{"name": "../outside", "data": "digits"}]}, r"task name '../outside': it names the task's folder"),
])
def test_task_file_errors_name_the_task_and_field(tmp_path, tasks, message):
    (tmp_path / "tasks.json").write_text(json.dumps(tasks))
    with pytest.raises(ValueError, match=message):
        read_tasks(tmp_path / "tasks.json")


def test_refused_before_training(workspace, tmp_path, capsys):
    (tmp_path / "both.json").write_text(json.dumps({"tasks": [{"name": "b", "data": "digits", "train800": "x.csv"}]}))
    base = ["vtab1k", "--model", str(workspace / "model"), *SMALL]
    assert main([*base, "--tasks", str(tmp_path / "both.json"), "--output", str(tmp_path / "o1")]) == 2
    assert 'give either "data" or "train800" and "val200", not both' in capsys.readouterr().err
    assert main([*base, "--data", "digits", "--classes", "0,1", "--train-examples", "500",
                 "--output", str(tmp_path / "o2")]) == 2
    assert "506 training examples are drawn (500 + 6) but digits has" in capsys.readouterr().err
    assert read_tasks(workspace / "tasks.json")[0].data == str(workspace / "photos" / "pool")  # relative to the file


def test_a_stopped_protocol_resumes_by_running_the_same_command(workspace, tmp_path, capsys, caplog, monkeypatch):
    import bigtransfer.vtab as vtab
    from conftest import SigtermAfter

    calls = []

    def finetune_stopped_once(settings, callbacks=()):  # a real SIGTERM, in the first run of the sweep
        calls.append(settings.output)
        return vtab_finetune(settings, callbacks=(SigtermAfter(1),) if len(calls) == 1 else ())

    vtab_finetune = vtab.finetune
    monkeypatch.setattr(vtab, "finetune", finetune_stopped_once)
    argv = ["vtab1k", "--model", str(workspace / "model"), "--data", "digits", "--classes", "0,1", "--name", "d",
            "--output", str(tmp_path / "out"), *SMALL]
    assert main(argv) == 130
    err = capsys.readouterr().err
    assert "run the same vtab1k command again (same --output) to continue" in err
    assert "--resume" not in err + caplog.text and "run the same vtab1k command again to continue" in caplog.text
    assert json.loads((tmp_path / "out" / "vtab1k.json").read_text())["complete"] is False
    assert main(argv) == 0  # not "already holds files that are not a VTAB-1k run"
    summary = json.loads((tmp_path / "out" / "vtab1k.json").read_text())
    assert summary["complete"] is True and len(summary["tasks"][0]["sweep"]) == 4
    assert read_report(calls[0] / "report.json").num_images == 6  # the stopped run was finished on resume


@pytest.mark.parametrize(("classes", "message"), [
    (5, r'task 1 \(a\): "classes" must be a non-empty list of class indices or names, or a string such as "0-4", got 5'),
    ([0, 1.5], r'"classes" must be a non-empty list .* got \[0, 1.5\]'),
])
def test_task_classes_of_the_wrong_type_name_the_field(tmp_path, classes, message):
    (tmp_path / "tasks.json").write_text(json.dumps({"tasks": [{"name": "a", "data": "digits", "classes": classes}]}))
    with pytest.raises(ValueError, match=message):
        read_tasks(tmp_path / "tasks.json")


def test_task_specs_are_read_as_data_accepts_them(tmp_path):
    tasks = [{"name": "a", "data": "wds:shards/s-{000000..000001}.tar", "test": "hf:saved#image=img", "classes": "0-1"},
             {"name": "b", "data": "cifar10:cifar", "test": "/abs/test.csv"},
             {"name": "c", "data": "fashion-mnist", "test": "folder/test"}]
    (tmp_path / "tasks.json").write_text(json.dumps({"tasks": tasks}))
    read = read_tasks(tmp_path / "tasks.json")
    assert read[0].data == f"wds:{tmp_path}/shards/s-{{000000..000001}}.tar" and read[0].test == f"hf:{tmp_path}/saved#image=img"
    assert read[0].classes == [0, 1]  # a range, not the characters "0", "-", "1"
    assert (read[1].data, read[1].test) == (f"cifar10:{tmp_path}/cifar", "/abs/test.csv")
    assert (read[2].data, read[2].test) == ("fashion-mnist", f"{tmp_path}/folder/test")


def test_shards_named_in_a_task_file_are_trained_on(workspace, tmp_path):
    pytest.importorskip("webdataset")
    assert main(["shard", "--data", str(workspace / "photos" / "pool"), "--output", str(tmp_path / "shards"),
                 "--shard-size", "8", "--no-progress"]) == 0
    (tmp_path / "tasks.json").write_text(json.dumps({"tasks": [
        {"name": "s", "data": "wds:shards/shard-{000000..000002}.tar", "test": str(workspace / "photos" / "test")}]}))
    assert main(["vtab1k", "--model", str(workspace / "model"), "--tasks", str(tmp_path / "tasks.json"),
                 "--output", str(tmp_path / "out"), *SMALL, "--lrs", "0.01", "--steps", "1"]) == 0
    assert json.loads((tmp_path / "out" / "vtab1k.json").read_text())["tasks"][0]["train_images"] == 18


def test_test_data_that_is_the_training_data_is_refused(workspace, tmp_path, capsys):
    (tmp_path / "tasks.json").write_text(json.dumps({"tasks": [
        {"name": "same", "data": str(workspace / "photos" / "pool"), "test": str(workspace / "photos" / "pool")}]}))
    assert main(["vtab1k", "--model", str(workspace / "model"), "--tasks", str(tmp_path / "tasks.json"),
                 "--output", str(tmp_path / "out"), *SMALL]) == 2
    pool = workspace / "photos" / "pool"
    assert (f"task same: 18 of the 20 test images of {pool} are also training images of {pool}"
            in capsys.readouterr().err)
    assert not (tmp_path / "out" / "same" / "sweep").exists()  # refused before any training
