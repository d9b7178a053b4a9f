"""What bf16 autocast does to a training run on this CPU: the same fine-tuning in fp32 and in bf16, paired by
seed, compared on the loss curve (every step) and on test accuracy, with each run's images/s.

    python benchmarks/bf16_training.py [--seeds 3] [--steps 150] [--output runs/bf16]

Each run is `finetune` of `tiny` (random init) on Fashion-MNIST classes 5-9 at 64 px, batch 64 (Debian's
dataset-fashion-mnist; the published test split's 5,000 images of those classes are the evaluation), so that the
whole comparison takes minutes on two cores. bf16 pays on CPUs with AVX512-BF16 or AMX; elsewhere it is slower.
"""

from __future__ import annotations

import argparse
import json
import statistics
from pathlib import Path

from bigtransfer.demo import paired_margin
from bigtransfer.machine import cpu_description
from bigtransfer.report import read_metrics
from bigtransfer.train import FinetuneConfig, finetune


def run(output: Path, seed: int, precision: str, steps: int) -> dict:
    result = finetune(FinetuneConfig(
        model="tiny", data="fashion-mnist", classes=[5, 6, 7, 8, 9], output=output / f"{precision}-{seed}",
        batch_size=64, max_steps=steps, resize=72, crop=64, base_lr=0.01, seed=seed, precision=precision,
        progress=False, plots=False, overwrite=True,
    ))
    records = [r for r in read_metrics(result.output_dir / "metrics.jsonl") if "loss" in r]
    return dict(losses=[r["loss"] for r in records], images_per_second=statistics.median(
        r["images_per_second"] for r in records[len(records) // 2:]), accuracy=result.report.top1)


def interval(first: list[float], second: list[float], scale: float = 1.0) -> str:
    """The paired mean difference first - second with its 95 % Student-t interval (`demo.paired_margin`, which
    reports in points: `scale` 0.01 gives the plain difference)."""
    margin = paired_margin(first, second)
    if margin["low"] is None:
        return f"{scale * margin['mean']:+.4f}"
    return f"{scale * margin['mean']:+.4f} (95 % CI {scale * margin['low']:+.4f} .. {scale * margin['high']:+.4f})"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument("--steps", type=int, default=150)
    parser.add_argument("--output", type=Path, default=Path("runs/bf16"))
    args = parser.parse_args()
    rows = []
    for seed in range(args.seeds):
        fp32, bf16 = (run(args.output, seed, precision, args.steps) for precision in ("fp32", "bf16"))
        gaps = [abs(a - b) for a, b in zip(fp32["losses"], bf16["losses"], strict=True)]
        first = next((step for step, gap in enumerate(gaps, 1) if gap > 1e-4), None)
        rows.append(dict(seed=seed, fp32=fp32, bf16=bf16, max_loss_gap=max(gaps), first_step_over_1e4=first,
                         loss_gap_first_10=max(gaps[:10])))
        print(f"seed {seed}: accuracy fp32 {fp32['accuracy']:.4f} bf16 {bf16['accuracy']:.4f}; |loss gap| first 10 "
              f"steps <= {max(gaps[:10]):.2e}, over the run <= {max(gaps):.3f} (first over 1e-4 at step {first}); "
              f"images/s fp32 {fp32['images_per_second']:.0f} bf16 {bf16['images_per_second']:.0f}", flush=True)
    summary = dict(
        cpu=cpu_description(), seeds=args.seeds, steps=args.steps,
        accuracy_points_bf16_minus_fp32=interval([r["bf16"]["accuracy"] for r in rows],
                                                 [r["fp32"]["accuracy"] for r in rows]),
        final_loss_bf16_minus_fp32=interval([r["bf16"]["losses"][-1] for r in rows],
                                            [r["fp32"]["losses"][-1] for r in rows], scale=0.01),
        speed_ratio=statistics.mean(r["bf16"]["images_per_second"] / r["fp32"]["images_per_second"] for r in rows),
    )
    print(json.dumps(summary, indent=2))
    (args.output / "bf16_training.json").write_text(json.dumps(dict(summary, runs=rows), indent=2) + "\n")


if __name__ == "__main__":
    main()
