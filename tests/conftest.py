"""Shared fixtures: the transformers test-suite's tiny BiT configuration and small helpers; every test gets
torch's thread count back as it found it (commands run in-process set it from --threads)."""

from __future__ import annotations

import base64
import hashlib
import io
import os
import signal
import subprocess
import sys
import time
from collections import defaultdict
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from bigtransfer import BitConfig
from bigtransfer.train import Callback, FinetuneConfig, PretrainConfig

# The tester configuration of transformers' own BiT tests.
TESTER = dict(
    embedding_size=8, hidden_sizes=[8, 16, 32, 64], depths=[1, 1, 2, 1], num_groups=1, num_labels=3,
    out_features=["stage2", "stage3", "stage4"],
)


@pytest.fixture(autouse=True)
def _restore_threads():
    threads = torch.get_num_threads()
    yield
    torch.set_num_threads(threads)


@pytest.fixture
def tester_config() -> BitConfig:
    return BitConfig(**TESTER)


@pytest.fixture
def pixel_values() -> torch.Tensor:
    return torch.randn(3, 3, 32, 32, generator=torch.Generator().manual_seed(0))


# A child interpreter's own peak memory in MB, as Python source to put in its script: VmHWM of its address space
# since exec (ru_maxrss would carry over the forking test process's peak through exec, gigabytes late in a full run,
# and mask what the child itself used).
CHILD_PEAK_MB = "int(__import__('re').search(r'VmHWM:\\s+(\\d+) kB', open('/proc/self/status').read()).group(1)) / 1024"


def relative_error(actual: torch.Tensor, expected: torch.Tensor) -> float:
    """Max absolute difference scaled by the reference's magnitude (activations grow to tens with random init)."""
    return ((actual - expected).abs().max() / expected.abs().max().clamp_min(1.0)).item()


# ---------------------------------------------------------------------------------------------------------------
# Training: a small image folder, small run settings, and a run that stops itself.

CLASSES = ("circle", "square", "stripes")


