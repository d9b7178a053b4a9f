"""Distillation in miniature (issue 27): does consistent, patient function matching beat training on the labels?

Fashion-MNIST at 32 px. The teacher is `tiny-wide` (twice tiny's width, four times its compute) trained with the
package's fine-tuning recipe on a larger pool of training images; the student is `tiny` from random weights, trained
on a smaller set, paired by seed across four arms with the same steps and batch:

- labels: `finetune` (SGD, the HyperRule schedule scaled to the steps; its lr picked on held-out images),
- consistent: `distill` (function matching: same inception crop, flip and MixUp for teacher and student),
- fixed: `distill --teacher-views fixed` (the teacher sees the un-augmented image),
- independent: `distill --teacher-views independent` (separate crops and flips).

Each arm runs at every schedule length. The write-up (markdown, plots, results.json) gives the mean paired margins
with 95 % Student-t intervals, agreement and KL curves, and the step's time split. Runs already finished in
`--runs` are reused, so an interrupted demonstration continues where it stopped::

    python docs/distill_demo.py                      # the reduced version: 3 seeds, 100 and 400 steps
    python docs/distill_demo.py --seeds 5 --steps 200,800,3200 --train-per-class 600 --teacher-steps 3000 \\
        --runs runs/distill-full --output docs/DISTILL-full.md
"""

from __future__ import annotations

import argparse
import json
import platform
import time
from pathlib import Path

import numpy as np
import torch

from bigtransfer import BitConfig, BitForImageClassification
from bigtransfer.data import ArraySource, load_fashion_mnist
from bigtransfer.demo import paired_margin
from bigtransfer.report import read_metrics, read_report
from bigtransfer.train import DistillConfig, FinetuneConfig, distill, finetune

ARMS = ("labels", "consistent", "fixed", "independent")
WIDE = dict(embedding_size=64, hidden_sizes=(128, 256, 512, 1024))  # tiny-wide, as bigtransfer demo's
LABEL_LRS = (0.01, 0.03, 0.1)


def arguments() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--runs", type=Path, default=Path("runs/distill-demo"))
    parser.add_argument("--output", type=Path, default=Path(__file__).parent / "DISTILL.md")
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument("--steps", default="100,400", help="schedule lengths, comma-separated")
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--train-per-class", type=int, default=300, help="the student's training images per class")
    parser.add_argument("--teacher-per-class", type=int, default=2000, help="the teacher's (a superset)")
    parser.add_argument("--test-per-class", type=int, default=100, help="from the published test split")
    parser.add_argument("--teacher-steps", type=int, default=600)
    parser.add_argument("--distill-lr", type=float, default=0.01, help="Adam's peak lr (the paper's Pets fast)")
    parser.add_argument("--threads", type=int, default=1)
    return parser.parse_args()


def data(args) -> dict[str, ArraySource]:
    """Per class: the student's first k training images (in a seeded order), the teacher's first K (a superset),
    the next 100 as held-out images for the label baseline's lr; the first m test images."""
    train, test = load_fashion_mnist(split="train"), load_fashion_mnist(split="test")
    order = np.random.default_rng(0).permutation(len(train.labels))
    by_class = [order[train.labels[order] == label] for label in range(10)]

    def subset(source, parts, name):
        index = np.concatenate(parts)
        return ArraySource(source.images[index], source.labels[index], source.classes, name)

    k, big = args.train_per_class, args.teacher_per_class
    return dict(
        student=subset(train, [rows[:k] for rows in by_class], f"fashion-mnist train, {k} per class"),
        teacher=subset(train, [rows[:big] for rows in by_class], f"fashion-mnist train, {big} per class"),
        held_out=subset(train, [rows[big : big + 100] for rows in by_class], "fashion-mnist train, held out"),
        test=subset(test, [np.flatnonzero(test.labels == label)[: args.test_per_class] for label in range(10)],
                    f"fashion-mnist test, {args.test_per_class} per class"),
    )


def run(settings, train) -> dict:
    """The run's report (reused when it finished before) and its wall time."""
    output = Path(settings.output)
    if (output / "report.json").is_file():
        report, seconds = read_report(output / "report.json"), None
    else:
        started = time.perf_counter()
        report = train(settings).report
        seconds = time.perf_counter() - started
    return dict(top1=report.top1, metrics=report.metrics, seconds=seconds, run=str(output))


def common(args, sets, steps: int, seed: int, output: Path) -> dict:
    return dict(data=sets["student"], eval_data=sets["test"], batch_size=args.batch_size, max_steps=steps, crop=32,
                seed=seed, output=output, batch_split=1, progress=False, plots=False, overwrite=True)


