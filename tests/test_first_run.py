"""A newcomer's first run: defaults that fit the machine, progress on a terminal, messages that say what to do.

The memory test runs the default HyperRule batch (512) under an address-space cap that the un-split batch exceeds;
the progress tests run each computing command with its stderr on a pseudo-terminal (tqdm draws only there).
"""

from __future__ import annotations

import argparse
import fcntl
import json
import logging
import os
import pty
import re
import struct
import subprocess
import sys
import termios
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from bigtransfer import BitConfig, BitForImageClassification, machine
from bigtransfer.cli import build_parser, main

TINY = dict(embedding_size=8, hidden_sizes=[8, 16, 32, 64], depths=[1, 1, 1, 1], num_groups=1, num_labels=2)
SMALL_RUN = ["--batch-size", "4", "--resize", "20", "--crop", "16", "--no-plots"]
PHOTOS = ("astronaut", "coffee", "chelsea", "rocket", "hubble_deep_field", "immunohistochemistry")


@pytest.fixture(scope="module")
def photos(tmp_path_factory):
    """Two classes of 1280x960 JPEGs made from scikit-image's photographs (as a phone or camera writes them)."""
    skimage_data = pytest.importorskip("skimage.data")
    root = tmp_path_factory.mktemp("photos")
    for index, name in enumerate(PHOTOS):
        folder = root / ("ab"[index % 2])
        folder.mkdir(exist_ok=True)
        image = Image.fromarray(getattr(skimage_data, name)()).convert("RGB").resize((1280, 960))
        image.save(folder / f"{name}.jpg", quality=90)
        image.transpose(Image.Transpose.FLIP_LEFT_RIGHT).save(folder / f"{name}-flipped.jpg", quality=90)
    return root


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    torch.manual_seed(0)
    directory = tmp_path_factory.mktemp("model") / "model"
    BitForImageClassification(BitConfig(**TINY, id2label={0: "a", 1: "b"})).save_pretrained(directory)
    return directory


def _error(capsys, argv: list[str]) -> str:
    """The one line a failing command prints (its exit status is checked non-zero)."""
    try:
        status = main(argv)
    except SystemExit as exit_:  # argparse's usage errors
        status = exit_.code
    assert status != 0
    return capsys.readouterr().err


# ---------------------------------------------------------------------------------------------------------------
# Defaults that fit the machine.


DRIVER = """
import re, resource, sys
from bigtransfer.cli import main
cap = int(sys.argv[1])
size = int(re.search(r"VmSize:\\s+(\\d+) kB", open("/proc/self/status").read()).group(1)) * 1024
resource.setrlimit(resource.RLIMIT_AS, (size + cap, resource.RLIM_INFINITY))
sys.exit(main(sys.argv[2:]))
"""


@pytest.mark.slow
def test_the_default_batch_fits_a_memory_cap_the_unsplit_batch_exceeds(photos, tmp_path):
    def finetune(split: str, output: str):
        argv = ["finetune", "--model", "tiny", "--data", str(photos), "--output", str(tmp_path / output),
                "--max-steps", "2", "--crop", "128", "--resize", "144", "--no-progress", "--no-plots",
                "--batch-split", split]
        # 1.2 GB of address space above what the imported libraries hold: batch 512 at 128 px needs more.
        return subprocess.run([sys.executable, "-c", DRIVER, str(1200 << 20), *argv], capture_output=True,
                              text=True, timeout=600)

    unsplit = finetune("1", "unsplit")
    assert unsplit.returncode == 1
    assert re.search(r"out of memory with micro-batches of 512 images: [\d.]+ [MG]iB could not be allocated "
                     r"\([\d.]+ [MG]iB free on cpu now\); raise --batch-split \(e\.g\. 2\)", unsplit.stderr)
    fitted = finetune("auto", "fitted")  # the default
    assert fitted.returncode == 0, fitted.stderr[-2000:]
    chosen = re.search(r"batch 512 as (\d+) micro-batches of (\d+) \(a step needs about [\d.]+ [MG]iB; "
                       r"[\d.]+ [MG]iB available\)", fitted.stderr)
    assert chosen and int(chosen[1]) * int(chosen[2]) == 512 and int(chosen[1]) > 1
    assert json.loads((tmp_path / "fitted" / "run.json").read_text())["batch_split"] == int(chosen[1])


