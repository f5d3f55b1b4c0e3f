"""The training loop: one flow for every method, read top to bottom.

Run as ``ftl train RECIPE`` or ``python -m ftl.train RECIPE [key=value ...]``, also under an
``accelerate launch`` that the user starts by hand. Each optimizer step gathers its micro-batches
first, counts their trainable tokens across all ranks, and scales every micro-batch's summed loss
by that count, so the update equals the one of a single batch of the same rows.
"""

from __future__ import annotations

import json
import logging
import math
import os
import sys
import time
from pathlib import Path
from typing import Any, Callable

import torch
from accelerate import Accelerator
from accelerate.state import AcceleratorState
from accelerate.utils import set_seed
from transformers import get_scheduler

from ftl.checkpoint import find_resumable, load_training_state, read_state, restore_rng, save_checkpoint, verify
from ftl.config import Recipe, load_recipe, uses_fused_ce
from ftl.console import console, setup_logging
from ftl import distributed, strategies
from ftl.data import batch_indices, build_dataset, collate, load_source
from ftl.errors import UserError, exit_on_user_error, first_line
from ftl.flops import flops_counter, peak_flops, peak_memory_gib
from ftl.loss import causal_lm_loss_sum, count_trainable_tokens
from ftl.metrics import MetricsWriter, TrainingProgress, plot_losses, read_metrics, summary_table
from ftl.model import build_model
from ftl.optim import build_optimizer
from ftl.plan import make_plan
from ftl.preprocess import prepare as prepare_data
from ftl.rundir import RunDir
from ftl.signals import EXIT_STOPPED, StopRequest
from ftl.streaming import RowStream

log = logging.getLogger(__name__)



class TrainError(UserError):
    """The run cannot start as the recipe asks (run directory, data size)."""


