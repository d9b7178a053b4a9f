"""Kill-point sweeps: SIGKILL a real process at every file-system step of `convert`, `export`, a run's final save,
`features`, `shard` and `export --int8` (and at points in time in between), then check that what is on disk is the
old version or the new one, whole, never a mix and never an unverified export, and that no staged file is left
after the next run; `vtab1k` is killed at steps spread over its runs and must finish with the same results when
the same command runs again.

A server process imports the package once (one thread, so forking is safe) and forks one child per kill point.
The child counts the file-system operations the writers make (renames, exchanges, fsyncs, unlinks, temporary
files and directories) and kills itself with SIGKILL just before the N-th; time points are killed by the server.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from bigtransfer import BitConfig, BitForImageClassification, BitImageProcessor
from bigtransfer.train import FinetuneConfig, finetune

pytestmark = pytest.mark.skipif(not hasattr(os, "fork"), reason="POSIX fork and signals")

MIN_KILL_POINTS = 20
PIXELS = torch.randn(2, 3, 64, 64, generator=torch.Generator().manual_seed(5))

SERVER = textwrap.dedent('''
    import json, os, shutil, signal, sys, tempfile, time
    import torch
    torch.set_num_threads(1)
    import bigtransfer.files
    from bigtransfer import BitForImageClassification, export
    from bigtransfer.convert import convert_checkpoint
    from bigtransfer.train import Callback, FinetuneConfig, finetune

    state = {"armed": False, "count": 0, "kill_at": 0}

    def counted(module, name):
        original = getattr(module, name)

        def wrapper(*args, **kwargs):
            if state["armed"]:
                state["count"] += 1
                if state["count"] == state["kill_at"]:
                    os.kill(os.getpid(), signal.SIGKILL)
            return original(*args, **kwargs)

        setattr(module, name, wrapper)

    for module, name in ((os, "replace"), (os, "rename"), (os, "fsync"), (os, "unlink"), (os, "mkdir"), (os, "link"),
                         (shutil, "rmtree"), (tempfile, "mkstemp"), (tempfile, "mkdtemp"),
                         (bigtransfer.files, "_exchange")):
        counted(module, name)
    class ArmAtTheEnd(Callback):  # the final save only: steps before it are another test's
        def on_step_end(self, trainer, step, *args):
            state["armed"] = state["armed"] or step == trainer.recipe.total_steps

    task = json.loads(sys.argv[1])
    if task["kind"] in ("export", "int8"):  # import the exporters' machinery once, not in every child
        import onnx, onnxruntime, onnxscript, torch.export, torch.onnx  # noqa: F401
        import onnxruntime.quantization  # noqa: F401
        import torch._dynamo  # noqa: F401
    from bigtransfer.cli import main
    from bigtransfer.quantize import quantize
    if task["kind"] == "cli":
        import bigtransfer.commands.features, bigtransfer.commands.shard, bigtransfer.vtab  # noqa: F401
        import webdataset  # noqa: F401

    def run():
        if task["kind"] == "convert":
            state["armed"] = True
            convert_checkpoint(task["source"], task["output"], image_size=task["image_size"])
        elif task["kind"] == "export":
            model = BitForImageClassification.from_pretrained(task["model"])
            state["armed"] = True
            export(model, task["output"], task["format"], image_size=64)
        elif task["kind"] == "int8":
            model = BitForImageClassification.from_pretrained(task["model"])
            pixels = torch.randn(16, 3, 64, 64, generator=torch.Generator().manual_seed(0))
            state["armed"] = True
            quantize(model, task["output"], pixels[:8], pixels[8:])
        elif task["kind"] == "cli":
            state["armed"] = True
            main(task["argv"])
        else:
            finetune(FinetuneConfig(**task["settings"]), callbacks=(ArmAtTheEnd(),))

    for line in sys.stdin:
        point = json.loads(line)
        pid = os.fork()
        if pid == 0:
            os.dup2(os.open(os.devnull, os.O_WRONLY), 1)  # the server's stdout carries the protocol
            state["kill_at"] = point.get("op", 0)
            try:
                run()
            finally:
                with open(task["count_file"], "w") as handle:
                    handle.write(str(state["count"]))
                os._exit(0)
        if point.get("seconds"):
            time.sleep(point["seconds"])
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        _, status = os.waitpid(pid, 0)
        print(json.dumps({"killed": os.WIFSIGNALED(status)}), flush=True)
''')


class Server:
    """The forking server for one task; `kill(point)` runs the task in a child killed at `point`."""

    def __init__(self, task: dict, tmp_path: Path, temporary: Path | None = None):
        self.count_file = tmp_path / "ops"
        task = dict(task, count_file=str(self.count_file))
        environment = dict(os.environ, OMP_NUM_THREADS="1", MKL_NUM_THREADS="1")
        if temporary is not None:  # the system's temporary folder, as the child sees it
            environment["TMPDIR"] = str(temporary)
        self.process = subprocess.Popen([sys.executable, "-c", SERVER, json.dumps(task)], stdin=subprocess.PIPE,
                                        stdout=subprocess.PIPE, text=True, env=environment)

    def run(self, **point) -> bool:
        """True when the child was killed (False: it finished)."""
        self.process.stdin.write(json.dumps(point) + "\n")
        self.process.stdin.flush()
        line = self.process.stdout.readline()
        assert line, "the kill-point server died"
        return json.loads(line)["killed"]

    def operations(self) -> int:
        """How many counted operations an uninterrupted run makes (after `run()` with no kill)."""
        return int(self.count_file.read_text())

    def close(self) -> None:
        self.process.stdin.close()
        self.process.wait(timeout=60)


def _sweep(server: Server, reset, check, seconds: float, at_least: int = MIN_KILL_POINTS, most: int | None = None) -> int:
    """Kill before every counted operation (or `most` of them, spread evenly over the run) and at points in time
    (at least two, and enough for `at_least` points in all); `reset()` restores the old version before each point
    and `check(killed)` inspects what is left. Returns the number of kill points."""
    reset()
    assert not server.run(), "the uninterrupted run failed"
    check(False)
    operations = server.operations()
    chosen = range(1, operations + 1) if most is None or operations <= most else np.linspace(1, operations, most)
    points = [dict(op=op) for op in sorted({int(round(op)) for op in chosen})]
    times = max(2, at_least - len(points))
    print(f"{len(points)} kill points at file-system steps (of {operations}), {times} at points in time")
    points += [dict(seconds=seconds * (index + 1) / (times + 1)) for index in range(times)]
    for point in points:
        reset()
        killed = server.run(**point)
        check(killed)
    server.close()
    return len(points)


def _model(num_labels: int, seed: int) -> BitForImageClassification:
    torch.manual_seed(seed)
    model = BitForImageClassification(BitConfig.from_variant("tiny", num_labels=num_labels)).eval()
    with torch.no_grad():
        model.classifier[1].weight.normal_(std=0.1)
    return model


def _logits(model) -> np.ndarray:
    with torch.no_grad():
        return model(PIXELS).logits.numpy()


# ---------------------------------------------------------------------------------------------------------------


@pytest.mark.slow
def test_convert_killed_anywhere_leaves_the_old_directory_or_the_new_one(tmp_path):
    old, new = _model(3, seed=1), _model(5, seed=2)
    old.save_pretrained(tmp_path / "old")
    BitImageProcessor(size={"shortest_edge": 96}, crop_size=96).save_pretrained(tmp_path / "old")
    new.save_pretrained(tmp_path / "new-source")
    versions = {3: (_logits(old), 96), 5: (_logits(new), 128)}  # head size -> (logits, preprocessor size)
    output = tmp_path / "out"
    seen = set()

    def reset():
        shutil.rmtree(output, ignore_errors=True)
        shutil.copytree(tmp_path / "old", output)

    def check(killed):
        model = BitForImageClassification.from_pretrained(output)  # strict: config and weights must agree
        logits, size = versions[model.config.num_labels]
        assert np.allclose(_logits(model), logits, atol=1e-6)
        assert BitImageProcessor.from_pretrained(output).crop_size["height"] == size
        seen.add(model.config.num_labels)

    server = Server(dict(kind="convert", source=str(tmp_path / "new-source"), output=str(output), image_size=128),
                    tmp_path)
    assert _sweep(server, reset, check, seconds=1.5) >= MIN_KILL_POINTS
    assert seen == {3, 5}  # both the old and the new version were seen after kills


@pytest.mark.slow
@pytest.mark.parametrize("format, suffix", [("torchscript", ".pt"), ("onnx", ".onnx")])
def test_export_killed_anywhere_leaves_the_old_file_or_the_checked_new_one(tmp_path, format, suffix):
    old, new = _model(3, seed=1), _model(5, seed=2)
    new.save_pretrained(tmp_path / "model")
    previous = tmp_path / f"previous{suffix}"
    from bigtransfer import export

    export(old, previous, format, image_size=64)
    output = tmp_path / f"exported{suffix}"
    references = {3: _logits(old), 5: _logits(new)}
    seen = set()

    def reset():
        shutil.copyfile(previous, output)

    def check(killed):
        logits = _run_export(output, format)
        assert np.allclose(logits, references[logits.shape[1]], atol=1e-4)
        seen.add(logits.shape[1])
        assert not [path for path in tmp_path.iterdir() if path.name.endswith(".data")]  # no stray external data

    server = Server(dict(kind="export", model=str(tmp_path / "model"), output=str(output), format=format), tmp_path)
    # Each ONNX export takes seconds: every step of its save is swept, the time points only in TorchScript's sweep
    # (the staging and checking around the writer are the same for every format).
    onnx = format == "onnx"
    points = _sweep(server, reset, check, seconds=6.0 if onnx else 1.5, at_least=0 if onnx else MIN_KILL_POINTS)
    assert points >= (4 if onnx else MIN_KILL_POINTS)
    assert seen == {3, 5}


def _run_export(path: Path, format: str) -> np.ndarray:
    if format == "onnx":
        import onnxruntime

        session = onnxruntime.InferenceSession(str(path))
        return session.run(None, {session.get_inputs()[0].name: PIXELS.numpy()})[0]
    with torch.no_grad():
        return torch.jit.load(str(path))(PIXELS)[0].numpy()


@pytest.mark.slow
def test_a_run_killed_in_its_final_save_leaves_the_old_model_or_the_new_one(tmp_path):
    images = tmp_path / "images"
    for index, name in enumerate(["red", "green"]):
        (images / name).mkdir(parents=True)
        for number in range(6):
            pixels = np.full((16, 16, 3), 40, np.uint8)
            pixels[..., index] = 200 - 10 * number
            Image.fromarray(pixels).save(images / name / f"{number}.png")
    run = tmp_path / "run"
    settings = dict(model="tiny", data=str(images), eval_data=str(images), output=str(run), batch_size=4, max_steps=3,
                    resize=20, crop=16, seed=1, progress=False, plots=False, resume=True)
    finished = finetune(FinetuneConfig(**settings))
    new = BitForImageClassification.from_pretrained(finished.model_dir)
    old = _model(2, seed=9)  # a different model/ in the run directory, with its own processor
    shutil.rmtree(tmp_path / "old", ignore_errors=True)
    old.save_pretrained(tmp_path / "old")
    BitImageProcessor(size={"height": 24, "width": 24}, crop_size=24).save_pretrained(tmp_path / "old")
    references = {"old": (_logits(old), 24), "new": (_logits(new), 16)}
    seen = set()

    def reset():
        shutil.rmtree(run / "model", ignore_errors=True)
        shutil.copytree(tmp_path / "old", run / "model")

    def check(killed):
        model = BitForImageClassification.from_pretrained(run / "model")
        logits = _logits(model)
        version = "old" if np.allclose(logits, references["old"][0], atol=1e-6) else "new"
        assert np.allclose(logits, references[version][0], atol=1e-5)
        assert BitImageProcessor.from_pretrained(run / "model").crop_size["height"] == references[version][1]
        seen.add(version)

    server = Server(dict(kind="run", settings=settings), tmp_path)
    assert _sweep(server, reset, check, seconds=2.0) >= MIN_KILL_POINTS
    assert seen == {"old", "new"}


# ---------------------------------------------------------------------------------------------------------------
# Commands whose outputs are several files (features, shard), int8 export with its intermediates, and vtab1k.
# After each kill, what the next run does first (`files.sweep_staged` of the output) leaves the previous output
# or the new one whole, and no staged file anywhere (the output's folder, the system's temporary folder).


def _photos(folder: Path, count: int, seed: int) -> Path:
    rng = np.random.default_rng(seed)
    for index in range(count):
        label = ("red", "green")[index % 2]
        (folder / label).mkdir(parents=True, exist_ok=True)
        pixels = rng.integers(0, 120, (20, 20, 3), dtype=np.uint8)
        pixels[..., index % 2] += 120
        Image.fromarray(pixels).save(folder / label / f"{index}.png")
    return folder


def _small_model(path: Path) -> Path:
    _model(2, seed=3).save_pretrained(path)
    BitImageProcessor(size={"shortest_edge": 32}, crop_size=32).save_pretrained(path)
    return path


def _hidden(folder: Path) -> list[str]:
    return sorted(str(path.relative_to(folder)) for path in folder.rglob(".*"))


def _versions(digest, old):
    """A check against the old version and the new one (the first uninterrupted run's), after the next run's
    sweep; returns it and the set of versions seen."""
    seen, new = set(), []

    def check(output: Path, primary: Path, folder: Path, temporary: Path | None = None):
        from bigtransfer.files import sweep_staged

        sweep_staged(primary)
        now = digest(output)
        if not new:
            new.append(now)
        assert now in (old, new[0]), "neither the previous output nor the new one, whole"
        seen.add("old" if now == old else "new")
        assert _hidden(folder) == [], f"staged files left: {_hidden(folder)}"
        if temporary is not None:  # onnxruntime keeps one ".ses" file there (its session id, reused): not ours
            left = [path.name for path in temporary.iterdir() if path.name != ".ses"]
            assert left == [], f"left in the system's temporary folder: {left}"

    return check, seen


def _feature_files(output: Path):
    return tuple(path.read_bytes() if path.exists() else None
                 for path in (output, output.with_name("x.labels.npy"), output.with_name("x.index.json")))


@pytest.mark.slow
def test_features_killed_anywhere_leave_the_old_three_files_or_the_new_three(tmp_path):
    model = _small_model(tmp_path / "model")
    old_data, new_data = _photos(tmp_path / "old", 8, seed=1), _photos(tmp_path / "new", 24, seed=2)
    out = tmp_path / "out"
    out.mkdir()
    output = out / "x.npy"
    from bigtransfer.cli import main

    argv = ["features", "--model", str(model), "--output", str(output), "--no-progress", "--batch-size", "8"]
    assert main([*argv, "--data", str(old_data)]) == 0
    old = _feature_files(output)
    check_version, seen = _versions(_feature_files, old)

    def reset():
        for path, data in zip((output, out / "x.labels.npy", out / "x.index.json"), old, strict=True):
            path.write_bytes(data)

    server = Server(dict(kind="cli", argv=[*argv, "--data", str(new_data)]), tmp_path)
    points = _sweep(server, reset, lambda killed: check_version(output, output, out), seconds=1.5)
    print(f"features: {points} kill points")
    assert points >= MIN_KILL_POINTS and seen == {"old", "new"}
    assert len(json.loads((out / "x.index.json").read_text())["paths"]) in (8, 24)


def _shard_contents(folder: Path):
    import tarfile

    if not folder.is_dir():
        return None
    contents = []
    for path in sorted(folder.iterdir()):
        if path.suffix == ".tar":
            with tarfile.open(path) as archive:  # member bytes: the tar headers carry the time of writing
                contents.append((path.name, [(m.name, archive.extractfile(m).read()) for m in archive.getmembers()]))
        elif path.name == "_index.npz":  # offsets and labels; mtimes and digests change with every write (as the
            with np.load(path) as index:    # tar headers carry the time of writing)
                meta = json.loads(index["meta"].tobytes())
                for shard in meta["shards"]:
                    for volatile in ("mtime_ns", "digest", "md5"):
                        shard.pop(volatile)
                arrays = [(name, index[name].tobytes()) for name in sorted(index.files) if name != "meta"]
            contents.append((path.name, [("meta", json.dumps(meta, sort_keys=True)), *arrays]))
        else:
            contents.append((path.name, path.read_bytes()))
    return contents


@pytest.mark.slow
def test_shard_killed_anywhere_leaves_the_old_folder_or_the_new_one(tmp_path):
    pytest.importorskip("webdataset")
    old_data, new_data = _photos(tmp_path / "old", 4, seed=1), _photos(tmp_path / "new", 12, seed=2)
    out = tmp_path / "out"
    out.mkdir()
    output = out / "shards"
    from bigtransfer.cli import main

    assert main(["shard", "--data", str(old_data), "--output", str(tmp_path / "previous"), "--shard-size", "2",
                 "--no-progress"]) == 0
    old = _shard_contents(tmp_path / "previous")
    check_version, seen = _versions(_shard_contents, old)

    def reset():
        shutil.rmtree(output, ignore_errors=True)
        shutil.copytree(tmp_path / "previous", output)

    server = Server(dict(kind="cli", argv=["shard", "--data", str(new_data), "--output", str(output), "--shard-size", "3",
                                           "--no-progress", "--overwrite"]), tmp_path)
    points = _sweep(server, reset, lambda killed: check_version(output, output, out), seconds=1.0)
    print(f"shard: {points} kill points")
    assert points >= MIN_KILL_POINTS and seen == {"old", "new"}


@pytest.mark.slow
def test_int8_export_killed_anywhere_leaves_the_old_file_and_no_intermediates(tmp_path):
    pytest.importorskip("onnxruntime.quantization")
    from bigtransfer.quantize import quantize

    _model(5, seed=2).save_pretrained(tmp_path / "model")
    out, temporary = tmp_path / "out", tmp_path / "system-temp"
    out.mkdir()
    temporary.mkdir()
    output = out / "model-int8.onnx"
    pixels = torch.randn(16, 3, 64, 64, generator=torch.Generator().manual_seed(0))
    quantize(_model(3, seed=1), tmp_path / "previous.onnx", pixels[:8], pixels[8:])
    old = (tmp_path / "previous.onnx").read_bytes()
    check_version, seen = _versions(lambda path: path.read_bytes() if path.exists() else None, old)

    def reset():
        shutil.copyfile(tmp_path / "previous.onnx", output)

    def check(killed):
        check_version(output, output, out, temporary)
        import onnxruntime

        session = onnxruntime.InferenceSession(str(output))  # whichever it is, it runs
        assert session.run(None, {session.get_inputs()[0].name: PIXELS.numpy()})[0].shape[1] in (3, 5)

    server = Server(dict(kind="int8", model=str(tmp_path / "model"), output=str(output)), tmp_path, temporary)
    points = _sweep(server, reset, check, seconds=8.0)
    print(f"export --int8: {points} kill points")
    assert points >= MIN_KILL_POINTS and seen == {"old", "new"}


@pytest.mark.slow
def test_vtab1k_killed_anywhere_finishes_with_the_same_results_when_run_again(tmp_path):
    _small_model(tmp_path / "model")
    output = tmp_path / "vtab"
    argv = ["vtab1k", "--model", str(tmp_path / "model"), "--data", "digits", "--classes", "0,1", "--name", "d",
            "--output", str(output), "--train-examples", "12", "--val-examples", "6", "--lrs", "0.01", "--steps",
            "2,3", "--batch-size", "6", "--batch-split", "1", "--resize", "20", "--crop", "16", "--no-progress",
            "--no-plots", "--workers", "0"]
    from bigtransfer.cli import main

    reference = []

    def results():
        summary = json.loads((output / "vtab1k.json").read_text())
        assert summary["complete"] is True
        return [{key: task[key] for key in ("sweep", "chosen", "test_top1", "train_images")} for task in summary["tasks"]]

    def reset():
        shutil.rmtree(output, ignore_errors=True)

    def check(killed):
        if killed:
            assert main(argv) == 0, "running the same command again did not finish the protocol"
        if not reference:
            reference.append(results())
        assert results() == reference[0]
        assert _hidden(output) == [], f"staged files left: {_hidden(output)}"

    server = Server(dict(kind="cli", argv=argv), tmp_path)
    points = _sweep(server, reset, check, seconds=4.0, most=MIN_KILL_POINTS + 4)
    print(f"vtab1k: {points} kill points")
    assert points >= MIN_KILL_POINTS
