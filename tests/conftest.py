"""Shared fixtures: the transformers test-suite's tiny BiT configuration and small helpers."""

from __future__ import annotations

import pytest
import torch

from bigtransfer import BitConfig

# The tester configuration of transformers' own BiT tests.
TESTER = dict(
    embedding_size=8, hidden_sizes=[8, 16, 32, 64], depths=[1, 1, 2, 1], num_groups=1, num_labels=3,
    out_features=["stage2", "stage3", "stage4"],
)


@pytest.fixture
def tester_config() -> BitConfig:
    return BitConfig(**TESTER)


@pytest.fixture
def pixel_values() -> torch.Tensor:
    return torch.randn(3, 3, 32, 32, generator=torch.Generator().manual_seed(0))


def relative_error(actual: torch.Tensor, expected: torch.Tensor) -> float:
    """Max absolute difference scaled by the reference's magnitude (activations grow to tens with random init)."""
    return ((actual - expected).abs().max() / expected.abs().max().clamp_min(1.0)).item()