def train(recipe: Recipe) -> dict[str, Any]:
    """Train as the recipe says; returns a summary (losses, steps, checkpoint, why it stopped)."""
    recipe = recipe.resolved()
    cfg = recipe.train
    plan = make_plan(recipe)
    strategy = strategies.for_plan(plan)
    accelerator = distributed.build_accelerator(recipe, plan)
    distributed.check_process_group(accelerator, plan)
    run_dir = Path(recipe.output.dir)
    run = RunDir(run_dir)
    main = accelerator.is_main_process
    checkpoint = _resume_point(recipe, run_dir)
    _check_run_dir(run_dir, recipe, checkpoint)
    set_seed(cfg.seed)

    # Fail on missing data before spending minutes loading a model.
    for source in recipe.data.train + (recipe.data.eval or []):
        if main:
            load_source(source, streaming=recipe.data.streaming)

    model, tokenizer = build_model(recipe)
    rank, world = accelerator.process_index, accelerator.num_processes
    accum = cfg.gradient_accumulation_steps
    if recipe.data.streaming:  # rows come from a RowStream (below); only eval data is loaded now
        train_set, data_stats = None, {"streaming": True}
        eval_set = build_dataset(recipe.data.eval, tokenizer, recipe.data) if recipe.data.eval else None
        total_steps = cfg.max_steps
    else:
        # Rank 0 tokenizes (or finds the cache); the others wait, then read its cache.
        with accelerator.main_process_first():
            train_set, eval_set, data_stats = prepare_data(recipe, tokenizer)
        batches_per_epoch = len(batch_indices(len(train_set), cfg.micro_batch_size, cfg.seed, 0, rank, world))
        if batches_per_epoch == 0:
            raise TrainError(
                f"data.train: {len(train_set)} rows make no micro-batch for each of {world} processes; "
                "lower train.micro_batch_size or add data"
            )
        total_steps = cfg.max_steps or math.ceil(cfg.epochs * math.ceil(batches_per_epoch / accum))
    # Model, tokenizer, data and checkpoint have all been checked: only now may the run directory change.
    if main:
        run.prepare(recipe.to_yaml(), cfg.resume, recipe.output.overwrite, checkpoint,
                    read_state(checkpoint)["step"] if checkpoint is not None else None)
        run.write(run.data_stats, json.dumps(data_stats, indent=2))
    accelerator.wait_for_everyone()
    warmup = cfg.warmup_steps if cfg.warmup_steps is not None else math.ceil(cfg.warmup_ratio * total_steps)

    fused = _apply_kernels(recipe, model, plan, accelerator.device)
    model = strategy.shard(model, recipe, accelerator.device)
    optimizer = build_optimizer(model, cfg, cpu_adam=recipe.distributed.zero.offload_optimizer and strategy.zero_stage is not None)
    model, optimizer = strategy.prepare(accelerator, model, optimizer)
    # On the wrapped optimizer (ZeRO regroups parameters), not prepared: Accelerate would step it once per process.
    scheduler = get_scheduler(cfg.lr_scheduler, optimizer, num_warmup_steps=warmup, num_training_steps=total_steps)

    # Position of the next micro-batch: (epoch, index into that epoch's micro-batches).
    step, epoch, position = 0, 0, 0
    resumed: dict[str, Any] = {}
    if checkpoint is not None:
        resumed = load_training_state(checkpoint, accelerator, model, optimizer, scheduler, strategy)
        step, epoch, position = resumed["step"], resumed["epoch"], resumed["position"]
    stream = RowStream(recipe, tokenizer, rank, world, **resumed.get("_data", {})) if recipe.data.streaming else None

    out = recipe.output
    metrics = MetricsWriter(run_dir, enabled=main, report_to=out.report_to, resume_step=step, config=recipe.model_dump(mode="json"),
                            wandb_project=out.wandb_project, run_name=out.run_name)
    progress = TrainingProgress(total_steps, enabled=main)
    summary: dict[str, Any] = {"total_steps": total_steps, "resumed_from": str(checkpoint) if checkpoint else None}
    if checkpoint is not None:
        progress.message(f"resuming from {checkpoint} (step {step} of {total_steps})")
        summary.update({k: resumed[k] for k in ("initial_eval_loss", "final_eval_loss") if resumed.get(k) is not None})
    else:
        progress.message(
            (f"packed {data_stats['examples']} examples into {len(train_set)} rows of {recipe.data.max_length} tokens "
             f"({data_stats['packing_efficiency']:.1%} filled); " if recipe.data.packing else "") +
            f"training {total_steps} steps: {len(train_set) if train_set else 'streamed'} rows, {world} process(es) ({plan.strategy}), micro-batch "
            f"{cfg.micro_batch_size} x accumulation {accum} x {world} = {cfg.micro_batch_size * accum * world} rows/step"
        )
        if eval_set is not None:
            summary["initial_eval_loss"] = _evaluate(model, eval_set, tokenizer, cfg.micro_batch_size, accelerator)
            metrics.write({"step": 0, "eval_loss": summary["initial_eval_loss"]})
            progress.message(f"step 0: eval loss {summary['initial_eval_loss']:.4f}")

    def save() -> Path:
        state = {
            "step": step, "epoch": epoch, "position": position, "total_steps": total_steps,
            "method": recipe.method.type, "bits": recipe.quantization.bits,
            "initial_eval_loss": summary.get("initial_eval_loss"), "final_eval_loss": summary.get("final_eval_loss"),
        }
        path = save_checkpoint(accelerator, model, tokenizer, optimizer, scheduler, run_dir, state, strategy, recipe.output.keep_last,
                               data_state=stream.state() if stream else None)
        summary["checkpoint"] = str(path)
        return path

    if checkpoint is not None:
        summary["checkpoint"] = str(checkpoint)
        restore_rng(resumed["_rng"])  # last, so nothing above draws from the restored streams
    start = time.perf_counter()
    window_tokens, window_rows, window_start = 0, 0, time.perf_counter()
    peak, flops_per_token = peak_flops(cfg.peak_tflops), flops_counter(accelerator.unwrap_model(model))
    with StopRequest() as stop:
        while step < total_steps:
            if stream is not None:
                micro = [collate(stream.next_rows(cfg.micro_batch_size), tokenizer.pad_token_id) for _ in range(accum)]
                epoch, batches = stream.epoch, None
            else:
                batches = batch_indices(len(train_set), cfg.micro_batch_size, cfg.seed, epoch, rank, world)
                if position >= len(batches):
                    epoch, position = epoch + 1, 0
                    continue
                micro = [collate([train_set[i] for i in idx], tokenizer.pad_token_id) for idx in batches[position : position + accum]]
            micro = [{k: v.to(accelerator.device) for k, v in mb.items()} for mb in micro]
            step_loss, step_tokens, grad_norm, stepped = _optimizer_step(accelerator, strategy, model, optimizer, micro, cfg.max_grad_norm, fused)
            if not stepped:
                path = save()  # the weights from before the step that was not taken
                raise TrainError(
                    f"step {step + 1}: the loss ({step_loss:.4g}) or gradient norm ({grad_norm:.4g}) is not finite, so the "
                    f"step was not taken and training stopped; {path} holds the weights from before it. Lower "
                    "train.learning_rate, keep train.max_grad_norm set, or check the data"
                )
            scheduler.step()
            step += 1
            position += len(micro)

            real = sum(mb["token_mask" if "token_mask" in mb else "attention_mask"].sum() for mb in micro)
            window_tokens += int(accelerator.reduce(real, "sum"))
            window_rows += len(micro) * micro[0]["input_ids"].shape[0] * world
            if step % cfg.logging_steps == 0 or step == total_steps:
                now = time.perf_counter()
                record = {
                    "step": step,
                    "epoch": round(epoch + position / len(batches), 4) if batches else epoch,
                    "loss": step_loss,
                    "lr": scheduler.get_last_lr()[0],
                    "grad_norm": grad_norm,
                    "trainable_tokens": step_tokens,
                    "tokens_per_s": window_tokens / max(now - window_start, 1e-9),
                    "elapsed_s": now - start,
                    "eta_s": (now - start) / max(step - (resumed.get("step") or 0), 1) * (total_steps - step),
                    "peak_memory_gib": accelerator.reduce(torch.tensor(peak_memory_gib(), device=accelerator.device), "max").item(),
                }
                # Model FLOPs per device (see ftl.flops); MFU where the device's peak is known.
                tflops = flops_per_token(window_tokens / max(window_rows, 1)) * record["tokens_per_s"] / world / 1e12
                record["tflops_per_device"] = tflops
                if peak:
                    record["mfu"] = tflops * 1e12 / peak
                metrics.write(record)
                progress.update(step, record)
                window_tokens, window_rows, window_start = 0, 0, now
            summary["final_train_loss"] = step_loss

            if eval_set is not None and ((cfg.eval_steps and step % cfg.eval_steps == 0) or step == total_steps):
                eval_loss = _evaluate(model, eval_set, tokenizer, cfg.micro_batch_size, accelerator)
                metrics.write({"step": step, "eval_loss": eval_loss})
                progress.message(f"step {step}: eval loss {eval_loss:.4f}")
                summary["final_eval_loss"] = eval_loss
            reason = stop.agreed(accelerator)
            if (cfg.save_steps and step % cfg.save_steps == 0) or step == total_steps or reason:
                save()
            if reason and step < total_steps:
                summary["stopped"] = reason
                if main:
                    run.write_stopped(reason, step, summary["checkpoint"])
                progress.message(f"stopped by {reason} at step {step}; checkpoint {summary['checkpoint']}; run again to resume")
                break

    progress.close()
    metrics.close()
    summary["steps"] = step
    summary["elapsed_s"] = time.perf_counter() - start
    if step >= total_steps and checkpoint is not None and "final_train_loss" not in summary:
        progress.message(f"{run_dir} is already complete ({step} steps)")
    elif main:
        records = read_metrics(metrics.path)
        plot_losses(records, run.loss_plot)
        console.print(summary_table(records, summary))
    accelerator.end_training()
    if world == 1:
        # Accelerate keeps its state in a process-wide singleton; a second run in this process
        # (the demo, tests, notebooks) may ask for another mixed precision.
        AcceleratorState._reset_state(reset_partial_state=True)
    return summary


