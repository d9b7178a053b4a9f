"""Crash safety with real processes: SIGKILL in the middle of a file or checkpoint write, SIGTERM, and two
runs pointed at one output directory.

A SIGKILL cannot be caught, so what it leaves behind is exactly what the code wrote before it: these tests
kill real child processes while they write (detected by the temporary file `files.atomic_path` creates
beside its target) and then check that the previous file or checkpoint is intact and that `--resume`
carries the run to the end.
"""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from bigtransfer.train import CHECKPOINT_NAME, LOCK_NAME, load_run_state

pytestmark = pytest.mark.skipif(sys.platform == "win32", reason="POSIX signals")

TRAIN = ["--batch-size", "4", "--resize", "20", "--crop", "16", "--no-progress", "--no-plots", "--device", "cpu",
         "--base-lr", "0.01", "--seed", "3"]
ENVIRONMENT = dict(os.environ, OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1")


@pytest.fixture(scope="module")
def folder(tmp_path_factory) -> Path:
    """Three classes of 10 small noise images with a class-dependent tint."""
    root = tmp_path_factory.mktemp("crash") / "images"
    rng = np.random.default_rng(0)
    for label, name in enumerate(["red", "green", "blue"]):
        (root / name).mkdir(parents=True)
        for index in range(10):
            pixels = rng.integers(0, 120, (20, 20, 3), dtype=np.uint8)
            pixels[..., label] += 120
            Image.fromarray(pixels).save(root / name / f"{index}.png")
    return root


def _finetune(folder: Path, output: Path, *extra: str) -> subprocess.Popen:
    command = [sys.executable, "-m", "bigtransfer.cli", "finetune", "--model", "tiny", "--data", str(folder),
               "--output", str(output), *TRAIN, *extra]
    return subprocess.Popen(command, env=ENVIRONMENT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def _temporaries(directory: Path, name: str) -> list[Path]:
    return sorted(directory.glob(f".{name}.*.tmp"))


def _kill_during_write(process: subprocess.Popen, directory: Path, name: str, after: int, timeout: float = 120) -> bool:
    """SIGKILL `process` while it writes `directory/name` for the `after`-th time or later; True if the kill
    landed mid-write (its temporary file outlived the process)."""
    seen, writing = 0, False
    before = set(_temporaries(directory, name))
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline and process.poll() is None:
        now_writing = bool(set(_temporaries(directory, name)) - before)
        if now_writing and not writing:
            seen += 1
            if seen >= after:
                process.kill()
                break
        writing = now_writing
    process.wait(timeout=30)
    return bool(set(_temporaries(directory, name)) - before)


# ---------------------------------------------------------------------------------------------------- atomic writes

WRITER = textwrap.dedent("""
    import sys, time
    from bigtransfer.files import atomic_path
    target, marker = sys.argv[1], sys.argv[2]
    with atomic_path(target) as temporary:
        with open(temporary, "wb") as handle:
            for chunk in range(1000):
                handle.write(bytes([chunk % 256]) * 4096)
                handle.flush()
                if chunk == 10:
                    open(marker, "w").close()  # tells the test the write is under way
                time.sleep(0.01)
""")


@pytest.mark.slow
def test_sigkill_during_an_atomic_write_leaves_the_old_file(tmp_path):
    target, marker = tmp_path / "model.safetensors", tmp_path / "writing"
    target.write_bytes(b"the previous, complete file")
    target.chmod(0o640)
    writer = subprocess.Popen([sys.executable, "-c", WRITER, str(target), str(marker)], env=ENVIRONMENT)
    deadline = time.monotonic() + 60
    while not marker.exists() and writer.poll() is None and time.monotonic() < deadline:
        time.sleep(0.005)
    assert marker.exists(), "the writer never started writing"
    writer.send_signal(signal.SIGKILL)
    assert writer.wait(timeout=30) == -signal.SIGKILL
    assert target.read_bytes() == b"the previous, complete file"
    leftovers = _temporaries(tmp_path, target.name)
    assert len(leftovers) == 1 and 0 < leftovers[0].stat().st_size < 1000 * 4096  # killed mid-write

    # The same write, not interrupted, replaces the file whole and keeps its permissions.
    finished = subprocess.run([sys.executable, "-c", WRITER.replace("time.sleep(0.01)", "pass"), str(target),
                               str(marker)], env=ENVIRONMENT, timeout=60)
    assert finished.returncode == 0
    assert target.stat().st_size == 1000 * 4096 and target.stat().st_mode & 0o777 == 0o640
    assert _temporaries(tmp_path, target.name) == []  # the killed write's temporary is swept by the next write


# ---------------------------------------------------------------------------------------------------- training runs


@pytest.mark.slow
def test_sigkill_during_checkpoint_writes_then_resume_finishes_the_run(folder, tmp_path):
    """Kill the run twice while it writes a checkpoint (every step saves one); each time the previous
    checkpoint must load and `--resume` must continue from it, and the run must end with every step logged once."""
    output, steps, kills_mid_write = tmp_path / "run", 30, 0
    for kill_after in (3, 4):
        run = _finetune(folder, output, "--max-steps", str(steps), "--save-every", "1", "--resume")
        kills_mid_write += _kill_during_write(run, output, CHECKPOINT_NAME, after=kill_after)
        assert run.returncode == -signal.SIGKILL, run.stderr.read()
        _, state = load_run_state(output / CHECKPOINT_NAME)  # the previous checkpoint, whole
        assert 1 <= state["step"] < steps
        assert (output / LOCK_NAME).exists()  # SIGKILL leaves the lock; the next run takes it over
    assert kills_mid_write >= 1, "no kill landed during a checkpoint write"

    resumed = _finetune(folder, output, "--max-steps", str(steps), "--save-every", "1", "--resume")
    out, err = resumed.communicate(timeout=300)
    assert resumed.returncode == 0, err
    assert "resuming" in err and "top-1" in out
    _, state = load_run_state(output / CHECKPOINT_NAME)
    assert state["step"] == steps
    records = [json.loads(line) for line in (output / "metrics.jsonl").read_text().splitlines()]
    assert [record["step"] for record in records if "loss" in record] == list(range(1, steps + 1))
    assert all(np.isfinite(record["loss"]) for record in records if "loss" in record)
    assert not (output / LOCK_NAME).exists()
    assert not _temporaries(output, CHECKPOINT_NAME)  # the killed writes' leftovers are removed on resume


@pytest.mark.slow
def test_sigterm_saves_a_checkpoint_and_exits_with_data_loader_workers(folder, tmp_path):
    """SIGTERM with two DataLoader worker processes: a checkpoint at the current step, exit 128 + 15, no
    orphaned workers, no lock left."""
    output = tmp_path / "run"
    run = _finetune(folder, output, "--max-steps", "500", "--workers", "2")
    metrics, deadline = output / "metrics.jsonl", time.monotonic() + 120
    while time.monotonic() < deadline and run.poll() is None:
        if metrics.is_file() and len(metrics.read_text().splitlines()) >= 3:
            break
        time.sleep(0.01)
    children = _children(run.pid)
    run.send_signal(signal.SIGTERM)
    _, err = run.communicate(timeout=120)
    assert run.returncode == 128 + signal.SIGTERM, err
    assert "--resume" in err
    _, state = load_run_state(output / CHECKPOINT_NAME)
    assert 3 <= state["step"] < 500
    assert not (output / LOCK_NAME).exists()
    time.sleep(0.5)
    assert not [pid for pid in children if _running(pid)], "DataLoader workers outlived the run"


@pytest.mark.slow
def test_two_runs_on_one_output_directory_are_refused(folder, tmp_path):
    output = tmp_path / "run"
    first = _finetune(folder, output, "--max-steps", "500")
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline and first.poll() is None and not (output / LOCK_NAME).exists():
        time.sleep(0.01)
    assert (output / LOCK_NAME).exists(), first.stderr.read() if first.poll() is not None else "no lock"
    try:
        for extra in ([], ["--resume"]):
            second = _finetune(folder, output, "--max-steps", "500", *extra)
            _, err = second.communicate(timeout=120)
            lines = [line for line in err.splitlines() if line.startswith("bigtransfer finetune: error:")]
            assert second.returncode != 0 and len(lines) == 1 and "Traceback" not in err, err
            assert f"{output} is in use by process {first.pid}" in lines[0]
        assert first.poll() is None, "the first run must be untouched"
    finally:
        first.send_signal(signal.SIGTERM)
        first.communicate(timeout=120)
    assert first.returncode == 128 + signal.SIGTERM


def _children(pid: int) -> list[int]:
    """Direct child processes of `pid`, from /proc."""
    found = []
    for status in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = status.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if int(fields[1]) == pid:
            found.append(int(status.parent.name))
    return found


def _running(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except OSError:
        return False
    return state != "Z"


# ---------------------------------------------------------------------------------------------------- training faults


@pytest.fixture
def folder_with_a_corrupt_image(folder, tmp_path) -> tuple[Path, Path]:
    """A copy of `folder` with one truncated JPEG in the "green" class."""
    root = tmp_path / "images"
    for path in folder.rglob("*.png"):
        (root / path.parent.name).mkdir(parents=True, exist_ok=True)
        (root / path.parent.name / path.name).write_bytes(path.read_bytes())
    corrupt = root / "green" / "broken.jpg"
    Image.fromarray(np.full((20, 20, 3), 90, np.uint8)).save(corrupt, quality=95)
    corrupt.write_bytes(corrupt.read_bytes()[:300])
    return root, corrupt


def _cli(capsys, *argv: str) -> tuple[int, str, str]:
    from bigtransfer.cli import main

    code = main(list(argv))
    captured = capsys.readouterr()
    return code, captured.out, captured.err


@pytest.mark.slow
def test_a_corrupt_image_stops_the_run_naming_it_or_is_skipped_and_listed(folder_with_a_corrupt_image, tmp_path,
                                                                         capsys):
    data, corrupt = folder_with_a_corrupt_image
    arguments = ["finetune", "--model", "tiny", "--data", str(data), "--max-steps", "12", *TRAIN]
    code, _, err = _cli(capsys, *arguments, "--output", str(tmp_path / "fail"), "--on-bad-image", "fail")
    errors = [line for line in err.splitlines() if line.startswith("bigtransfer finetune: error:")]
    assert code != 0 and len(errors) == 1 and f"cannot read image {corrupt}" in errors[0], err

    code, out, err = _cli(capsys, *arguments, "--output", str(tmp_path / "skip"), "--on-bad-image", "skip")
    assert code == 0, err
    report = json.loads((tmp_path / "skip" / "report.json").read_text())
    assert report["skipped_images"] == [str(corrupt)]


def test_a_non_finite_loss_stops_the_run_and_keeps_a_loadable_checkpoint(folder, tmp_path, capsys):
    output = tmp_path / "run"
    code, _, err = _cli(capsys, "finetune", "--model", "tiny", "--data", str(folder), "--output", str(output),
                        "--max-steps", "20", "--save-every", "1", *TRAIN, "--base-lr", "1e25")
    errors = [line for line in err.splitlines() if line.startswith("bigtransfer finetune: error:")]
    assert code != 0 and len(errors) == 1, err
    assert re.search("loss became nan|weights became NaN or infinite", errors[0]) and str(output / CHECKPOINT_NAME) in errors[0] and "--resume" in errors[0]
    _, state = load_run_state(output / CHECKPOINT_NAME)
    assert 1 <= state["step"] < 20


def test_the_checkpoint_kept_after_a_non_finite_loss_has_finite_weights(folder, tmp_path, capsys):
    import torch

    output = tmp_path / "run"
    _cli(capsys, "finetune", "--model", "tiny", "--data", str(folder), "--output", str(output), "--max-steps", "20",
         "--save-every", "1", *TRAIN, "--base-lr", "1e25")
    tensors, _ = load_run_state(output / CHECKPOINT_NAME)
    weights = {key: value for key, value in tensors.items() if key.startswith("model/") and value.is_floating_point()}
    assert weights and all(torch.isfinite(value).all() for value in weights.values())
