"""The recipes as one call each: `finetune(FinetuneConfig)`, `pretrain(PretrainConfig)` and
`distill(DistillConfig)` open the data, build the recipe and its evaluators, and run the loop::

    from bigtransfer.train import FinetuneConfig, finetune
    result = finetune(FinetuneConfig(model="runs/upstream/model", data="fashion-mnist", output="runs/ft",
                                     classes=[5, 6, 7, 8, 9], shots=10, max_steps=100, batch_size=64))
    result.report.top1

What a run directory holds (only rank 0 writes; every file is written atomically except the append-only log):
`metrics.jsonl` (one record per step: step, loss, lr, images/s, epoch, seconds; and evaluation records),
`model/` (config.json, model.safetensors, preprocessor_config.json: loadable here and by transformers),
`report.json` (top-1, top-5, loss, per-class accuracy, confusion matrix, skipped images), the PNG plots,
`checkpoint.safetensors` (model, optimizer, step, RNG states and the run's settings, for `resume`),
`run.json` (the settings) and, while running, `.lock`.

The run's evaluation preprocesses exactly as the saved model's preprocessor_config.json says, through the same
`BitImageProcessor`, so `bigtransfer evaluate RUN/model` on the same images reproduces report.json.
"""

from __future__ import annotations

import dataclasses
import logging
from typing import Any

import torch

from ..data import ImageSource, check_shots, open_train_eval
from ..distributed import Context, distributed
from ..fewshot import evaluate_representation
from ..inference.evaluate import evaluate_dataset, processed_dataset
from ..processing import BitImageProcessor
from ..report import EvaluationReport
from .callbacks import Callback
from .distillation import DistillMeasure, distill_recipe
from .loop import Evaluator, RunResult, Trainer
from .recipe import Recipe, finetune_recipe, pretrain_recipe
from .settings import DistillConfig, FinetuneConfig, PretrainConfig, RunSettings
from .tracking import ProgressCallback, TrackerCallback

logger = logging.getLogger("bigtransfer")


def finetune(config: FinetuneConfig, callbacks: tuple[Callback, ...] = ()) -> RunResult:
    """Fine-tune with the BiT-HyperRule and write a run directory; see `FinetuneConfig` and the module doc.

    Returns a RunResult (interrupted runs return early with a checkpoint saved). Raises ValueError for bad
    settings, NonFiniteLossError when the loss diverges, RunLockedError when the output is in use.
    """
    config.check()
    with distributed(config.device) as context:
        source, eval_source, evaluated = _open_data(config)
        recipe = finetune_recipe(config, source)
        return _train(config, recipe, source, eval_source, evaluated, context, [], callbacks)


def pretrain(config: PretrainConfig, callbacks: tuple[Callback, ...] = ()) -> RunResult:
    """Pre-train (upstream) with the paper's recipe and write a run directory; see `PretrainConfig`."""
    config.check()
    with distributed(config.device) as context:
        source, eval_source, evaluated = _open_data(config)
        recipe = pretrain_recipe(config, source)
        evaluators = [_fewshot_evaluator(config, recipe, context)] if config.fewshot_every else []
        return _train(config, recipe, source, eval_source, evaluated, context, evaluators, callbacks)


def distill(config: DistillConfig, callbacks: tuple[Callback, ...] = ()) -> RunResult:
    """Distil `config.teacher` into `config.student` by function matching and write a run directory; see
    `DistillConfig`. Every evaluation also records the teachers' top-1, top-1 agreement and KL (report.json's
    `metrics`, metrics.jsonl, distill.png); each step's record splits its time into teacher and student."""
    config.check()
    with distributed(config.device) as context:
        source, eval_source, evaluated = _open_data(config)
        recipe = distill_recipe(config, source, context)
        measure = DistillMeasure(recipe, eval_source, config, context)
        return _train(config, recipe, source, eval_source, evaluated, context, [], callbacks, measure)