def preflight(recipe: Recipe) -> None:
    """What can be checked before processes are started: resume point, run directory, tokenizer,
    model config and the data (tokenized into the cache the ranks then read).

    A problem found by one rank of many surfaces as the other ranks' communication errors; found
    here, it is one line and exit code 2, and the earlier run's files are untouched.
    """
    from transformers import AutoConfig

    from ftl.model import LOAD_ERRORS, ModelError, load_tokenizer

    recipe = recipe.resolved()
    run_dir = Path(recipe.output.dir)
    _check_run_dir(run_dir, recipe, _resume_point(recipe, run_dir))
    tokenizer = load_tokenizer(recipe.model)
    try:
        AutoConfig.from_pretrained(recipe.model.path, trust_remote_code=recipe.model.trust_remote_code)
    except LOAD_ERRORS as err:
        raise ModelError(f"model.path: no model config in '{recipe.model.path}': {first_line(err)}") from None
    if recipe.data.streaming:
        for source in recipe.data.train + (recipe.data.eval or []):
            load_source(source, streaming=True)
    else:
        prepare_data(recipe, tokenizer)


def _optimizer_step(
    accelerator: Accelerator, strategy: strategies.Single, model: torch.nn.Module, optimizer: Any, micro: list[dict],
    max_grad_norm: float | None, fused: Callable | None = None,
) -> tuple[float, int, float, bool]:
    """One optimizer step over ``micro``; returns (loss per trainable token, trainable tokens, grad norm,
    whether the step was taken: not when the loss or the gradient norm is not finite)."""
    world = accelerator.num_processes
    local_tokens = sum(count_trainable_tokens(mb["labels"]) for mb in micro)
    step_tokens = accelerator.reduce(local_tokens.clone(), reduction="sum").clamp(min=1)
    loss_sum = torch.zeros((), device=accelerator.device)
    model.train()
    for k, mb in enumerate(micro):
        last = k == len(micro) - 1
        with strategy.gradient_sync(accelerator, model, sync=last):
            with accelerator.autocast():
                loss = causal_lm_loss_sum(model, mb, fused)
            # Every strategy averages gradients over ranks; multiplying by world turns that into a sum.
            strategy.backward(accelerator, model, loss * world / step_tokens, last)
        loss_sum += loss.detach().float()
    step_loss = (accelerator.reduce(loss_sum, reduction="sum") / step_tokens).item()  # the same on every rank
    if not math.isfinite(step_loss):
        strategy.discard_gradients(model, optimizer)
        return step_loss, int(step_tokens), float("nan"), False
    grad_norm, stepped = strategy.optimizer_step(accelerator, model, optimizer, max_grad_norm)
    return step_loss, int(step_tokens), grad_norm, stepped


