"""Fine-tune and evaluate from Python: the library calls behind `bigtransfer finetune` and `bigtransfer evaluate`.

Run from the repository root (about a minute on 2 CPU cores; needs `apt-get install dataset-fashion-mnist`):

    python examples/finetune_python.py

Expected: a run directory runs/example-finetune/ with metrics.jsonl, model/, report.json and the plots, and a
printed top-1 of roughly 70-80 % for 10 examples per class of Fashion-MNIST classes 5-9 from random init.
"""

from bigtransfer.inference import DataSelection, evaluate
from bigtransfer.train import FinetuneConfig, finetune

config = FinetuneConfig(
    model="tiny",  # a variant name trains from random init; pass a model directory to transfer from it
    data="fashion-mnist",
    classes=[5, 6, 7, 8, 9],  # Sandal, Shirt, Sneaker, Bag, Ankle boot, relabelled 0..4
    shots=10,
    seed=0,
    output="runs/example-finetune",
    max_steps=100,  # the HyperRule's 500-step schedule scaled to 100 steps
    batch_size=64,
    base_lr=0.01,
    resize=36,
    crop=32,
    resume=True,  # start, or continue after an interruption
)
result = finetune(config)
print(result.report.summary())
print(evaluate(result.model_dir, DataSelection("fashion-mnist", classes=[5, 6, 7, 8, 9])).summary())