def _train(settings: RunSettings, recipe: Recipe, source: ImageSource, eval_source: ImageSource,
           evaluated: dict[str, Any], context: Context, evaluators: list[Evaluator],
           callbacks: tuple[Callback, ...], measure: DistillMeasure | None = None) -> RunResult:
    """The loop over `recipe`, with the run's evaluation of `eval_source` (also every `eval_every` steps), and
    `measure`'s measurements of the same logits in the report's `metrics`."""
    processor = BitImageProcessor.squash(recipe.crop, recipe.mean, recipe.std)
    dataset = processed_dataset(eval_source, processor, settings.on_bad_image, reduced_decode=True)

    def evaluate(model: torch.nn.Module) -> EvaluationReport:
        if measure is not None:
            measure.start(evaluation_batch(trainer))
        report = evaluate_dataset(model, dataset, evaluation_batch(trainer), context, precision=settings.precision,
                                  progress=settings.progress, on_logits=measure and measure.on_logits)
        report.data = dict(evaluated)
        if measure is not None:
            report.metrics = measure.finish()
        return report

    def evaluate_every(trainer: Trainer, step: int) -> dict[str, Any]:
        report = evaluate(trainer.model)
        return dict(eval_top1=report.top1, eval_top5=report.top5, eval_loss=report.loss, **report.metrics)

    if settings.eval_every:
        evaluators = [Evaluator("eval", settings.eval_every, evaluate_every), *evaluators]
    callbacks = (ProgressCallback(settings.progress), TrackerCallback(settings.report_to), *callbacks)
    trainer = Trainer(settings, recipe, source, context, evaluate=evaluate, describe=describe,
                      evaluators=evaluators, callbacks=callbacks)
    return trainer.run()


def _open_data(config: RunSettings) -> tuple[ImageSource, ImageSource, dict[str, Any]]:
    """(training source, evaluation source, which images are evaluated): see `data.open_train_eval`."""
    source, eval_source, described = open_train_eval(config.data, config.eval_data, val_fraction=config.val_fraction,
                                                     classes=config.classes)
    if len(source.classes) < 2:
        raise ValueError(f"--data {config.data} has {len(source.classes)} class ({', '.join(map(str, source.classes))}"
                         "): a classifier needs two or more (one sub-folder per class); every prediction would be "
                         "that class and accuracy would read 100 %")
    return source, eval_source, described["test"]


def evaluation_batch(trainer: Trainer) -> int:
    """Images per forward pass in the run's evaluations: one training micro-batch per process, at least 32."""
    return max(trainer.settings.batch_size // trainer.batch_split // trainer.context.world_size, 32)


def _fewshot_evaluator(config: PretrainConfig, recipe: Recipe, context: Context) -> Evaluator:
    """big_vision's few-shot linear evaluation of the backbone every `fewshot_every` steps and at the end, on
    `fewshot_data` preprocessed as the run evaluates."""
    pool, test, _ = open_train_eval(config.fewshot_data, val_fraction=config.val_fraction)
    check_shots(pool.labels, max(config.fewshot_shots), pool.classes, f"--fewshot-data {config.fewshot_data}")
    processor = BitImageProcessor.squash(recipe.crop, recipe.mean, recipe.std)
    support, queries = (processed_dataset(part, processor, config.on_bad_image, reduced_decode=True)
                        for part in (pool, test))

    def run(trainer: Trainer, step: int) -> dict[str, Any]:
        report = evaluate_representation(trainer.model.bit, support, queries, context, shots=config.fewshot_shots,
                                         seeds=config.fewshot_seeds, batch_size=evaluation_batch(trainer))
        if context.is_main:
            logger.info("step %d: few-shot linear top-1 %s", step,
                        ", ".join(f"{shots}-shot {100 * report.mean(shots):.1f} %" for shots in report.shots))
        return {**{f"fewshot_{shots}shot": report.mean(shots) for shots in report.shots},
                "fewshot_seconds": round(report.feature_seconds + report.solve_seconds, 3)}

    return Evaluator("fewshot", config.fewshot_every, run, at_end=True)


def describe(trainer: Trainer) -> dict[str, Any]:
    """run.json: the settings and what the recipe made of them."""
    settings, recipe = trainer.settings, trainer.recipe
    values = dataclasses.asdict(settings)
    values["data"] = str(settings.data)
    values["eval_data"] = None if settings.eval_data is None else str(settings.eval_data)
    if "fewshot_data" in values:
        values["fewshot_data"] = None if settings.fewshot_data is None else str(settings.fewshot_data)
    return dict(
        kind=recipe.kind, settings=values, batch_split=trainer.batch_split, total_steps=recipe.total_steps,
        resize=recipe.precrop, crop=recipe.crop, mean=list(recipe.mean), std=list(recipe.std),
        weight_decay=recipe.weight_decay, classes=list(trainer.source.classes), world_size=trainer.context.world_size,
        torch=torch.__version__, **recipe.description,
    )