def test_the_batch_split_is_the_fewest_micro_batches_that_fit():
    need = machine.StepMemory(fixed=100, per_image=100)
    assert machine.fit_batch_split(512, need, None) == 1  # memory unknown: the batch as asked
    assert machine.fit_batch_split(512, need, 10_000) == 8  # 0.8 x 10,000 fits 64 images (6,500), not 128
    assert machine.fit_batch_split(6, need, 450) == 3  # only divisors of the batch: 2 images (300 <= 360), not 3
    with pytest.raises(MemoryError, match=r"needs about .* even with one image per micro-batch"):
        machine.fit_batch_split(512, need, 100)
    # A split batch also holds the standardized weights' gathered gradients: 2 images no longer fit in 360.
    split_costs = machine.StepMemory(fixed=100, per_image=100, split_fixed=100)
    assert split_costs.for_micro_batch(6, split=1) == 700 and split_costs.for_micro_batch(3, split=2) == 500
    assert machine.fit_batch_split(6, split_costs, 450) == 6


@pytest.mark.slow
def test_the_step_memory_probe_grows_with_the_crop_and_draws_no_random_numbers():
    model = BitForImageClassification(BitConfig(**TINY)).train()
    state = torch.random.get_rng_state()
    small, large = (machine.step_memory(model, crop, torch.device("cpu"), torch.autocast("cpu", enabled=False))
                    for crop in (64, 256))
    assert torch.equal(state, torch.random.get_rng_state())
    assert large.per_image > 10 * small.per_image > 0 and all(p.grad is None for p in model.parameters())


def test_cgroup_limits_cap_threads_and_memory(tmp_path, monkeypatch):
    (tmp_path / "proc" / "self").mkdir(parents=True)
    (tmp_path / "proc" / "self" / "cgroup").write_text("0::/job\n")
    (tmp_path / "proc" / "meminfo").write_text("MemTotal: 67108864 kB\nMemAvailable: 33554432 kB\n")
    (tmp_path / "proc" / "self" / "status").write_text("VmSize: 1024 kB\nVmData: 1024 kB\n")
    job = tmp_path / "cgroup" / "job"
    job.mkdir(parents=True)
    (job / "cpu.max").write_text("150000 100000\n")  # 1.5 CPUs of time
    (job / "memory.max").write_text(str(3 << 30) + "\n")
    (job / "memory.current").write_text(str(1 << 30) + "\n")
    monkeypatch.setattr(machine, "PROC", tmp_path / "proc")
    monkeypatch.setattr(machine, "CGROUP_ROOT", tmp_path / "cgroup")
    assert machine.usable_cpus() == min(2, len(os.sched_getaffinity(0)))
    assert machine.available_memory(torch.device("cpu")) == 2 << 30  # the cgroup's 3 GiB less 1 GiB used


def test_benchmarks_record_the_cpu_and_its_instruction_sets(tmp_path, monkeypatch):
    (tmp_path / "proc").mkdir()
    (tmp_path / "proc" / "cpuinfo").write_text(
        "processor\t: 0\nmodel name\t: AMD EPYC 9R45\nflags\t\t: fpu sse2 avx2 avx512f avx512_vnni avx512_bf16\n\n"
        "processor\t: 1\nmodel name\t: AMD EPYC 9R45\nflags\t\t: fpu sse2 avx2 avx512f avx512_vnni avx512_bf16\n")
    monkeypatch.setattr(machine, "PROC", tmp_path / "proc")
    cpu = machine.cpu_description()
    assert cpu["model"] == "AMD EPYC 9R45" and cpu["flags"] == ["avx2", "avx512f", "avx512_vnni", "avx512_bf16"]
    (tmp_path / "proc" / "cpuinfo").unlink()
    assert machine.cpu_description()["flags"] == []


