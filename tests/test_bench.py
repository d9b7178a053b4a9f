"""The bench's construction and pure parts (`bigtransfer.bench`, benchmarks/): tests never time anything."""

from __future__ import annotations

import ast
import json
from pathlib import Path

import pytest
import torch

from bigtransfer.bench import (
    BenchConfig,
    Contender,
    Worker,
    add_ratios,
    our_contenders,
    pixels,
    watch_freezing,
)
from bigtransfer.cli import main

BENCHMARKS = Path(__file__).resolve().parents[1] / "benchmarks"


def row(name: str, ours: bool, speed: float | None) -> dict:
    return {"contender": name, "ours": ours, "images_per_second": speed, "error": None if speed else "failed"}


def test_ratios_are_to_the_best_peer_or_without_peers_to_the_default_path():
    rows = add_ratios([row("bigtransfer", True, 10.0), row("bigtransfer optimize()", True, 24.0),
                       row("timm", False, 12.0), row("timm frozen", False, 16.0), row("transformers", False, None)])
    assert [r["ratio"] for r in rows] == [0.625, 1.5, 0.75, 1.0, None]
    alone = add_ratios([row("bigtransfer", True, 8.0), row("bigtransfer optimize()", True, 20.0)])
    assert [r["ratio"] for r in alone] == [1.0, 2.5]


def test_our_contenders_freeze_only_the_compiled_inference_path():
    config = BenchConfig(variant="tiny")
    inference = our_contenders(config, "infer-b16", "bf16")
    assert [c.name for c in inference] == ["bigtransfer", 'bigtransfer optimize(dtype="bf16", compile=False)',
                                           'bigtransfer optimize(dtype="bf16")']
    assert [c.frozen for c in inference] == [False, False, True]
    training = ["bigtransfer prepare_for_training()", "bigtransfer prepare_for_training(compile=True)"]
    assert [c.name for c in our_contenders(config, "train-b16", "fp32")] == training
    config.compile = False
    assert [c.name for c in our_contenders(config, "infer-b1", "fp32")] == ["bigtransfer",
                                                                           "bigtransfer optimize(compile=False)"]
    assert [c.name for c in our_contenders(config, "train-b16", "fp32")] == training[:1]


def test_bench_cli_validates_before_building(capsys):
    assert main(["bench", "--workloads", "infer-b99"]) == 2
    assert "unknown workload infer-b99" in capsys.readouterr().err
    assert main(["bench", "--precision", "fp16"]) == 2  # GPU-only precisions are refused on a CPU
    assert "tf32 / fp16 are measured on a GPU only" in capsys.readouterr().err
    assert main(["bench", "--variant", "R50"]) == 2
    assert "unknown variant R50" in capsys.readouterr().err


@pytest.mark.slow
def test_bench_times_each_of_our_paths_in_its_own_worker(tmp_path, capsys):
    out = tmp_path / "bench.json"
    argv = ["bench", "--variant", "tiny", "--workloads", "infer-b1", "--rounds", "2", "--no-compile", "--json", str(out)]
    assert main(argv) == 0
    rows = json.loads(out.read_text())
    assert [r["contender"] for r in rows] == ["bigtransfer", "bigtransfer optimize(compile=False)"]
    assert all(r["error"] is None and len(r["rounds"]) == 2 and r["images_per_second"] > 0 for r in rows)
    assert rows[0]["ratio"] == 1.0 and "bigtransfer optimize(compile=False)" in capsys.readouterr().out


def test_nothing_under_benchmarks_imports_the_command_line_layer():
    found = []
    for path in sorted(BENCHMARKS.glob("*.py")):
        for node in ast.walk(ast.parse(path.read_text())):
            names = [a.name for a in node.names] if isinstance(node, ast.Import) else [node.module or ""] if isinstance(
                node, ast.ImportFrom) else []
            found += [f"{path.name}: {name}" for name in names if name.startswith(("bigtransfer.cli", "bigtransfer.commands"))]
    assert not found and len(list(BENCHMARKS.glob("*.py"))) > 5


def test_bench_reports_missing_peers(monkeypatch):
    import builtins

    import peers  # benchmarks/peers.py

    real_import = builtins.__import__

    def fake_import(name, *args, **kwargs):
        if name == "timm":
            raise ImportError("no timm")
        return real_import(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", fake_import)
    with pytest.raises(ImportError, match="timm"):
        peers.import_peers()


def test_peers_compute_our_logits_on_the_same_weights():
    pytest.importorskip("timm")
    import peers

    differences = peers.parity("tiny")  # timm's ResNetV2 built at tiny's widths, and transformers' BiT
    assert differences["timm"] < 1e-4 * differences["logit_scale"]
    assert differences["transformers"] < 1e-4 * differences["logit_scale"]


def test_bench_peaks_run_the_models_kernels():
    from peaks import measure_peaks

    from bigtransfer.machine import cpu_description

    peaks = measure_peaks(torch.device("cpu"), ("fp32",))
    assert "oneDNN" in peaks["fp32"].kernel and peaks["fp32"].probe() > 0 and peaks["fp32"].gflops > 0
    native_bf16 = bool({"avx512_bf16", "amx_bf16"} & set(cpu_description()["flags"]))
    assert ("bf16" in peaks) == native_bf16  # emulated bf16 is not a peak anyone deploys
    pytest.importorskip("onnxruntime")
    assert "QLinearConv" in peaks["int8"].kernel and peaks["int8"].probe() > 0  # the int8 graph is valid and runs


@pytest.mark.slow
def test_the_frozen_peer_froze_its_parameters_and_the_options_form_is_caught():
    pytest.importorskip("timm")
    import peers

    config = BenchConfig(variant="tiny")
    model = peers.peer_model("timm", "tiny").to(memory_format=torch.channels_last)
    parameters = len(list(model.parameters()))
    x = pixels("infer-b1", "cpu")
    # torch.compile(options={"freezing": True}): the freezing pass runs and turns no parameter into a constant.
    with watch_freezing(enable=False) as inlined, torch.inference_mode():
        torch.compile(model, options={"freezing": True})(x)
    assert inlined == [0]
    # The bench's frozen timm contender, in its own worker: every parameter became a constant of its graph.
    frozen = next(c for c in peers.peer_contenders(config, "infer-b1", "fp32") if c.frozen and "timm" in c.name)
    worker = Worker(frozen, threads=1, precision="fp32").wait()
    try:
        assert worker.error is None and worker.info["frozen_constants"] == parameters
    finally:
        worker.close()
    # A contender that must run frozen and froze nothing is refused, not reported.
    unfrozen = Contender("timm eager, labelled frozen", peers.peer, dict(frozen.kwargs, compiled=False), frozen=True)
    worker = Worker(unfrozen, threads=1, precision="fp32").wait()
    worker.close()
    assert "freezing did not take effect" in worker.error
