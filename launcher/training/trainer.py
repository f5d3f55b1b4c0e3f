"""The Trainer: one run's parts, and what the training loop does with them.

:meth:`Trainer.__init__` builds everything in the order that keeps a failed start harmless (the
run directory changes only after model, tokenizer, data and checkpoint have all been checked);
:func:`ftl.train.train` then calls :meth:`~Trainer.step`, :meth:`~Trainer.evaluate` and
:meth:`~Trainer.save`. Run state lives in one :class:`TrainState`, which the checkpointer saves.

Each optimizer step gathers its micro-batches first, counts their targets across all ranks, and
scales every micro-batch's summed loss by that count, so the update equals the one of a single
batch of the same rows. What the loss is belongs to the objective (``ftl.objectives``).
"""

from __future__ import annotations

import logging
import math
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, NamedTuple

import torch
from accelerate.utils import set_seed
from transformers import get_scheduler

from ftl import objectives
from ftl.distributed import process_group, strategies
from ftl.checkpoints.checkpoint import load_training_state, read_state, save_checkpoint
from ftl.recipe.schema import Recipe
from ftl.console import console
from ftl.data.sources import batch_indices, build_dataset, load_source
from ftl.training.flops import flops_counter, peak_flops, peak_memory_gib
from ftl.training.metrics import MetricsWriter, TrainingProgress, plot_losses, summary_table
from ftl.models.build import build_model, compile_layers, load_base_model
from ftl.objectives.base import Batch, precompute_reference, reference_file
from ftl.training.optim import build_optimizer
from ftl.distributed.plan import local_device, make_plan
from ftl.data.preprocess import eval_dir, prepare as prepare_data
from ftl.evaluate import generation_rows, score_generations
from ftl.scorers import ScorerError, metric_name as scorers_metric
from ftl.training.resume import TrainError, resume_point
from ftl.checkpoints.rundir import RunDir, read_metrics, write_atomic
from ftl.data.streaming import RowStream
from ftl.training import early_stopping
from ftl.training.state import TrainState
from ftl.errors import UserError
from ftl.sweep.report import TrialLink, is_trial
from ftl.checkpoints.weights import weights_identity

log = logging.getLogger(__name__)


class StepResult(NamedTuple):
    loss: float  # per target, over the whole optimizer step (every rank)
    targets: int
    grad_norm: float
    taken: bool  # not when the loss or the gradient norm is not finite


@dataclass
class RunSummary:
    """What ``train`` returns: how far the run got, its losses and its newest checkpoint."""

    total_steps: int
    steps: int = 0
    elapsed_s: float = 0.0
    checkpoint: str | None = None
    resumed_from: str | None = None
    initial_eval_loss: float | None = None
    final_eval_loss: float | None = None
    final_train_loss: float | None = None
    stopped: str | None = None  # the signal that stopped the run before its last step
    early_stopped: bool = False  # train.early_stopping's patience ran out
    pruned: bool = False  # a sweep's pruner stopped the trial
    best_checkpoint: str | None = None  # checkpoints/best (train.early_stopping)
    best_metric: float | None = None