def test_the_l2_cache_size_is_read_from_sysfs(tmp_path, monkeypatch):
    caches = tmp_path / "cache"
    for index, (level, kind, size) in enumerate([("1", "Data", "48K"), ("1", "Instruction", "64K"),
                                                 ("2", "Unified", "2048K"), ("3", "Unified", "491520K")]):
        (caches / f"index{index}").mkdir(parents=True)
        for name, value in (("level", level), ("type", kind), ("size", size)):
            (caches / f"index{index}" / name).write_text(value + "\n")
    monkeypatch.setattr(machine, "CPU_CACHES", caches)
    assert machine.l2_cache_bytes() == 2 << 20
    (caches / "index2" / "size").write_text("lots\n")  # unreadable: unknown, not a guess
    assert machine.l2_cache_bytes() is None
    monkeypatch.setattr(machine, "CPU_CACHES", tmp_path / "none")
    assert machine.l2_cache_bytes() is None


def test_threads_default_to_the_usable_cpus_and_follow_the_option(model_dir, tmp_path, monkeypatch):
    monkeypatch.setattr(machine, "usable_cpus", lambda: 1)  # conftest restores the thread count after the test
    assert main(["convert", str(model_dir), str(tmp_path / "a"), "--no-progress"]) == 0
    assert torch.get_num_threads() == 1
    monkeypatch.undo()
    assert main(["convert", str(model_dir), str(tmp_path / "b"), "--threads", "2", "--no-progress"]) == 0
    assert torch.get_num_threads() == 2


# ---------------------------------------------------------------------------------------------------------------
# Progress wherever a user waits.


def _on_a_terminal(argv: list[str], cwd: Path) -> tuple[int, str]:
    """Run the CLI with stderr on a pseudo-terminal; (exit status, what the terminal showed)."""
    controller, terminal = pty.openpty()
    fcntl.ioctl(terminal, termios.TIOCSWINSZ, struct.pack("HHHH", 24, 160, 0, 0))  # a fresh pty is 0 columns wide
    process = subprocess.Popen([sys.executable, "-m", "bigtransfer.cli", *argv], cwd=cwd, stdout=subprocess.DEVNULL,
                               stderr=terminal, stdin=subprocess.DEVNULL)
    os.close(terminal)
    shown = b""
    while True:
        try:
            chunk = os.read(controller, 65536)
        except OSError:  # the process closed its end
            break
        if not chunk:
            break
        shown += chunk
    os.close(controller)
    return process.wait(timeout=300), shown.decode("utf-8", "replace")


@pytest.mark.slow
def test_every_computing_command_shows_progress_on_a_terminal(photos, model_dir, tmp_path):
    image = str(next((photos / "a").iterdir()))
    commands = {
        "finetune": (["finetune", "--model", "tiny", "--data", str(photos), "--output", str(tmp_path / "ft"),
                      "--max-steps", "2", *SMALL_RUN], [r"finetune: 100%.*2/2", r"evaluate: .*img"]),
        "pretrain": (["pretrain", "--model", "tiny", "--data", str(photos), "--output", str(tmp_path / "pt"),
                      "--max-steps", "2", *SMALL_RUN], [r"pretrain: 100%.*2/2"]),
        "evaluate": (["evaluate", "--model", str(model_dir), "--data", str(photos)], [r"evaluate: .*\d+/12 \[.*img/s"]),
        "features": (["features", "--model", str(model_dir), "--data", str(photos), "--output",
                      str(tmp_path / "f.npy")], [r"features: .*\d+/12 \[.*img/s"]),
        "predict": (["predict", "--model", str(model_dir), image, image], [r"predict: .*2/2.*img"]),
        "convert": (["convert", str(model_dir), str(tmp_path / "converted")], [r"convert: 100%.*3/3.*writing"]),
    }
    for name, (argv, patterns) in commands.items():
        status, shown = _on_a_terminal(argv, tmp_path)
        assert status == 0, shown[-2000:]
        for pattern in patterns:
            assert re.search(pattern, shown), (name, pattern, shown[-2000:])
    quiet = _on_a_terminal(["evaluate", "--model", str(model_dir), "--data", str(photos), "--no-progress"], tmp_path)
    assert quiet[0] == 0 and "img/s" not in quiet[1] and "it/s" not in quiet[1]
    piped = subprocess.run([sys.executable, "-m", "bigtransfer.cli", "evaluate", "--model", str(model_dir), "--data",
                            str(photos)], capture_output=True, text=True, cwd=tmp_path, timeout=300)
    assert piped.returncode == 0 and "img/s" not in piped.stderr  # not a terminal: no bar in logs