def experiment(args) -> dict:
    sets, root = data(args), args.runs
    torch.manual_seed(0)
    config = BitConfig.from_variant("tiny", **WIDE, num_labels=10, id2label=dict(enumerate(sets["test"].classes)))
    if not (root / "tiny-wide-init" / "config.json").is_file():
        BitForImageClassification(config).save_pretrained(root / "tiny-wide-init")
    teacher = run(FinetuneConfig(model=str(root / "tiny-wide-init"), data=sets["teacher"], eval_data=sets["test"],
                                 max_steps=args.teacher_steps, batch_size=args.batch_size, resize=36, crop=32,
                                 base_lr=0.03, output=root / "teacher", batch_split=1, progress=False, plots=False,
                                 overwrite=True), finetune)
    # The label baseline's lr, chosen on held-out training images (seed 0, the shortest schedule).
    short = min(int(s) for s in args.steps.split(","))
    scores = {lr: run(FinetuneConfig(model="tiny", resize=36, base_lr=lr, **{
        **common(args, sets, short, 0, root / f"label-lr-{lr:g}"), "eval_data": sets["held_out"]}), finetune)["top1"]
        for lr in LABEL_LRS}
    label_lr = max(scores, key=scores.get)
    cells: dict[str, dict[str, list]] = {}
    for steps in (int(s) for s in args.steps.split(",")):
        for seed in range(args.seeds):
            for arm in ARMS:
                output = root / f"{arm}-{steps}-seed{seed}"
                if arm == "labels":
                    settings = FinetuneConfig(model="tiny", resize=36, base_lr=label_lr,
                                              **common(args, sets, steps, seed, output))
                    result = run(settings, finetune)
                else:
                    settings = DistillConfig(teacher=[str(root / "teacher" / "model")], student="tiny",
                                             preset="imagenet", lr=args.distill_lr, teacher_views=arm,
                                             eval_every=max(1, steps // 4), **common(args, sets, steps, seed, output))
                    result = run(settings, distill)
                cells.setdefault(f"{arm}/{steps}", []).append(result)
                print(f"{arm:>11} {steps:>5} steps seed {seed}: top-1 {100 * result['top1']:.1f} %", flush=True)
    return dict(teacher=teacher, label_lr=label_lr, label_lr_scores=scores, cells=cells, settings=vars(args) | dict(
        runs=str(args.runs), output=str(args.output)), machine=platform.processor() or platform.machine(),
        torch=torch.__version__)


def curves(record: dict, path: Path) -> Path:
    """Agreement and KL on the test images against the step, per distillation arm (mean over seeds, longest run)."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    longest = max(int(key.split("/")[1]) for key in record["cells"])
    figure = Figure(figsize=(10, 4), dpi=100)
    FigureCanvasAgg(figure)
    left, right = figure.add_subplot(1, 2, 1), figure.add_subplot(1, 2, 2)
    for arm in ARMS[1:]:
        runs = [read_metrics(Path(cell["run"]) / "metrics.jsonl") for cell in record["cells"][f"{arm}/{longest}"]]
        finals = record["cells"][f"{arm}/{longest}"]
        points: dict[int, list[tuple[float, float]]] = {}
        for records, final in zip(runs, finals, strict=True):
            for r in [*(r for r in records if "kl" in r), dict(step=longest, **final["metrics"])]:
                points.setdefault(r["step"], []).append((100 * r["agreement_top1"], r["kl"]))
        steps = sorted(points)
        left.plot(steps, [np.mean([a for a, _ in points[s]]) for s in steps], "o-", label=arm)
        right.plot(steps, [np.mean([k for _, k in points[s]]) for s in steps], "o-", label=arm)
    left.set(xlabel="step", ylabel="top-1 agreement with the teacher (%)", title="agreement (test images)")
    right.set(xlabel="step", ylabel="mean KL(teacher || student)", title="KL (test images)")
    for axes in (left, right):
        axes.grid(alpha=0.3)
        axes.legend()
    figure.tight_layout()
    figure.savefig(path)
    return path


def write_up(record: dict, args) -> str:
    lengths = sorted({int(key.split("/")[1]) for key in record["cells"]})
    top1 = {key: [cell["top1"] for cell in cells] for key, cells in record["cells"].items()}
    lines = [f"| steps | {' | '.join(ARMS)} | consistent − labels [95 % CI] | consistent − fixed | "
             "consistent − independent | agreement (consistent) | KL (consistent) |", "|---:" * 9 + "|"]
    margins = {}
    for steps in lengths:
        means = [f"{100 * np.mean(top1[f'{arm}/{steps}']):.1f}" for arm in ARMS]
        row = []
        for other in ("labels", "fixed", "independent"):
            margin = paired_margin(top1[f"consistent/{steps}"], top1[f"{other}/{steps}"])
            margins[f"{other}/{steps}"] = margin
            row.append(f"{margin['mean']:+.1f} [{margin['low']:+.1f}, {margin['high']:+.1f}]"
                       if margin["low"] is not None else f"{margin['mean']:+.1f}")
        final = record["cells"][f"consistent/{steps}"]
        agreement = np.mean([cell["metrics"]["agreement_top1"] for cell in final])
        kl = np.mean([cell["metrics"]["kl"] for cell in final])
        lines.append(f"| {steps} | {' | '.join(means)} | {' | '.join(row)} | {100 * agreement:.1f} % | {kl:.3f} |")
    record["margins"] = margins
    timing = [cell["metrics"] for key, cells in record["cells"].items() if not key.startswith("labels")
              for cell in cells]
    teacher_s = np.mean([m["teacher_seconds_per_step"] for m in timing])
    student_s = np.mean([m["student_seconds_per_step"] for m in timing])
    return "\n".join(lines), teacher_s, student_s


def main() -> None:
    args = arguments()
    torch.set_num_threads(args.threads)
    started = time.perf_counter()
    record = experiment(args)
    record["seconds"] = round(time.perf_counter() - started, 1)
    figures = args.output.parent / "distill"
    figures.mkdir(parents=True, exist_ok=True)
    curves(record, figures / "curves.png")
    table, teacher_s, student_s = write_up(record, args)
    record["timing"] = dict(teacher_seconds_per_step=teacher_s, student_seconds_per_step=student_s)
    (figures / "results.json").write_text(json.dumps(record, indent=1, default=str) + "\n")
    print(table)
    print(json.dumps(record["margins"], indent=1))
    print(f"teacher {100 * record['teacher']['top1']:.1f} %, label lr {record['label_lr']}, "
          f"split {teacher_s:.3f} s teacher / {student_s:.3f} s student per step, {record['seconds']:.0f} s in all")


if __name__ == "__main__":
    main()
