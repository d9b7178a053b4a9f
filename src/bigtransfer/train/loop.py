"""The one training loop every recipe runs: setup -> resume -> (step -> record -> evaluate -> save)* -> finish.

`Trainer` takes settings (`RunSettings`), a `Recipe` (model, resolution, learning-rate rule, loss), the data, the
run's final evaluation and any number of periodic `Evaluator`s, `(name, every, run)`, whose results are recorded
in metrics.jsonl; it knows no evaluator by name. `Callback`s see every step and every record (the progress bar
and the trackers are callbacks). Only rank 0 writes; every rank computes its shard of each global batch
(`train.plan`), gradients are averaged by DistributedDataParallel, and a stop signal on any rank stops them all
after the same step, with a checkpoint (`train.run_dir`).
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import logging
import math
import time
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

import torch
from torch import nn

from .. import machine
from ..checkpoints.writers import save_transformers
from ..data import ImageSource, TransformedDataset, collate_skip_bad
from ..distributed import Context, all_gather, all_sum, barrier, cuda_devices, gather_paths
from ..errors import OutOfMemoryError
from ..files import atomic_directory, write_text_atomic
from ..inference.speed import prepare_for_training
from ..layers import SharedStandardization
from ..precision import grad_scaler, precision_autocast
from ..processing import BitImageProcessor
from ..report import METRICS_NAME, REPORT_NAME, EvaluationReport, plot_run, write_report
from .callbacks import Callback
from .plan import BatchPlan, StepSampler, mixup_lambda, mixup_partners
from .recipe import Mix, Recipe
from .run_dir import (
    CHECKPOINT_NAME,
    MODEL_DIRNAME,
    RUN_NAME,
    RunLock,
    StopSignals,
    claim_run_directory,
    load_run_state,
    remove_run_files,
    remove_stale_temporaries,
    restore_run_state,
    save_run_state,
    truncate_metrics,
)
from .settings import RunSettings

logger = logging.getLogger("bigtransfer")


class NonFiniteLossError(RuntimeError):
    """The training loss became NaN or infinite; the run stopped without taking that step."""


@dataclasses.dataclass
class Evaluator:
    """A measurement taken during training: `run(trainer, step)` returns the values recorded in metrics.jsonl (and
    sent to the trackers) every `every` steps, and after the last step too when `at_end`. It runs on every rank;
    the random streams are restored afterwards, so training is the same with or without it."""

    name: str
    every: int
    run: Callable[[Trainer, int], dict[str, Any]]
    at_end: bool = False


@dataclasses.dataclass
class RunResult:
    """What a training run produced. `interrupted` is the signal number that stopped it early, or None."""

    output_dir: Path
    steps: int
    total_steps: int
    seconds: float
    report: EvaluationReport | None = None
    model_dir: Path | None = None
    interrupted: int | None = None
    skipped_images: list[str] = dataclasses.field(default_factory=list)


def rng_untouched(device: torch.device):
    """Side evaluations leave torch's random streams as they found them (a DataLoader draws its seed from the
    global generator), so training with and without them, and resumed or not, takes the same steps."""
    return torch.random.fork_rng(devices=[device] if device.type == "cuda" else [])


class Trainer:
    """One run of a recipe in one process (see the module doc). `run()` returns its RunResult."""

    def __init__(self, settings: RunSettings, recipe: Recipe, source: ImageSource, context: Context, *,
                 evaluate: Callable[[nn.Module], EvaluationReport], describe: Callable[[Trainer], dict[str, Any]],
                 evaluators: Sequence[Evaluator] = (), callbacks: Sequence[Callback] = ()):
        self.settings, self.recipe, self.source, self.context = settings, recipe, source, context
        self.model = recipe.model
        self.evaluate, self.describe = evaluate, describe
        self.evaluators, self.callbacks = list(evaluators), list(callbacks)
        self.output = Path(settings.output)
        self.start_step, self.skipped, self.elapsed_before = 0, [], 0.0
        self.started = time.perf_counter()
        self.batch_split = 1
        self._metrics_file: Any = None
        self._batches: Iterator | None = None

    @property
    def checkpoint_path(self) -> Path:
        return self.output / CHECKPOINT_NAME

    def seconds(self) -> float:
        """Training time so far, the resumed run's included."""
        return self.elapsed_before + time.perf_counter() - self.started

    def run(self) -> RunResult:
        """Claim the output, take its lock, and train until done or stopped."""
        settings, context = self.settings, self.context
        # Every rank checks (so a refusal stops them all, not only rank 0); rank 0 creates the directory.
        self.output = claim_run_directory(settings, create=context.is_main)
        barrier(context)
        lock = RunLock(self.output) if context.is_main else contextlib.nullcontext()
        with lock, StopSignals(announce=context.is_main) as signals, torch.random.fork_rng(
                devices=cuda_devices(context)):
            self.signals = signals
            if context.is_main:  # holds the lock: no live process writes these files
                remove_stale_temporaries(self.output, (CHECKPOINT_NAME, RUN_NAME, METRICS_NAME, MODEL_DIRNAME))
                if settings.overwrite and not settings.resume:
                    remove_run_files(self.output)
            barrier(context)
            torch.manual_seed(settings.seed + context.rank)  # only stochastic layers (drop path) draw from it
            self._setup()
            self._resume()
            self._open_streams()
            try:
                return self._train()
            finally:
                for callback in self.callbacks:
                    callback.on_train_end(self)

    # -- setup -----------------------------------------------------------------------------------------------

    def _setup(self) -> None:
        """The model on its device, the optimizer, the precision, and the plan of which examples each step sees."""
        settings, context, model = self.settings, self.context, self.model
        model.to(context.device)
        if settings.gradient_checkpointing:
            model.gradient_checkpointing_enable()
        self.optimizer = self.recipe.optimizer()
        self.scaler = grad_scaler(context.device, settings.precision)
        self.autocast = precision_autocast(context.device, settings.precision)
        # Eager steps split into micro-batches standardize the weights once per step, not once per micro-batch.
        shared = None if settings.compile else SharedStandardization(model)
        self.batch_split = self._choose_batch_split(shared)
        self.shared_standardization = shared if self.batch_split > 1 else None
        if settings.compile:  # after the memory probe, which would otherwise compile for its own shape; before DDP
            prepare_for_training(model, compile=True)
        self.network = model
        if context.world_size > 1:
            self.network = nn.parallel.DistributedDataParallel(
                model, device_ids=[context.device.index] if context.device.type == "cuda" else None
            )
        self.plan = BatchPlan(len(self.recipe.indices), settings.batch_size, settings.seed, context.world_size,
                              context.rank, self.batch_split)
        self.signature = dict(settings.signature(), data_fingerprint=self.source.fingerprint())

    def _choose_batch_split(self, shared: SharedStandardization | None) -> int:
        """`batch_split`, or for "auto" the fewest micro-batches whose step fits this process's memory (the largest
        over the processes, so that every rank runs the same plan; a split step also holds `shared`'s gathered
        gradients); says what it chose."""
        settings, context = self.settings, self.context
        if settings.batch_split != "auto":
            return settings.batch_split
        per_process = settings.batch_size // context.world_size
        need = machine.step_memory(self.model, self.recipe.crop, context.device, self.autocast)
        if shared is not None:
            need = dataclasses.replace(need, split_fixed=shared.gathered_bytes())
        available = machine.available_memory(context.device)
        split = max(all_gather(context, machine.fit_batch_split(per_process, need, available)))
        if context.is_main:
            self._warn_if_hours(need)
            logger.info(
                "batch %d %s (a step needs about %s; %s available%s); --batch-split N sets it", settings.batch_size,
                "in one pass" if split == 1 else f"as {split} micro-batches of {per_process // split}",
                machine.human_size(need.for_micro_batch(per_process // split, split)),
                "?" if available is None else machine.human_size(available),
                f", per process of {context.world_size}" if context.world_size > 1 else "",
            )
        return split

    def _warn_if_hours(self, need: machine.StepMemory) -> None:
        """Say before starting when the run would take hours here (a CPU at the HyperRule's GPU-sized defaults)."""
        recipe = self.recipe
        seconds = need.step_seconds(self.settings.batch_size // self.context.world_size) * recipe.total_steps
        if self.context.device.type == "cpu" and seconds > 2 * 3600:
            logger.warning(
                "%d steps of %d images at %d px would take roughly %.0f hours on this CPU (estimated from a probe "
                "step); the HyperRule's defaults are sized for GPUs. A trial run on a CPU: --resize 72 --crop 64 "
                "--batch-size 64 --max-steps 30 (see the README's quick start)", recipe.total_steps,
                self.settings.batch_size, recipe.crop, seconds / 3600)

    def _resume(self) -> None:
        """Continue from the run's checkpoint (refusing one whose settings differ), or start fresh; write run.json."""
        output, context, has_checkpoint = self.output, self.context, self.checkpoint_path.is_file()
        if has_checkpoint and not self.settings.resume:
            raise ValueError(
                f"{output} already holds a run ({CHECKPOINT_NAME}); pass --resume to continue it, --overwrite to "
                "start it again, or choose another --output"
            )
        self.has_checkpoint = has_checkpoint
        if has_checkpoint:
            tensors, state = load_run_state(self.checkpoint_path)
            stored = state["signature"]
            # A key the checkpoint lacks was not recorded by the version that wrote it; it cannot be compared.
            differing = sorted(key for key in stored if self.signature.get(key) != stored[key])
            if differing:
                changes = ", ".join(f"{key}: {stored.get(key)!r} -> {self.signature.get(key)!r}" for key in differing)
                raise ValueError(f"cannot resume {output}: settings differ from the checkpoint's ({changes})")
            restore_run_state(tensors, state, self.model, self.optimizer, self.scaler)
            self.start_step, self.skipped = state["step"], list(state["skipped_images"])
            self.elapsed_before = state["seconds"]
            if context.is_main:
                logger.info("resuming %s at step %d of %d", output, self.start_step, self.recipe.total_steps)
        elif self.settings.resume and context.is_main:
            logger.info("nothing to resume in %s: starting a new run", output)
        if context.is_main:
            truncate_metrics(output / METRICS_NAME, self.start_step)
            write_text_atomic(output / RUN_NAME, json.dumps(self.describe(self), indent=2, default=str) + "\n")

    def _open_streams(self) -> None:
        """The training batches from the resumed step on, and the metrics log (rank 0)."""
        recipe, settings, context = self.recipe, self.settings, self.context
        decode_size = recipe.decode_size()  # JPEGs decoded at the reduced size the recipe's transform allows
        train_set = TransformedDataset(
            self.source, recipe.train_transform(), recipe.indices, seed=settings.seed,
            on_bad_image="skip" if settings.on_bad_image == "skip" else "raise",
            min_size=None if decode_size is None else (decode_size, decode_size),
        )
        loader = torch.utils.data.DataLoader(
            train_set, batch_sampler=StepSampler(self.plan, self.start_step, recipe.total_steps),
            collate_fn=collate_skip_bad, num_workers=settings.workers, pin_memory=context.device.type == "cuda",
            generator=torch.Generator().manual_seed(settings.seed),  # keeps the global RNG untouched
            persistent_workers=False,
        )
        self._batches = iter(loader)
        if context.is_main:
            metrics = self.output / METRICS_NAME
            if metrics.is_symlink():  # appending would write wherever it points
                raise ValueError(f"{metrics} is a symbolic link; a run writes its own metrics.jsonl")
            self._metrics_file = open(metrics, "a", encoding="utf-8")
        for callback in self.callbacks:
            callback.on_train_begin(self)

    def _close_streams(self) -> None:
        if self._metrics_file is not None:
            self._metrics_file.close()
            self._metrics_file = None
        self._batches = None  # ends the DataLoader's workers

    # -- the loop --------------------------------------------------------------------------------------------

    def _train(self) -> RunResult:
        total, step = self.recipe.total_steps, self.start_step
        try:
            for step in range(self.start_step, total):
                lr = self.recipe.learning_rate(step)
                if lr is None:
                    break
                started = time.perf_counter()
                mean_loss, images, stop = self._step(step, lr)
                done = step + 1
                seconds = max(time.perf_counter() - started, 1e-9)
                self._after_step(done, mean_loss, lr, images / seconds, self.recipe.step_record(seconds))
                if stop:
                    return self._stopped(done, int(self.signals.received or stop))
                if self.settings.save_every and done % self.settings.save_every == 0 and done < total:
                    self._save(done)
            else:
                step = total
        except (RuntimeError, MemoryError) as error:
            requested = machine.failed_allocation(error)
            if requested is not None and not isinstance(error, NonFiniteLossError):
                raise OutOfMemoryError(self._out_of_memory_message(requested)) from error
            raise
        finally:
            self._close_streams()
        return self._finish(max(step, self.start_step))

    def _step(self, step: int, lr: float) -> tuple[float, float, float]:
        """One optimizer step on the global batch: (mean loss, images seen, the stop signal any rank received)."""
        optimizer, scaler, batch_size = self.optimizer, self.scaler, self.settings.batch_size
        for group in optimizer.param_groups:
            group["lr"] = lr
        loss_sum, good, step_skipped = self._micro_batches(step, mixup_lambda(self.settings.seed, step,
                                                                              self.recipe.mixup_alpha))
        loss_total, good_total, skipped_total, stop = all_sum(
            self.context, [loss_sum, float(good), float(len(step_skipped)), float(self.signals.received or 0)]
        )
        self.skipped.extend(gather_paths(self.context, step_skipped) if skipped_total else [])
        if good_total == 0:
            raise RuntimeError(f"every image of step {step} was unreadable (skipped {int(skipped_total)})")
        mean_loss = loss_total / good_total
        if not math.isfinite(mean_loss):
            optimizer.zero_grad(set_to_none=True)
            raise NonFiniteLossError(
                f"the training loss became {mean_loss} at step {step + 1} (lr {lr:.3g}); stopped without taking "
                f"that step; {self._kept_checkpoint()}. Try a lower learning rate (--base-lr; --lr for distill) or --precision fp32"
            )
        if scaler.is_enabled():
            scaler.unscale_(optimizer)
        if good_total < batch_size:  # unreadable images skipped: average over the ones seen
            for group in optimizer.param_groups:
                for parameter in group["params"]:
                    if parameter.grad is not None:
                        parameter.grad.mul_(batch_size / good_total)
        if self.recipe.clip_grad_norm is not None:  # on the global batch's gradient: every rank clips alike
            nn.utils.clip_grad_norm_([p for group in optimizer.param_groups for p in group["params"]],
                                     self.recipe.clip_grad_norm)
        scaler.step(optimizer) if scaler.is_enabled() else optimizer.step()
        if scaler.is_enabled():
            scaler.update()
        optimizer.zero_grad(set_to_none=True)
        return mean_loss, good_total, stop

    def _micro_batches(self, step: int, lam: float | None) -> tuple[float, int, list[str]]:
        """Forward and backward over this rank's micro-batches of `step`; gradients accumulate (synced on the last)."""
        context, plan, device = self.context, self.plan, self.context.device
        loss_sum, good, skipped = 0.0, 0, []
        # Scale so that DDP's average over ranks of the per-rank sums is the mean over the whole global batch.
        scale = context.world_size / self.settings.batch_size
        shared = self.shared_standardization
        with shared.step() if shared else contextlib.nullcontext():
            for index in range(plan.batch_split):
                images, labels, bad = next(self._batches)
                skipped.extend(sample.path for sample in bad)
                last = index == plan.batch_split - 1
                # The gradients the earlier micro-batches gathered, carried through the standardization by this one.
                carried = shared.last_pass() if shared and last else 0.0
                with contextlib.nullcontext() if last or context.world_size == 1 else self.network.no_sync():
                    if len(labels) == 0:
                        if last and (context.world_size > 1 or isinstance(carried, torch.Tensor)):
                            # DDP must still all-reduce on the last micro-batch (zero gradients of its own), and
                            # the gathered gradients must still reach the weights.
                            zero = sum(p.sum() * 0.0 for p in self.model.parameters() if p.requires_grad)
                            (zero + carried).backward()
                        continue
                    images = images.to(device, non_blocking=True)
                    labels = labels.to(device, non_blocking=True)
                    mix = None
                    if lam is not None:
                        partners = mixup_partners(self.settings.seed, step, plan.micro_batch_offset(index), len(labels))
                        mix = Mix(lam, partners.to(device))
                    loss = self.recipe.micro_batch_loss(self.network, images, labels, mix, self.autocast)
                    scaled = loss * scale
                    ((self.scaler.scale(scaled) if self.scaler.is_enabled() else scaled) + carried).backward()
                    loss_sum += float(loss.detach())
                    good += len(labels)
        return loss_sum, good, skipped

    def _after_step(self, done: int, mean_loss: float, lr: float, images_per_second: float,
                    recipe_values: dict[str, Any]) -> None:
        """The step's line in metrics.jsonl (with the recipe's own values), the callbacks, and the evaluators that
        are due."""
        total = self.recipe.total_steps
        if done % self.settings.log_every == 0 or done == total:
            self.record(dict(step=done, loss=mean_loss, lr=lr, images_per_second=images_per_second,
                             epoch=round(self.plan.epoch(done), 4), seconds=round(self.seconds(), 3),
                             **recipe_values))
        for callback in self.callbacks:
            callback.on_step_end(self, done, mean_loss, lr, images_per_second)
        for evaluator in self.evaluators:
            if (evaluator.every and done % evaluator.every == 0 and done < total) or (
                    done == total and evaluator.at_end):
                with rng_untouched(self.context.device):
                    values = evaluator.run(self, done)
                self.model.train()
                self.record(dict(step=done, **values))

    def record(self, values: dict[str, Any]) -> None:
        """A metrics.jsonl line (rank 0), and the same values to the callbacks (the trackers among them)."""
        if self._metrics_file is not None:
            self._metrics_file.write(json.dumps(values) + "\n")
            self._metrics_file.flush()
        for callback in self.callbacks:
            callback.on_record(self, values)

    # -- saving and finishing --------------------------------------------------------------------------------

    def _save(self, step: int) -> None:
        """The training checkpoint after `step`, written by rank 0; every rank waits for it."""
        # A finite loss can still be followed by an update that overflows the weights: never save those over the
        # last good checkpoint (every rank holds the same weights, so every rank stops here together).
        if not all(torch.isfinite(parameter).all() for parameter in self.model.parameters()):
            raise NonFiniteLossError(
                f"the weights became NaN or infinite by step {step}; stopped without saving them; "
                + self._kept_checkpoint() + ". Try a lower learning rate (--base-lr; --lr for distill) or --precision fp32"
            )
        if self.context.is_main:
            state = dict(step=step, total_steps=self.recipe.total_steps, kind=self.recipe.kind,
                         signature=self.signature, skipped_images=self.skipped, seconds=self.seconds(),
                         epoch=self.plan.epoch(step))
            with self.signals.saving():
                save_run_state(self.checkpoint_path, self.model, self.optimizer, state, self.scaler)
        barrier(self.context)

    def _stopped(self, done: int, signal_number: int) -> RunResult:
        """A signal stopped the run: save the checkpoint, say how to resume."""
        self._save(done)
        if self.context.is_main:
            logger.warning("stopped by signal %d at step %d; resume with --resume", signal_number, done)
        return RunResult(self.output, done, self.recipe.total_steps, self.seconds(), interrupted=signal_number,
                         skipped_images=self.skipped)

    def _finish(self, completed: int) -> RunResult:
        """The last checkpoint, the evaluation, and the run's model/, report.json and plots."""
        context, output, recipe = self.context, self.output, self.recipe
        if completed > self.start_step or not self.has_checkpoint:
            self._save(completed)
        model_dir = output / MODEL_DIRNAME
        if context.is_main:  # the model before its evaluation, so an evaluation that fails leaves the model saved
            self.model.eval()
            with atomic_directory(model_dir) as written:  # config, weights and processor replace the old as one
                save_transformers(self.model, written)
                BitImageProcessor.squash(recipe.crop, recipe.mean, recipe.std).save_pretrained(written)
        report = self.evaluate(self.model)
        report.skipped_images = sorted(set(self.skipped) | set(report.skipped_images))
        report.step = completed
        for callback in self.callbacks:
            callback.on_record(self, dict(step=completed, eval_top1=report.top1, eval_top5=report.top5,
                                          eval_loss=report.loss))
        if context.is_main:
            write_report(report, output / REPORT_NAME)
            if self.settings.plots:
                plot_run(output, report)
        barrier(context)
        return RunResult(output, completed, recipe.total_steps, self.seconds(), report, model_dir,
                         skipped_images=report.skipped_images)

    def _kept_checkpoint(self) -> str:
        if self.checkpoint_path.is_file():
            return f"the last good checkpoint is {self.checkpoint_path} (resume from it with --resume)"
        return "no checkpoint was saved before it"

    def _out_of_memory_message(self, requested: int) -> str:
        plan, device = self.plan, self.context.device
        available = machine.available_memory(device)
        return (
            f"out of memory with micro-batches of {plan.micro_batch_size} images"
            + (f": {machine.human_size(requested)} could not be allocated" if requested else "")
            + (f" ({machine.human_size(available)} free on {device.type} now)" if available is not None else "")
            + f"; raise --batch-split (e.g. {plan.batch_split * 2}) or pass --gradient-checkpointing (the global "
            "batch and the result stay the same), or lower --crop"
        )