class Trainer:
    def __init__(self, recipe: Recipe):
        recipe = self.recipe = recipe.resolved().for_device(local_device())
        cfg = self.cfg = recipe.train
        self.plan = make_plan(recipe)
        self.strategy = strategies.for_recipe(recipe)
        acc = self.accelerator = process_group.build_accelerator(recipe, self.plan, self.strategy)
        process_group.check_process_group(acc, self.plan, self.strategy)
        self.run = RunDir(Path(recipe.output.dir))
        self.main, self.world, self.dims = acc.is_main_process, acc.num_processes, self.strategy.dims
        self.dp_rank = self.dims.dp_rank(acc.process_index)  # which rows this process reads
        checkpoint = resume_point(recipe)
        set_seed(cfg.seed)

        # Fail on missing data before spending minutes loading a model.
        for source in recipe.data.train + recipe.data.eval_sources():
            if self.main:
                load_source(source, streaming=recipe.data.streaming)
        self.model, self.tokenizer = build_model(recipe)
        total_steps = self._load_data()
        gen = recipe.eval.generate  # eval.generate's prompts and answers, rendered as for training
        self.generation = generation_rows(recipe.data.eval_sets()[gen.set], self.tokenizer, gen.rows) if gen else []
        # Model, tokenizer, data and checkpoint have all been checked: only now may the run directory change.
        if self.main:
            self.run.prepare(recipe.to_yaml(), cfg.resume, recipe.output.overwrite, checkpoint,
                             read_state(checkpoint)["step"] if checkpoint is not None else None)
            self.run.write_data_stats(self.data_stats)
        acc.wait_for_everyone()

        fused = apply_kernels(recipe, self.model, self.strategy, acc.device)
        if cfg.compile:
            compile_layers(self.model)
        kind, reference = objectives.for_recipe(recipe), None
        if kind.reference_copy(recipe):  # loaded again, as the policy was (under ZeRO-3: partitioned as it loads)
            reference = load_base_model(recipe.model, self.tokenizer, recipe.quantization).eval().requires_grad_(False)
            apply_kernels(recipe, reference, self.strategy, acc.device)
            reference = self.strategy.prepare_reference(acc, reference)
        self.objective = kind(recipe, self.tokenizer.pad_token_id, fused, reference)
        model = self.strategy.shard(self.model, acc.device)
        optimizer = build_optimizer(model, cfg, cpu_adam=self.strategy.cpu_adam)
        self.model, self.optimizer = self.strategy.prepare(acc, model, optimizer)
        # On the wrapped optimizer (ZeRO regroups parameters), not prepared: Accelerate would step it once per process.
        warmup = cfg.warmup_steps if cfg.warmup_steps is not None else math.ceil(cfg.warmup_ratio * total_steps)
        self.scheduler = get_scheduler(cfg.lr_scheduler, self.optimizer, num_warmup_steps=warmup, num_training_steps=total_steps)

        if kind.precomputed(recipe):
            self._attach_reference(resuming=checkpoint is not None)
        if checkpoint is not None:
            self.state = load_training_state(checkpoint, acc, self.model, self.optimizer, self.scheduler, self.strategy)
            self._continue_schedule(checkpoint, total_steps)
        else:
            self.state = TrainState(total_steps=total_steps, method=recipe.method.type, bits=recipe.quantization.bits)
        if self.main and self.state.best_step is not None and self.run.checkpoint(self.state.best_step).is_dir():
            write_atomic(self.run.best, f"step-{self.state.best_step}")  # the resumed run's own best (newer ones were set aside)
        # Checked equal to the checkpoint's by resume_point; older checkpoints may not name them.
        self.state.total_steps, self.state.method, self.state.bits = total_steps, recipe.method.type, recipe.quantization.bits
        self.state.base_identity = weights_identity(recipe.model.path)  # checked equal to the checkpoint's by resume_point
        self.stream = RowStream(recipe, self.tokenizer, self.dp_rank, self.dims.dp, **(self.state.data or {})) if recipe.data.streaming else None
        out = recipe.output
        self.metrics = MetricsWriter(self.run.root, enabled=self.main, report_to=out.report_to, resume_step=self.state.step,
                                     config=recipe.model_dump(mode="json"), wandb_project=out.wandb_project, run_name=out.run_name)
        self.progress = TrainingProgress(total_steps, enabled=self.main)
        self.summary = RunSummary(total_steps, resumed_from=str(checkpoint) if checkpoint else None,
                                  checkpoint=str(checkpoint) if checkpoint else None)
        # A sweep's trial reports its evaluations to the study (the main process talks to it).
        self.in_sweep = is_trial(self.run.root)
        self.trial = TrialLink.of_run(self.run.root) if self.main else None
        self.first_step = self.state.step
        self.start = self.window_start = self.last_save = time.perf_counter()
        self.window_tokens = self.window_rows = 0
        self.peak, self.flops_per_token = peak_flops(cfg.peak_tflops), flops_counter(acc.unwrap_model(self.model))

    def _continue_schedule(self, checkpoint: Path, total_steps: int) -> None:
        """The restored scheduler under what the recipe says now (resume_point refused any change not
        allowed): an allowed new learning rate holds from this step on, and a new number of steps
        recomputes the schedule, which is said rather than done silently."""
        scheduler, step, saved_total = self.scheduler, self.state.step, self.state.total_steps
        rate, saved_rate = self.cfg.learning_rate, scheduler.base_lrs[0]
        new_rate, new_total = saved_rate != rate, bool(saved_total) and saved_total != total_steps
        if not (new_rate or new_total):
            return
        before = self.optimizer.param_groups[0]["lr"]
        scheduler.base_lrs = [rate] * len(scheduler.base_lrs)
        for group, factor in zip(self.optimizer.param_groups, scheduler.lr_lambdas):
            group["initial_lr"], group["lr"] = rate, rate * factor(scheduler.last_epoch)
        if not self.main:
            return
        if new_rate:
            log.warning("train.learning_rate: %g where %s trained with %g; the schedule continues from step %d with the "
                        "new rate", rate, checkpoint.name, saved_rate, step)
        if new_total:
            log.warning("%s was trained toward %d steps and this run goes to %d: the %s learning-rate schedule is recomputed "
                        "for %d steps (the rate at step %d is %.3g, where the checkpoint's schedule had %.3g)",
                        checkpoint.name, saved_total, total_steps, self.cfg.lr_scheduler, total_steps, step,
                        self.optimizer.param_groups[0]["lr"], before)

    def _load_data(self) -> int:
        """Tokenize (or find in the cache) the train and eval rows; returns the run's optimizer steps."""
        recipe, cfg = self.recipe, self.cfg
        if recipe.data.streaming:  # rows come from a RowStream; only eval data is loaded now
            self.train_set, self.data_stats = None, {"streaming": True}
            self.eval_sets = {name: build_dataset(sources, self.tokenizer, recipe.data) for name, sources in recipe.data.eval_sets().items()}
            return cfg.max_steps
        # Rank 0 tokenizes (or finds the cache); the others wait, then read its cache.
        with self.accelerator.main_process_first():
            self.train_set, self.eval_sets, self.data_stats = prepare_data(recipe, self.tokenizer)
        per_epoch = len(batch_indices(len(self.train_set), cfg.micro_batch_size, cfg.seed, 0, self.dp_rank, self.dims.dp))
        if per_epoch == 0:
            raise TrainError(
                f"data.train: {len(self.train_set)} rows make no micro-batch for each of {self.dims.dp} data-parallel processes; "
                "lower train.micro_batch_size or add data"
            )
        return cfg.max_steps or math.ceil(cfg.epochs * math.ceil(per_epoch / cfg.gradient_accumulation_steps))

    def _attach_reference(self, resuming: bool) -> None:
        """preference.reference: precomputed: the starting model's log-probabilities of every row, computed
        before the first step (the model is the reference then) and kept beside the preprocessed data."""
        path = reference_file(self.recipe, type(self.objective), Path(self.data_stats["cache"]))
        if path.is_file():
            table = torch.load(path, weights_only=True)
        elif resuming:
            raise TrainError(f"{path}: the precomputed reference log-probabilities are gone, and a resumed model is no longer "
                             "the reference; start the run again (train.resume: never) or use preference.reference: auto")
        else:
            log.info("precomputing the reference log-probabilities of %d train rows", len(self.train_set))
            table = {name: precompute_reference(self.model, self.objective.collate, self.objective.reference_logps, rows,
                                                self.cfg.micro_batch_size, self.accelerator.device, self.strategy.autocast)
                     for name, rows in self._row_sets().items()}
            if self.main:
                tmp = path.with_name(path.name + ".tmp")
                torch.save(table, tmp)
                os.replace(tmp, path)
            self.accelerator.wait_for_everyone()
        with_reference = {}
        for name, rows in self._row_sets().items():
            for k, column in enumerate(self.objective.reference_columns):
                rows = rows.add_column(column, table[name][:, k].tolist())
            with_reference[name] = rows
        self.train_set = with_reference.pop("train")
        self.eval_sets = {name: with_reference[eval_dir(name)] for name in self.eval_sets}

    def _row_sets(self) -> dict:
        """The train rows and each eval set, by the names their precomputed reference is kept under."""
        return {"train": self.train_set, **{eval_dir(name): rows for name, rows in self.eval_sets.items()}}

    # ------------------------------------------------------------------------- the loop's verbs

    def begin(self) -> None:
        """Say what will run; evaluate before the first step of a fresh run; continue the RNG streams."""
        state, cfg, data = self.state, self.cfg, self.recipe.data
        if self.summary.resumed_from:
            self.progress.message(f"resuming from {self.summary.resumed_from} (step {state.step} of {state.total_steps})")
            state.restore_rng()  # last, so nothing above draws from the restored streams
            return
        stats, rows = self.data_stats, len(self.train_set) if self.train_set else "streamed"
        rows_per_step = cfg.micro_batch_size * cfg.gradient_accumulation_steps * self.dims.dp
        self.progress.message(
            (f"packed {stats['examples']} examples into {rows} rows of {data.max_length} tokens "
             f"({stats['packing_efficiency']:.1%} filled); " if "packing_efficiency" in stats else "") +
            ("each micro-batch's pairs in one row, padding-free; " if data.packing and "packing_efficiency" not in stats else "") +
            f"training {state.total_steps} steps: {rows} rows, {self.world} process(es) ({self.strategy.name}), micro-batch "
            f"{cfg.micro_batch_size} x accumulation {cfg.gradient_accumulation_steps} x {self.dims.dp} = {rows_per_step} rows/step"
        )
        if self.eval_sets:
            base = self.evaluate(log_as_step=0)
            state.initial_eval_loss, state.initial_eval_losses = base["eval_loss"], base

    def next_micro_batches(self) -> list[Batch]:
        """This rank's micro-batches for the next optimizer step, on its device."""
        cfg, state, accum = self.cfg, self.state, self.cfg.gradient_accumulation_steps
        if self.stream is not None:
            micro = [self.objective.collate(self.stream.next_rows(cfg.micro_batch_size)) for _ in range(accum)]
            state.epoch, self.batches_in_epoch = self.stream.epoch, 0
        else:
            batches = batch_indices(len(self.train_set), cfg.micro_batch_size, cfg.seed, state.epoch, self.dp_rank, self.dims.dp)
            while state.position >= len(batches):
                state.epoch, state.position = state.epoch + 1, 0
                batches = batch_indices(len(self.train_set), cfg.micro_batch_size, cfg.seed, state.epoch, self.dp_rank, self.dims.dp)
            self.batches_in_epoch = len(batches)
            micro = [self.objective.collate([self.train_set[i] for i in idx])
                     for idx in batches[state.position : state.position + accum]]
        return [mb.to(self.accelerator.device) for mb in micro]

    def step(self, micro: list[Batch]) -> StepResult:
        """One optimizer step over ``micro``: every rank's losses summed, divided by every rank's targets."""
        acc, strategy, model, objective = self.accelerator, self.strategy, self.model, self.objective
        step_targets = acc.reduce(sum(objective.targets(mb) for mb in micro).clone(), reduction="sum").clamp(min=1)
        model.train()
        with strategy.autocast(acc.device):
            objective.begin_step(model, micro, lambda t: acc.reduce(t.clone(), reduction="sum"))
        loss_sum = torch.zeros((), device=acc.device)
        for k, mb in enumerate(micro):
            last = k == len(micro) - 1
            with strategy.gradient_sync(acc, model, sync=last):
                with strategy.autocast(acc.device):
                    loss = objective.loss_sum(model, mb)
                # Every strategy averages gradients over ranks; multiplying by their number turns that into a sum.
                strategy.backward(acc, model, loss * self.dims.gradient_ranks / step_targets, last)
            loss_sum += loss.detach().float()
        step_loss = (acc.reduce(loss_sum, reduction="sum") / step_targets).item()  # the same on every rank
        if not math.isfinite(step_loss):
            strategy.discard_gradients(model, self.optimizer)
            return StepResult(step_loss, int(step_targets), float("nan"), False)
        grad_norm, taken = strategy.optimizer_step(acc, model, self.optimizer, self.cfg.max_grad_norm)
        if taken:
            self.scheduler.step()
            self.state.step += 1
            self.state.position += len(micro)
            self.summary.final_train_loss = step_loss
            self._count(micro)
        return StepResult(step_loss, int(step_targets), grad_norm, taken)

    def refuse(self, result: StepResult) -> TrainError:
        """A step that was not taken ends the run, with the weights from before it saved."""
        path = self.save()
        return TrainError(
            f"step {self.state.step + 1}: the loss ({result.loss:.4g}) or gradient norm ({result.grad_norm:.4g}) is not "
            f"finite, so the step was not taken and training stopped; {path} holds the weights from before it. Lower "
            "train.learning_rate, keep train.max_grad_norm set, or check the data"
        )

    def _count(self, micro: list[Batch]) -> None:
        tokens = [self.objective.tokens(mb) for mb in micro]
        self.window_tokens += int(self.accelerator.reduce(sum(t.token_mask.sum() for t in tokens), "sum"))
        self.window_rows += len(micro) * tokens[0].input_ids.shape[0] * self.dims.dp

    def log(self, result: StepResult) -> None:
        """Write a metrics record for the steps since the last one."""
        acc, state, now = self.accelerator, self.state, time.perf_counter()
        tokens_per_s = self.window_tokens / max(now - self.window_start, 1e-9)
        # Model FLOPs per device (see ftl.training.flops); MFU where the device's peak is known.
        tflops = self.flops_per_token(self.window_tokens / max(self.window_rows, 1)) * tokens_per_s / self.world / 1e12
        record = {
            "step": state.step,
            "epoch": round(state.epoch + state.position / self.batches_in_epoch, 4) if self.batches_in_epoch else state.epoch,
            "loss": result.loss,
            "lr": self.scheduler.get_last_lr()[0],
            "grad_norm": result.grad_norm,
            "trainable_tokens": result.targets,
            "tokens_per_s": tokens_per_s,
            "elapsed_s": now - self.start,
            "eta_s": (now - self.start) / max(state.step - self.first_step, 1) * (state.total_steps - state.step),
            "peak_memory_gib": acc.reduce(torch.tensor(peak_memory_gib(), device=acc.device), "max").item(),
            "tflops_per_device": tflops,
        }
        if self.peak:
            record["mfu"] = tflops * 1e12 / self.peak
        record.update(self.objective.take_metrics(lambda t: acc.reduce(t.clone(), reduction="sum")))
        self.metrics.write(record)
        self.progress.update(state.step, record)
        self.window_tokens, self.window_rows, self.window_start = 0, 0, now

    @torch.no_grad()
    def evaluate(self, log_as_step: int | None = None) -> dict[str, float]:
        """Every eval set's mean loss per target (logged at ``log_as_step``): the one set's as
        ``eval_loss``; named sets' as ``eval_<name>_loss``, the first also as ``eval_loss``, and,
        once the base model's is known, as a ratio of it (``eval_<name>_vs_base``: above 1, the
        set got worse than before training, e.g. forgetting on a retain set)."""
        data, metrics = self.recipe.data, {}
        base = self.state.initial_eval_losses or {}
        for name, rows in self.eval_sets.items():
            prefix = data.metric_prefix(name)
            loss = metrics[prefix + "loss"] = self._eval_loss(rows)
            metrics.setdefault("eval_loss", loss)  # the first set is the primary one
            if data.named_eval and log_as_step != 0 and base.get(prefix + "loss"):
                metrics[prefix + "vs_base"] = loss / base[prefix + "loss"]
        if self.recipe.eval.generate is not None:
            metrics.update(self._generation_metrics())
        step = self.state.step if log_as_step is None else log_as_step
        self.metrics.write({"step": step, **metrics})
        if data.named_eval:
            shown = []
            for name in self.eval_sets:
                prefix = data.metric_prefix(name)
                ratio = f" ({metrics[prefix + 'vs_base']:.3f}x base)" if prefix + "vs_base" in metrics else ""
                shown.append(f"{name} {metrics[prefix + 'loss']:.4f}{ratio}")
            self.progress.message(f"step {step}: eval loss {', '.join(shown)}")
        else:
            self.progress.message(f"step {step}: eval loss {metrics['eval_loss']:.4f}")
        return metrics

    def _generation_metrics(self) -> dict[str, float]:
        """eval.generate: each scorer's mean over the set's first rows, generated greedily, the rows
        split across data-parallel ranks (each generates with its whole model)."""
        gen, acc = self.recipe.eval.generate, self.accelerator
        mine = self.generation[self.dp_rank :: self.dims.dp]
        model, failed = acc.unwrap_model(self.model), ""
        scores: dict[str, list[float]] = {}
        try:
            with self.strategy.autocast(acc.device):
                scores = score_generations(model, self.tokenizer, mine, gen.scorers, gen.max_new_tokens)
        except ScorerError as err:
            failed = str(err)
        model.train()
        names = [scorers_metric(s) for s in gen.scorers]
        sums = torch.tensor([sum(scores.get(name, [])) for name in names] + [len(mine), bool(failed)], dtype=torch.float64,
                            device=acc.device)
        sums = acc.reduce(sums, "sum")  # every rank, also one whose scorer failed: no rank waits for another forever
        if sums[-1] > 0:
            raise ScorerError(failed or "eval.generate: a scorer failed in another process (its log names it)")
        prefix = self.recipe.data.metric_prefix(gen.set)
        return {prefix + name: (sums[i] / sums[-2].clamp(min=1)).item() for i, name in enumerate(names)}

    def _eval_loss(self, eval_set) -> float:
        """Mean loss per target over ``eval_set``, rows split across ranks."""
        acc, model, batch_size = self.accelerator, self.model, self.cfg.micro_batch_size
        model.eval()
        rows = list(range(len(eval_set)))
        batches = [rows[i : i + batch_size] for i in range(0, len(rows), batch_size)]
        loss_sum = torch.zeros((), device=acc.device)
        targets = torch.zeros((), device=acc.device, dtype=torch.long)
        for r in range(math.ceil(len(batches) / self.dims.dp)):
            index = r * self.dims.dp + self.dp_rank
            # Every rank runs the same number of forwards (sharded models need all ranks); extra ones count zero.
            batch = self.objective.collate([eval_set[i] for i in batches[min(index, len(batches) - 1)]]).to(acc.device)
            with self.strategy.autocast(acc.device):
                loss = self.objective.loss_sum(model, batch, training=False)
            if index < len(batches):
                loss_sum += loss.float()
                targets += self.objective.targets(batch)
        model.train()
        return (acc.reduce(loss_sum, "sum") / acc.reduce(targets, "sum").clamp(min=1)).item()

    def judge(self, metrics: dict[str, float]) -> early_stopping.Verdict:
        """``train.early_stopping``'s verdict on this evaluation (the same on every rank)."""
        verdict = early_stopping.judge(self.cfg.early_stopping, self.state, metrics)
        state = self.state
        if verdict.stop:
            section = self.cfg.early_stopping
            self.progress.message(f"step {state.step}: {section.metric} has not improved for {section.patience} evaluations; "
                                  f"stopping early (best {state.best_metric:.4f} at step {state.best_step})")
        if self._pruned(metrics) and not verdict.stop:
            state.pruned = True
            self.progress.message(f"step {state.step}: the sweep's pruner stopped this trial (its metric is behind "
                                  "the other trials' at this step)")
            verdict = early_stopping.Verdict(improved=verdict.improved, stop=True)
        return verdict

    def _pruned(self, metrics: dict[str, float]) -> bool:
        """A sweep trial: report this evaluation to the study (main process) and share its pruner's
        answer with every rank; a failure is shared too, so no rank waits for another forever."""
        if not self.in_sweep:
            return False
        answer, failed = 0.0, ""
        if self.trial is not None:
            try:
                answer = float(self.trial.report(self.state.step, metrics))
            except UserError as err:
                failed = str(err)
        answers = self.accelerator.reduce(torch.tensor([answer, float(bool(failed))], device=self.accelerator.device), "sum")
        if answers[1] > 0:
            raise UserError(failed or "sweep: reporting the evaluation failed in the main process (its log names why)")
        return bool(answers[0] > 0)

    def save_due(self) -> bool:
        """``train.save_minutes`` of training time have passed since the last checkpoint (or the start):
        without ``save_steps``, a crash then loses at most that much."""
        minutes = self.cfg.save_minutes
        return bool(minutes) and not self.cfg.save_steps and time.perf_counter() - self.last_save >= 60 * minutes

    def save(self, best: bool = False) -> Path:
        """A checkpoint of the run as it is now (every rank calls it); ``best``: also checkpoints/best."""
        self.last_save = time.perf_counter()
        self.state.data = self.stream.state() if self.stream else None
        path = save_checkpoint(self.accelerator, self.model, self.tokenizer, self.optimizer, self.scheduler, self.run.root,
                               self.state, self.strategy, self.recipe.output.keep_last, self.recipe.to_yaml(), best=best)
        self.summary.checkpoint = str(path)
        return path

    def stop(self, reason: str) -> None:
        """Record a stop by signal (after the checkpoint that continues it was saved)."""
        self.summary.stopped = reason
        if self.main:
            self.run.write_stopped(reason, self.state.step, self.summary.checkpoint)
        self.progress.message(f"stopped by {reason} at step {self.state.step}; checkpoint {self.summary.checkpoint}; run again to resume")

    def finish(self) -> RunSummary:
        """Close metrics, draw loss.png and print the summary; release the process group."""
        self.progress.close()
        self.metrics.close()
        summary = self.summary
        summary.steps, summary.elapsed_s = self.state.step, time.perf_counter() - self.start
        summary.initial_eval_loss, summary.final_eval_loss = self.state.initial_eval_loss, self.state.final_eval_loss
        summary.early_stopped, summary.best_metric = self.state.early_stopped, self.state.best_metric
        summary.pruned = self.state.pruned
        best = self.run.best_checkpoint() if self.cfg.early_stopping else None
        summary.best_checkpoint = str(best) if best else None
        done = summary.steps >= summary.total_steps or self.state.finished_early
        if done and summary.resumed_from and summary.final_train_loss is None:
            self.progress.message(f"{self.run.root} is already complete ({summary.steps} steps"
                                  + (", pruned)" if summary.pruned else ", stopped early)" if summary.early_stopped else ")"))
        elif self.main:
            records = read_metrics(self.metrics.path)
            plot_losses(records, self.run.loss_plot, title=self.recipe.output.run_name or self.run.root.name)
            console.print(summary_table(records, summary))
        self.accelerator.end_training()
        return summary


def apply_kernels(recipe: Recipe, model: torch.nn.Module, strategy: strategies.Strategy, device: torch.device) -> Callable | None:
    """Swap in the recipe's kernels (see kernels/patch.py); returns the fused loss when it is used."""
    if recipe.kernels == "none":
        return None
    from ftl.kernels.patch import FusedLoss, KernelError, apply, backend_for, supported

    backend = backend_for(device)
    names = supported(model, backend) if recipe.kernels == "auto" else list(recipe.kernels)
    if "fused_ce" in names and not strategy.uses_fused_ce():
        log.info("kernels auto: fused_ce not used under %s (lm_head is sharded outside its forward)", strategy.name)
        names.remove("fused_ce")
    try:
        applied = apply(model, names, backend)
    except KernelError as err:
        raise TrainError(str(err)) from None
    log.info("kernels: %s (%s)", ", ".join(applied) or "none apply", backend)
    return FusedLoss(model, backend=backend) if "fused_ce" in applied else None
