"""BiT-HyperRule boundaries. Expected values are written from the rule's definition, not from the code."""

import math

import pytest

from bigtransfer import hyperrule

# ---------------------------------------------------------------- resolution


@pytest.mark.parametrize("preset", ["code", "paper"])
def test_resolution_small_images(preset):
    assert hyperrule.resolution(95, 96, preset) == (160, 128)  # area 9120 < 9216
    assert hyperrule.resolution(32, 32, preset) == (160, 128)
    assert hyperrule.resolution(28, 28, preset) == (160, 128)
    assert hyperrule.resolution(1, 9215, preset) == (160, 128)


def test_resolution_code_large_images():
    assert hyperrule.resolution(96, 96) == (512, 480)  # area exactly 96*96 is large
    assert hyperrule.resolution(96, 95) != hyperrule.resolution(96, 96)
    assert hyperrule.resolution(224, 224, "code") == (512, 480)
    assert hyperrule.resolution(224, 224, "code", variant="BiT-M-R50x1") == (512, 480)
    assert hyperrule.resolution(224, 224, "code", variant="BiT-M-R152x4") == (512, 480)


def test_resolution_paper_large_images():
    assert hyperrule.resolution(96, 96, "paper") == (448, 384)
    assert hyperrule.resolution(500, 375, "paper") == (448, 384)
    assert hyperrule.resolution(224, 224, "paper", variant="BiT-M-R101x3") == (448, 384)
    assert hyperrule.resolution(224, 224, "paper", variant="BiT-M-R152x4") == (512, 480)
    assert hyperrule.resolution(224, 224, "paper", variant="resnetv2_152x4_bit") == (512, 480)
    # R152x4 only changes the large-image setting.
    assert hyperrule.resolution(32, 32, "paper", variant="BiT-M-R152x4") == (160, 128)


def test_unknown_preset():
    with pytest.raises(ValueError, match="preset"):
        hyperrule.resolution(32, 32, "bogus")
    with pytest.raises(ValueError, match="preset"):
        hyperrule.lr(0, 10, preset="bogus")


# ---------------------------------------------------------------- schedule and mixup

CODE_SCHEDULES = {
    1: [100, 200, 300, 400, 500],
    19_999: [100, 200, 300, 400, 500],
    20_000: [500, 3000, 6000, 9000, 10000],
    499_999: [500, 3000, 6000, 9000, 10000],
    500_000: [500, 6000, 12000, 18000, 20000],
    14_000_000: [500, 6000, 12000, 18000, 20000],
}
# 500 / 10k / 20k total steps, decays at 30 / 60 / 90 %.
PAPER_SCHEDULES = {
    1: [100, 150, 300, 450, 500],
    19_999: [100, 150, 300, 450, 500],
    20_000: [500, 3000, 6000, 9000, 10000],
    499_999: [500, 3000, 6000, 9000, 10000],
    500_000: [500, 6000, 12000, 18000, 20000],
}


@pytest.mark.parametrize("size,expected", CODE_SCHEDULES.items())
def test_schedule_code(size, expected):
    assert hyperrule.schedule(size) == expected
    assert hyperrule.schedule(size, "code") == expected


@pytest.mark.parametrize("size,expected", PAPER_SCHEDULES.items())
def test_schedule_paper(size, expected):
    assert hyperrule.schedule(size, "paper") == expected


def test_schedule_returns_a_fresh_list():
    hyperrule.schedule(10).append(1)
    assert hyperrule.schedule(10) == [100, 200, 300, 400, 500]


def test_mixup_alpha():
    assert hyperrule.mixup_alpha(1) == 0.0
    assert hyperrule.mixup_alpha(19_999) == 0.0
    assert hyperrule.mixup_alpha(20_000) == 0.1
    assert hyperrule.mixup_alpha(1_281_167) == 0.1


# ---------------------------------------------------------------- lr

B = 0.003


def close(a, b):
    return a is not None and math.isclose(a, b, rel_tol=1e-12, abs_tol=0.0)


@pytest.mark.parametrize("preset", ["code", "paper"])
@pytest.mark.parametrize("size", [10, 19_999])
def test_lr_small_warmup(preset, size):
    assert hyperrule.lr(0, size, preset=preset) == 0.0
    assert close(hyperrule.lr(1, size, preset=preset), B / 100)
    assert close(hyperrule.lr(50, size, preset=preset), B / 2)
    assert close(hyperrule.lr(99, size, preset=preset), B * 99 / 100)
    assert close(hyperrule.lr(100, size, preset=preset), B)