def _resume_point(recipe: Recipe, run_dir: Path) -> Path | None:
    """The checkpoint to continue from, as ``train.resume`` says, checked against the recipe."""
    mode = recipe.train.resume
    if mode == "never":
        return None
    if mode == "auto":
        checkpoint = find_resumable(run_dir)
    else:
        checkpoint = Path(mode).expanduser()
        if not checkpoint.is_dir():
            raise TrainError(f"train.resume: {checkpoint} is not a checkpoint directory (or use auto / never)")
        verify(checkpoint)
    if checkpoint is not None:
        _check_same_method(checkpoint, recipe)
    return checkpoint


def _check_same_method(checkpoint: Path, recipe: Recipe) -> None:
    """A checkpoint continues only the training it came from (method, quantization, LoRA rank)."""
    state = read_state(checkpoint)
    saved = {"method.type": state.get("method", recipe.method.type), "quantization.bits": state.get("bits", recipe.quantization.bits)}
    adapter_file = checkpoint / "adapter_config.json"
    if adapter_file.is_file() and recipe.method.type != "full":
        try:
            saved["method.lora.r"] = json.loads(adapter_file.read_bytes()).get("r", recipe.method.lora.r)
        except (ValueError, AttributeError):
            raise TrainError(f"{adapter_file}: not a readable adapter config; resume from another checkpoint") from None
    wanted = {"method.type": recipe.method.type, "quantization.bits": recipe.quantization.bits, "method.lora.r": recipe.method.lora.r}
    for key, value in saved.items():
        if value != wanted[key]:
            raise TrainError(f"{key}: is {wanted[key]} but {checkpoint} was trained with {value}; resume with the same "
                             "setting, or start a new run (another output.dir, or train.resume=never with output.overwrite=true)")