def test_predict_images_reports_compile_time_apart_from_throughput(photos, model_dir):
    from bigtransfer import BitImageProcessor, inference, optimize

    fast = optimize(BitForImageClassification.from_pretrained(model_dir), compile=False)
    shapes = set()

    def compiled(pixels, **kwargs):  # stands in for torch.compile's graph: the first call of a shape compiles
        if tuple(pixels.shape) not in shapes:
            shapes.add(tuple(pixels.shape))
            time.sleep(0.5)
        return fast.model(pixels, **kwargs)

    object.__setattr__(fast, "_compiled", compiled)
    processor = BitImageProcessor.squash(32, (0.5,) * 3, (0.5,) * 3)
    paths = sorted(str(path) for path in (photos / "a").iterdir())
    result = inference.predict_images(fast, paths, processor, batch_size=2, num_workers=0)
    assert 0.5 <= result.compile_seconds < 1.0 and fast.compile_seconds == result.compile_seconds
    assert len(shapes) == 1 and len(result.top_k) == len(paths) and all(top is not None for top in result.top_k)
    again = inference.predict_images(fast, paths, processor, batch_size=2, num_workers=0)
    assert again.compile_seconds == 0.0  # compiled once, for that shape


# ---------------------------------------------------------------------------------------------------------------
# Messages that say what to do.


MESSAGES = [
    (["finetune", "--model", "tiny", "--data", "digits", "--output", "x", "--max-stesp", "5"],
     [r"usage: bigtransfer finetune", r"unrecognized option --max-stesp \(did you mean --max-steps\?\)"]),
    (["finetune", "--model", "tiny", "--data", "digits", "--ouput", "runs/x"],
     [r"usage: bigtransfer finetune", r"unrecognized option --ouput \(did you mean --output\?\)"]),
    (["finetun", "--model", "tiny"], [r"unknown command 'finetun' \(did you mean finetune\?\)"]),
    (["finetune", "--model", "tinyy", "--data", "digits", "--output", "{tmp}/x", "--max-steps", "1"],
     [r"a variant name for random weights \(tiny, R50x1, R50x3, R101x1", r"did you mean tiny\?"]),
    (["finetune", "--model", "BiT-M-R50x7", "--data", "digits", "--output", "{tmp}/x", "--max-steps", "1"],
     [r"variant name for random weights \(tiny,", r"did you mean BiT-M-R50x3 or BiT-M-R50x1\?"]),
    (["finetune", "--model", "BiT-M-R50x1.npz", "--data", "digits", "--output", "{tmp}/x", "--max-steps", "1"],
     [r"error: BiT-M-R50x1\.npz does not exist \(.*BiT-M-R50x1\.npz\); as the name of Google's checkpoint"]),
    (["predict", "--model", "./no-model", "x.jpg"], [r"\./no-model does not exist: .* \(no such file or directory\)"]),
    (["evaluate", "--model", "{tmp}/run", "--data", "{photos}"], [r"it looks like a run directory: pass .*run/model"]),
    (["evaluate", "--model", "{model}", "--data", "{broken}"],
     [r"cannot read image .*broken\.jpg.*; pass --on-bad-image skip to leave unreadable images out"]),
]


@pytest.mark.parametrize("argv, patterns", MESSAGES, ids=[" ".join(argv[:2]) + f" #{i}" for i, (argv, _) in
                                                          enumerate(MESSAGES)])
