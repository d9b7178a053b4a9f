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
NOTES = "<!-- notes: written by hand, kept when the page is rewritten -->"


def parser() -> argparse.ArgumentParser:
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
    return parser


DEFAULTS = vars(parser().parse_args([]))


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
    report = read_report(output / "report.json") if (output / "report.json").is_file() else train(settings).report
    seconds = [r["seconds"] for r in read_metrics(output / "metrics.jsonl") if "seconds" in r][-1]  # training time
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
    seconds = teacher["seconds"] + sum(cell["seconds"] for cells in cells.values() for cell in cells)
    return dict(teacher=teacher, label_lr=label_lr, label_lr_scores=scores, cells=cells, settings=vars(args) | dict(
        runs=str(args.runs), output=str(args.output)), machine=cpu_name(), torch=torch.__version__,
        seconds=round(seconds, 1))


def cpu_name() -> str:
    for line in Path("/proc/cpuinfo").read_text().splitlines() if Path("/proc/cpuinfo").is_file() else ():
        if line.startswith("model name"):
            return line.split(":", 1)[1].strip()
    return platform.machine()


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
             "consistent − independent | agreement (consistent) | KL (consistent) |", "|---:" * 10 + "|"]
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
    return "\n".join(lines), float(teacher_s), float(student_s)


def verdicts(record: dict) -> list[str]:
    """One sentence per comparison and length, from the intervals."""
    sentences = []
    for key, margin in record["margins"].items():
        other, steps = key.split("/")
        if margin["low"] is None:
            continue
        word = ("beats" if margin["low"] > 0 else "trails" if margin["high"] < 0 else "is not distinguishable from")
        sentences.append(f"- {steps} steps: consistent distillation {word} {other} ({margin['mean']:+.1f} points, "
                         f"95 % interval [{margin['low']:+.1f}, {margin['high']:+.1f}], {margin['seeds']} seeds).")
    return sentences


def write_markdown(record: dict, table: str, args, command: str) -> Path:
    """The page: settings, the table, the verdicts from the intervals, the curves, the time split, the command."""
    timing = record["timing"]
    share = timing["teacher_seconds_per_step"] / (timing["teacher_seconds_per_step"]
                                                  + timing["student_seconds_per_step"])
    text = f"""# Distillation in miniature (Fashion-MNIST, 32 px)

Written by `{command}` ({record['seconds'] / 60:.0f} min of training in all, on {record['machine']}, torch {record['torch']},
{args.threads} thread(s); runs in `{args.runs}`, numbers in `docs/distill/results.json`).

Teacher: `tiny-wide` fine-tuned from random weights with `bigtransfer finetune` ({args.teacher_steps} steps, batch
{args.batch_size}) on {args.teacher_per_class} training images per class: **{100 * record['teacher']['top1']:.1f} %**
top-1 on {args.test_per_class * 10} test images. Student: `tiny` from random weights on {args.train_per_class} of
those images per class, batch {args.batch_size}, 32 px, seeds 0-{args.seeds - 1}, the same steps in every arm:
labels = `bigtransfer finetune` (SGD, HyperRule schedule scaled to the steps, lr {record['label_lr']} chosen from
{', '.join(map(str, LABEL_LRS))} on held-out training images); consistent / fixed / independent = `bigtransfer
distill --preset imagenet --lr {args.distill_lr}` (KL at temperature 1, no label loss, Adam, clipping 1.0, warmup
and cosine, MixUp Beta(1, 1) on every batch) with `--teacher-views` consistent (function matching), fixed or
independent. Top-1 (%) on the test images, mean over seeds; margins are paired by seed, in points, with the 95 %
Student-t interval; agreement and KL are the consistent student's against the teacher on the test images.

{table}

{chr(10).join(verdicts(record))}

![agreement and KL during training](distill/curves.png)

Time per distillation step (batch {args.batch_size}, CPU): teacher forward {timing['teacher_seconds_per_step']:.3f} s,
student step {timing['student_seconds_per_step']:.3f} s (data loading included): the teacher takes
{100 * share:.0f} % of the step.
"""
    notes = args.output.read_text().split(NOTES, 1)[1] if args.output.is_file() and NOTES in args.output.read_text() else ""
    args.output.write_text(text + (f"\n{NOTES}{notes}" if notes else ""))  # the hand-written reading is kept
    return args.output


def main() -> None:
    args = parser().parse_args()
    torch.set_num_threads(args.threads)
    record = experiment(args)
    figures = args.output.parent / "distill"
    figures.mkdir(parents=True, exist_ok=True)
    curves(record, figures / "curves.png")
    table, teacher_s, student_s = write_up(record, args)
    record["timing"] = dict(teacher_seconds_per_step=teacher_s, student_seconds_per_step=student_s)
    (figures / "results.json").write_text(json.dumps(record, indent=1, default=str) + "\n")
    command = "python docs/distill_demo.py" + "".join(
        f" --{name.replace('_', '-')} {value}" for name, value in vars(args).items()
        if value != DEFAULTS[name] and name != "output")
    write_markdown(record, table, args, command)
    print(table)
    print(json.dumps(record["margins"], indent=1))
    print(f"teacher {100 * record['teacher']['top1']:.1f} %, label lr {record['label_lr']}, "
          f"split {teacher_s:.3f} s teacher / {student_s:.3f} s student per step, {record['seconds']:.0f} s of training")


if __name__ == "__main__":
    main()