def test_lr_code_small_decays():
    # Boundaries 200, 300, 400: the decay applies from the step after the boundary.
    expect = {
        101: B,
        200: B,
        201: B / 10,
        300: B / 10,
        301: B / 100,
        400: B / 100,
        401: B / 1000,
        499: B / 1000,
    }
    for step, value in expect.items():
        assert close(hyperrule.lr(step, 19_999), value), step
    assert hyperrule.lr(500, 19_999) is None
    assert hyperrule.lr(501, 19_999) is None


def test_lr_paper_small_decays():
    expect = {150: B, 151: B / 10, 300: B / 10, 301: B / 100, 450: B / 100, 451: B / 1000, 499: B / 1000}
    for step, value in expect.items():
        assert close(hyperrule.lr(step, 19_999, preset="paper"), value), step
    assert hyperrule.lr(500, 19_999, preset="paper") is None


@pytest.mark.parametrize("preset", ["code", "paper"])
@pytest.mark.parametrize("size", [20_000, 499_999])
def test_lr_medium(preset, size):
    expect = {
        0: 0.0,
        250: B / 2,
        499: B * 499 / 500,
        500: B,
        3000: B,
        3001: B / 10,
        6000: B / 10,
        6001: B / 100,
        9000: B / 100,
        9001: B / 1000,
        9999: B / 1000,
    }
    for step, value in expect.items():
        assert close(hyperrule.lr(step, size, preset=preset), value), step
    assert hyperrule.lr(0, size, preset=preset) == 0.0
    assert hyperrule.lr(10_000, size, preset=preset) is None


@pytest.mark.parametrize("preset", ["code", "paper"])
@pytest.mark.parametrize("size", [500_000, 14_000_000])
def test_lr_large(preset, size):
    expect = {
        499: B * 499 / 500,
        500: B,
        6000: B,
        6001: B / 10,
        12000: B / 10,
        12001: B / 100,
        18000: B / 100,
        18001: B / 1000,
        19999: B / 1000,
    }
    assert hyperrule.lr(0, size, preset=preset) == 0.0
    for step, value in expect.items():
        assert close(hyperrule.lr(step, size, preset=preset), value), step
    assert hyperrule.lr(20_000, size, preset=preset) is None


def test_lr_base_lr_scales():
    assert close(hyperrule.lr(100, 100, base_lr=0.1), 0.1)
    assert close(hyperrule.lr(201, 100, base_lr=0.1), 0.01)
    assert close(hyperrule.lr(50, 100, base_lr=0.1), 0.05)


def test_presets_table_shape():
    for name, table in hyperrule.PRESETS.items():
        for sched in table["schedules"]:
            assert len(sched) == 5 and sched == sorted(sched), name


# ---------------------------------------------------------------- upstream


def test_upstream_lr():
    # batch 4096 -> 0.03 * 16 = 0.48; 1000 steps, 100 warmup; decays at 300, 600, 800.
    peak = 0.48
    assert hyperrule.upstream_schedule(1000, 100) == [100, 300, 600, 800, 1000]
    assert hyperrule.upstream_lr(0, 1000, 4096, 100) == 0.0
    assert close(hyperrule.upstream_lr(50, 1000, 4096, 100), peak / 2)
    assert close(hyperrule.upstream_lr(100, 1000, 4096, 100), peak)
    assert close(hyperrule.upstream_lr(300, 1000, 4096, 100), peak)
    assert close(hyperrule.upstream_lr(301, 1000, 4096, 100), peak / 10)
    assert close(hyperrule.upstream_lr(600, 1000, 4096, 100), peak / 10)
    assert close(hyperrule.upstream_lr(601, 1000, 4096, 100), peak / 100)
    assert close(hyperrule.upstream_lr(800, 1000, 4096, 100), peak / 100)
    assert close(hyperrule.upstream_lr(801, 1000, 4096, 100), peak / 1000)
    assert close(hyperrule.upstream_lr(999, 1000, 4096, 100), peak / 1000)
    assert hyperrule.upstream_lr(1000, 1000, 4096, 100) is None


def test_upstream_lr_base_and_no_warmup():
    assert close(hyperrule.upstream_lr(0, 10, 256, 0), 0.03)
    assert close(hyperrule.upstream_lr(5, 10, 512, 0, base=0.1), 0.02)  # decay at 3 passed; 0.2 / 10
    with pytest.raises(ValueError):
        hyperrule.upstream_schedule(0, 0)


@pytest.mark.parametrize(
    "call",
    [
        lambda: hyperrule.lr(-5, 1000),
        lambda: hyperrule.lr(3, -5),
        lambda: hyperrule.schedule(0),
        lambda: hyperrule.mixup_alpha(-1),
        lambda: hyperrule.resolution(0, 32),
    ],
)
def test_negative_or_empty_sizes_and_steps_are_refused(call):
    with pytest.raises(ValueError, match="must be"):
        call()
