"""Shared fixtures: the transformers test-suite's tiny BiT configuration and small helpers; every test gets
torch's thread count back as it found it (commands run in-process set it from --threads)."""

from __future__ import annotations

from collections import defaultdict

import pytest
import torch

from bigtransfer import BitConfig

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


def relative_error(actual: torch.Tensor, expected: torch.Tensor) -> float:
    """Max absolute difference scaled by the reference's magnitude (activations grow to tens with random init)."""
    return ((actual - expected).abs().max() / expected.abs().max().clamp_min(1.0)).item()


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