def test_messages_say_what_to_do(argv, patterns, photos, model_dir, tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.chdir(tmp_path)
    (tmp_path / "run" / "model").mkdir(parents=True)
    (tmp_path / "run" / "model" / "config.json").write_text("{}")
    broken = tmp_path / "broken"
    (broken / "a").mkdir(parents=True)
    (broken / "b").mkdir()
    (broken / "a" / "broken.jpg").write_bytes(b"\xff\xd8 not a JPEG")
    Image.new("RGB", (40, 30)).save(broken / "b" / "fine.jpg")
    values = dict(tmp=str(tmp_path), photos=str(photos), model=str(model_dir), broken=str(broken))
    error = _error(capsys, [part.format(**values) for part in argv])
    for pattern in patterns:
        assert re.search(pattern, error), (pattern, error)


def test_version_and_debug_anywhere(capsys):
    with pytest.raises(SystemExit) as exit_:
        main(["--version"])
    assert exit_.value.code == 0 and re.match(r"bigtransfer \d+\.\d+\.\d+ \(torch ", capsys.readouterr().out)
    with pytest.raises(FileNotFoundError, match="does not exist"):  # --debug after the command: the traceback
        main(["predict", "--model", "./no-model", "x.jpg", "--debug"])


def test_every_option_has_help_text():
    parser = build_parser()
    commands = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction)).choices
    missing = [f"{name} {action.option_strings or action.dest}" for name, command in commands.items()
               for action in command._actions if action.dest != "help" and not action.help]
    assert missing == []
    for name, command in commands.items():
        assert "%%" not in command.format_help(), name


def test_a_one_class_folder_is_refused_and_a_replaced_head_announced(photos, model_dir, tmp_path, caplog, capsys):
    single = tmp_path / "single"
    (single / "only").mkdir(parents=True)
    for path in list((photos / "a").iterdir())[:4]:
        (single / "only" / path.name).write_bytes(path.read_bytes())
    for command in ("finetune", "pretrain"):
        assert main([command, "--model", str(model_dir), "--data", str(single), "--output", str(tmp_path / "run"),
                     "--max-steps", "1", "--no-progress", *SMALL_RUN]) == 2
        error = capsys.readouterr().err
        assert f"--data {single} has 1 class (only)" in error and "accuracy would read 100 %" in error
    assert not (tmp_path / "run").exists()
    with caplog.at_level(logging.INFO, logger="bigtransfer"):
        assert main(["convert", str(model_dir), str(tmp_path / "five"), "--num-labels", "5", "--no-progress"]) == 0
    assert re.search(r"model: its 2-class head is replaced by a new zero-initialised 5-class head", caplog.text)


def test_out_of_memory_anywhere_names_the_size_and_the_fix(model_dir, tmp_path, monkeypatch, capsys):
    import bigtransfer.commands.evaluate as evaluate_command

    def exhausted(*args, **kwargs):
        raise RuntimeError("[enforce fail at alloc_cpu.cpp:127] err == 0. DefaultCPUAllocator: can't allocate "
                           "memory: you tried to allocate 3774873600 bytes. Error code 12 (Cannot allocate memory)")

    monkeypatch.setattr(evaluate_command, "evaluate", exhausted)
    error = _error(capsys, ["evaluate", "--model", str(model_dir), "--data", "digits", "--batch-size", "64"])
    assert re.search(r"error: out of memory: 3\.5 GiB could not be allocated \([\d.]+ [MG]iB free now\); lower "
                     r"--batch-size \(it was 64\)", error)
    assert machine.failed_allocation(torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")) \
        == 2 << 30
    assert machine.failed_allocation(MemoryError("Unable to allocate 1.5 MiB for an array")) == 3 << 19
    assert machine.failed_allocation(ValueError("a shape error")) is None


def test_features_can_be_traced_back_to_their_files(photos, model_dir, tmp_path, capsys):
    output = tmp_path / "features.npy"
    assert main(["features", "--model", str(model_dir), "--data", str(photos), "--output", str(output),
                 "--no-progress"]) == 0
    features, labels = np.load(output), np.load(tmp_path / "features.labels.npy")
    index = json.loads((tmp_path / "features.index.json").read_text())
    assert index["classes"] == ["a", "b"] and len(index["paths"]) == len(features) == len(labels) == 12
    assert [Path(path).parent.name for path in index["paths"]] == [index["classes"][label] for label in labels]