def _check_run_dir(run_dir: Path, recipe: Recipe, checkpoint: Path | None) -> None:
    """Refuse, before anything is loaded, a fresh start in a run directory that holds checkpoints."""
    ckpts = RunDir(run_dir).checkpoints
    if checkpoint is None and recipe.train.resume == "never" and not recipe.output.overwrite and ckpts.is_dir() and any(ckpts.iterdir()):
        raise TrainError(
            f"output.dir: {run_dir} already holds checkpoints of an earlier run; use train.resume=auto to "
            "continue it, another output.dir, or output.overwrite=true to replace them"
        )


def _apply_kernels(recipe: Recipe, model: torch.nn.Module, plan: Any, device: torch.device) -> Callable | None:
    """Swap in the recipe's kernels (see kernels/patch.py); returns the fused loss when it is used."""
    if recipe.kernels == "none":
        return None
    from ftl.kernels.patch import FusedLoss, KernelError, apply, backend_for, supported

    names = supported(model) if recipe.kernels == "auto" else list(recipe.kernels)
    if "fused_ce" in names and not uses_fused_ce(recipe.kernels, plan.strategy):
        log.info("kernels auto: fused_ce not used under %s (lm_head is sharded outside its forward)", plan.strategy)
        names.remove("fused_ce")
    backend = backend_for(device)
    try:
        applied = apply(model, names, backend)
    except KernelError as err:
        raise TrainError(str(err)) from None
    log.info("kernels: %s (%s)", ", ".join(applied) or "none apply", backend)
    return FusedLoss(model, backend=backend) if "fused_ce" in applied else None


@torch.no_grad()
def _evaluate(model: torch.nn.Module, dataset: Any, tokenizer: Any, batch_size: int, accelerator: Accelerator) -> float:
    """Token-weighted mean loss over the whole eval set, rows split across ranks."""
    model.eval()
    rank, world = accelerator.process_index, accelerator.num_processes
    rows = list(range(len(dataset)))
    batches = [rows[i : i + batch_size] for i in range(0, len(rows), batch_size)]
    rounds = math.ceil(len(batches) / world)
    loss_sum = torch.zeros((), device=accelerator.device)
    tokens = torch.zeros((), device=accelerator.device, dtype=torch.long)
    for r in range(rounds):
        index = r * world + rank
        # Every rank runs the same number of forwards (sharded models need all ranks); extra ones count zero.
        batch = collate([dataset[i] for i in batches[min(index, len(batches) - 1)]], tokenizer.pad_token_id)
        batch = {k: v.to(accelerator.device) for k, v in batch.items()}
        with accelerator.autocast():
            loss = causal_lm_loss_sum(model, batch)
        if index < len(batches):
            loss_sum += loss.float()
            tokens += count_trainable_tokens(batch["labels"])
    total = accelerator.reduce(loss_sum, "sum") / accelerator.reduce(tokens, "sum").clamp(min=1)
    model.train()
    return total.item()


def main(argv: list[str] | None = None) -> dict[str, Any]:
    """Entry point for ``python -m ftl.train RECIPE [key=value ...]``."""
    args = sys.argv[1:] if argv is None else argv
    if not args or args[0] in ("-h", "--help"):
        print("usage: python -m ftl.train RECIPE [key.sub=value ...]")
        sys.exit(0 if args else 2)
    setup_logging(rank=int(os.environ.get("RANK", os.environ.get("LOCAL_RANK", "0"))))

    summary = exit_on_user_error(lambda: train(load_recipe(args[0], args[1:])))
    if summary.get("stopped"):
        # Under `ftl train` the launcher reports the stop (75); torchrun's agent would call
        # a non-zero exit a failure and print a traceback for it.
        sys.exit(0 if os.environ.get("FTL_LAUNCHED") else EXIT_STOPPED)
    return summary


if __name__ == "__main__":
    main()