def make_image_folder(root, per_class: int = 10, size: int = 16, seed: int = 0):
    """A folder of class sub-folders holding small RGB PNGs whose content depends on the class."""
    rng = np.random.default_rng(seed)
    for label, name in enumerate(CLASSES):
        (root / name).mkdir(parents=True, exist_ok=True)
        for index in range(per_class):
            image = rng.integers(0, 60, (size, size, 3)).astype(np.uint8)
            if label == 0:
                yy, xx = np.mgrid[:size, :size]
                image[(yy - size / 2) ** 2 + (xx - size / 2) ** 2 < (size / 3) ** 2] += 150
            elif label == 1:
                image[size // 4 : 3 * size // 4, size // 4 : 3 * size // 4] += 150
            else:
                image[::3] += 150
            Image.fromarray(image).save(root / name / f"{index}.png")
    return root


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    """`make_image_folder`: 3 classes of 10 images, shared by a test module."""
    return make_image_folder(tmp_path_factory.mktemp("data") / "images")


def finetune_config(folder, output, **overrides) -> FinetuneConfig:
    """A fine-tuning run of `tiny` that takes seconds: 6 steps of 8 images at 16 px."""
    values = dict(model="tiny", data=str(folder), output=output, batch_size=8, max_steps=6, resize=20, crop=16,
                  base_lr=0.01, progress=False, plots=False)
    values.update(overrides)
    return FinetuneConfig(**values)


def upstream_config(output, **overrides) -> PretrainConfig:
    """A pre-training run of `tiny` on digits with the few-shot evaluator every 2 of its 6 steps."""
    values = dict(model="tiny", data="digits", output=output, batch_size=16, batch_split=1, max_steps=6, resize=20,
                  crop=16, progress=False, plots=False, fewshot_every=2, fewshot_data="digits", fewshot_shots=(1, 5),
                  fewshot_seeds=2)
    values.update(overrides)
    return PretrainConfig(**values)


class SigtermAfter(Callback):
    """A run sends itself SIGTERM after step `step`: it finishes the next one, saves a checkpoint and stops."""

    def __init__(self, step: int):
        self.step = step

    def on_step_end(self, trainer, step, loss, lr, images_per_second):
        if step == self.step:
            os.kill(os.getpid(), signal.SIGTERM)


def sigkill_when_logged(process: subprocess.Popen, run_dir, records: int = 5, timeout: float = 240) -> None:
    """SIGKILL a training process once its metrics.jsonl holds `records` lines (mid-run, past a checkpoint)."""
    metrics = run_dir / "metrics.jsonl"
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if metrics.is_file() and len(metrics.read_text().splitlines()) >= records:
            break
        time.sleep(0.05)
    process.send_signal(signal.SIGKILL)
    assert process.wait(timeout=30) == -signal.SIGKILL


def torchrun_cli(commands: list[list[str]], script_dir) -> None:
    """Run CLI commands one after another in 2 processes launched by torchrun (one launch, to save start-up time)."""
    script = script_dir / "run_cli.py"
    script.write_text(
        "import sys\nfrom bigtransfer.cli import main\n"
        f"for arguments in {commands!r}:\n"
        "    code = main(arguments)\n"
        "    if code:\n"
        "        sys.exit(code)\n"
    )
    environment = {key: value for key, value in os.environ.items() if key not in ("WORLD_SIZE", "RANK", "LOCAL_RANK")}
    environment["OMP_NUM_THREADS"] = "1"
    launcher = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", str(script)]
    # Its own session, so a hang kills the launcher *and* its workers instead of leaving them behind.
    process = subprocess.Popen(
        launcher, env=environment, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True
    )
    try:
        _, stderr = process.communicate(timeout=300)
    except subprocess.TimeoutExpired:
        os.killpg(process.pid, signal.SIGKILL)
        _, stderr = process.communicate()
        pytest.fail(f"torchrun did not finish in 300 s: {stderr[-3000:]}")
    assert process.returncode == 0, stderr[-3000:]


# ---------------------------------------------------------------------------------------------------------------
# Downloads without a network: a fake `hf_hub_download` serving local repositories, and a fake transport for
# Google's storage.googleapis.com/bit_models files.


class FakeHub:
    """Stands in for huggingface_hub.hf_hub_download: repositories are local folders; no network."""

    def __init__(self, repos: dict[str, Path], network: bool = True):
        self.repos, self.network, self.calls, self.revisions = repos, network, [], []

    def __call__(self, repo_id, filename, revision=None, cache_dir=None, local_files_only=False, **kwargs):
        from huggingface_hub import errors

        self.calls.append((repo_id, filename, local_files_only))
        self.revisions.append(revision)
        if local_files_only or not self.network:
            raise errors.LocalEntryNotFoundError(f"{filename} of {repo_id} is not cached")
        path = self.repos[repo_id] / filename
        if not path.is_file():
            raise errors.EntryNotFoundError(f"{repo_id} has no {filename}")
        return str(path)


class FakeResponse(io.BytesIO):
    def __init__(self, data: bytes, headers: dict):
        super().__init__(data)
        self.headers = headers


class FakeTransport:
    """Serves one local file for any URL, counting requests; can truncate or lie about the MD5."""

    def __init__(self, path: Path, truncate: int = 0, wrong_md5: bool = False):
        self.data, self.truncate, self.wrong_md5, self.urls = path.read_bytes(), truncate, wrong_md5, []

    def __call__(self, url, timeout=None):
        self.urls.append(url)
        digest = hashlib.md5(b"other" if self.wrong_md5 else self.data).digest()
        headers = {
            "Content-Length": str(len(self.data)),
            "x-goog-hash": f"crc32c=AAAAAA==,md5={base64.b64encode(digest).decode()}",
        }
        return FakeResponse(self.data[: len(self.data) - self.truncate], headers)


# Differences the parity tests measured, printed at the end of the run: the README's parity figures come from here.
MEASURED: dict[str, list[float]] = defaultdict(list)


def record(name: str, value: float) -> float:
    """Keep a measured difference for the end-of-run summary; returns it, so `assert record(...) < bound`."""
    MEASURED[name].append(float(value))
    return value


def pytest_terminal_summary(terminalreporter):
    if MEASURED:
        terminalreporter.section("measured differences (largest, mean, count)")
        for name, values in sorted(MEASURED.items()):
            terminalreporter.write_line(
                f"{name}: largest {max(values):.2g}, mean {sum(values) / len(values):.2g}, {len(values)} comparisons"
            )
