"""``ftl``: the command line. Each subcommand is a thin shell over one module.

Arguments containing ``=`` after the recipe are overrides (``train.learning_rate=1e-4``), applied
before validation, exactly as ``python -m ftl.train`` applies them.
"""

from __future__ import annotations

import argparse
import os
import shlex
import signal
import sys
from pathlib import Path
from typing import Any

from rich.markup import escape

from ftl.console import console, console_err, setup_logging
from ftl.errors import UserError, exit_on_user_error


def _split(items: list[str]) -> tuple[list[str], list[str]]:
    files = [i for i in items if "=" not in i]
    overrides = [i for i in items if "=" in i]
    return files, overrides


def _one_recipe(args: argparse.Namespace, command: str):
    """The single recipe a command names, with its overrides applied, paths resolved."""
    from ftl.recipe.load import load_recipe

    files, overrides = _split(args.items)
    if len(files) != 1:
        raise UserError(f"ftl {command}: name exactly one recipe file (overrides look like key.sub=value)")
    return load_recipe(files[0], overrides).resolved()


def cmd_validate(args: argparse.Namespace) -> int:
    from ftl.recipe.schema import RecipeError
    from ftl.recipe.load import load_recipe

    files, overrides = _split(args.items)
    if not files:
        raise UserError("ftl validate: name at least one recipe file")
    problems: list[str] = []
    for path in files:
        try:
            recipe = load_recipe(path, overrides, check_files=not args.no_check_files)
        except RecipeError as err:
            problems += err.problems
            continue
        if len(files) == 1 and not args.quiet:
            console.print(_shown(recipe, args.full), end="", highlight=False, markup=False)
        console.print(f"[green]ok[/] {escape(str(path))}", markup=True)
    if problems:
        raise RecipeError(problems)
    return 0


def _shown(recipe: Any, full: bool) -> str:
    """What ``ftl validate`` prints: the fields the recipe sets (or implies), resolved (absolute paths),
    and what each ``auto`` became on this machine; with ``full``, every field and default."""
    import yaml
    from pydantic import BaseModel

    from ftl.distributed.plan import local_device

    resolved = recipe.resolved().for_device(local_device())
    everything = resolved.model_dump(mode="json")

    def set_fields(model: BaseModel, dumped: dict) -> dict:
        out = {}
        for name in [n for n in type(model).model_fields if full or n in model.model_fields_set]:  # (in schema order)
            value = getattr(model, name)
            if isinstance(value, BaseModel):
                out[name] = set_fields(value, dumped[name])
            elif isinstance(value, list) and value and isinstance(value[0], BaseModel):
                out[name] = [set_fields(v, d) for v, d in zip(value, dumped[name])]
            else:
                out[name] = dumped[name]
        return out

    def autos(given: Any, became: Any, key: str) -> list[str]:
        if isinstance(given, dict):
            return [line for k in given for line in autos(given[k], became.get(k) if isinstance(became, dict) else None, f"{key}{k}.")]
        return [f"# {key[:-1]}: auto -> {became}"] if given == "auto" and became != "auto" else []

    text = yaml.safe_dump(set_fields(recipe, everything), sort_keys=False)
    notes = autos(recipe.model_dump(mode="json"), everything, "")
    return text + "".join(f"{line}\n" for line in notes) + ("" if full else "# (defaults not shown: ftl validate --full)\n")


def _stop_before_training() -> None:
    """A stop signal before training has begun (Slurm's warning, a preemption; imports alone take
    seconds) leaves nothing to save: exit as "stopped" (75) so that a job is requeued. Installed
    first thing in :func:`main`; training and the launcher install their own handlers later."""
    from ftl.training.signals import EXIT_STOPPED, STOP_SIGNALS

    def stop(signum: int, frame: object) -> None:
        # os._exit: a SystemExit raised inside an import or a library's cleanup could be swallowed.
        sys.stderr.write(f"ftl: {signal.Signals(signum).name} before training began; exiting as stopped ({EXIT_STOPPED})\n")
        sys.stderr.flush()
        os._exit(EXIT_STOPPED)

    for sig in STOP_SIGNALS:
        signal.signal(sig, stop)


def cmd_train(args: argparse.Namespace) -> int:
    from ftl.distributed.launch import train_or_launch
    from ftl.distributed.plan import local_device

    recipe = _one_recipe(args, "train").for_device(local_device())
    if args.allow_changed:
        from ftl.recipe.load import with_values

        recipe = with_values(recipe, {"train.allow_changed": sorted({*recipe.train.allow_changed, *args.allow_changed})})
    code, summary = train_or_launch(recipe)
    if summary is not None and code == 0:
        console.print(f"[green]done[/]: {summary.steps} steps in {summary.elapsed_s:.1f}s, checkpoint {escape(str(summary.checkpoint))}", markup=True)
    return code


def cmd_plan(args: argparse.Namespace) -> int:
    import json

    from rich.table import Table

    from ftl.planning.memory import fit_recipe, largest_fit, model_shape
    from ftl.distributed.plan import local_device, make_plan

    device = args.device or local_device()
    recipe = _one_recipe(args, "plan").for_device(device)
    memory, gpu_gib, unavailable = None, None, None
    try:
        recipe, memory, gpu_gib = fit_recipe(recipe, args.gpu_mem)
    except UserError as err:
        if args.gpu_mem or recipe.distributed.gpu_memory or args.measure:
            raise
        unavailable = str(err)  # the plan itself does not need the model's shape
    plan = make_plan(recipe, device=device)
    train = recipe.train
    batch = {"micro_batch_size": train.micro_batch_size, "gradient_accumulation_steps": train.gradient_accumulation_steps,
             "mixed_precision": train.mixed_precision}
    fits = memory.fits(gpu_gib) if gpu_gib else None
    largest = largest_fit(recipe, gpu_gib, model_shape(recipe.model.path)) if gpu_gib else None
    measured = None
    if args.measure:
        from ftl.planning.measure import measure

        measured = measure(recipe)
    # One process trains inside `ftl train` itself and writes no launch/ files.
    command = plan.shell_command() if plan.world_size > 1 else shlex.join(["ftl", "train", *args.items])
    if args.json:
        print(json.dumps({**plan.summary(), **batch, "env": plan.env, "command": command,
                          "accelerate": plan.accelerate, "deepspeed": plan.deepspeed, "offload": recipe.distributed.zero.model_dump(include={"offload_optimizer", "offload_params"}),
                          "memory_gib": memory.table() if memory else None, "memory_unavailable": unavailable,
                          "peak_phase": memory.peak_phase if memory else None, "largest_fit": largest,
                          "gpu_memory_gib": gpu_gib, "fits": fits, "measured": measured}, indent=2))
        return 0
    table = Table(show_header=False, box=None)
    for key, value in {**plan.summary(), **batch}.items():
        table.add_row(key, str(value))
    console.print(table)
    if memory is None:
        console.print(f"\n[yellow]memory estimate unavailable[/]: {escape(unavailable)}", markup=True)
    else:
        console.print("\n[bold]memory per GPU[/] (estimate, GiB; formulas in launcher/planning/memory.py)", markup=True)
        mem = Table(show_header=False, box=None)
        for key, value in memory.table().items():
            mem.add_row(key, f"{value:.2f}")
        console.print(mem)
        if recipe.train.optimizer.startswith("paged_"):
            console.print("paged optimizer states are counted as resident (conservative: under memory pressure "
                          "bitsandbytes pages them to CPU memory)", highlight=False)
    if fits is not None:
        verdict = "[green]fits[/]" if fits else "[red]does not fit[/]"
        console.print(f"{verdict} in {gpu_gib:g} GiB per GPU (reserved estimate, the peak is the {memory.peak_phase} phase)", markup=True)
        console.print(f"largest that fit: micro_batch_size {largest['micro_batch_size']} at data.max_length {recipe.data.max_length}; "
                      f"data.max_length {largest['max_length']} at micro_batch_size {recipe.train.micro_batch_size}", highlight=False)
    if measured is not None:
        ratio = measured["measured_gib"] / measured["estimate_gib"]
        console.print(f"measured peak {measured['measured_gib']:.3f} GiB vs estimate {measured['estimate_gib']:.3f} GiB "
                      f"({ratio:.2f}x; {measured['mode']})", highlight=False)
    if plan.world_size > 1:
        console.print("\n[bold]command[/] (written to the run dir's launch/ by `ftl train`):", markup=True)
    else:
        console.print("\n[bold]command[/] (one process: `ftl train` trains in its own process; no launch/ files):", markup=True)
    console.print(command, highlight=False, soft_wrap=True)
    if plan.deepspeed is not None:
        console.print("\n[bold]deepspeed.json[/]", markup=True)
        console.print_json(data=plan.deepspeed)
    return 0


def best_checkpoint(run_dir: Path) -> Path:
    """``--best``: the checkpoint a run directory's ``checkpoints/best`` names."""
    from ftl.checkpoints.rundir import RunDir

    run = RunDir(run_dir)
    if not run.checkpoints.is_dir():
        raise UserError(f"--best: {run_dir} is not a run directory (no checkpoints/); name the run directory, not a checkpoint")
    best = run.best_checkpoint()
    if best is None:
        raise UserError(f"--best: {run_dir} records no best checkpoint (checkpoints/best); train.early_stopping records one, "
                        "or name a checkpoint directory to export")
    return best


def cmd_lr_find(args: argparse.Namespace) -> int:
    from ftl.distributed.plan import local_device
    from ftl.training.lr_find import lr_find, out_dir_for

    recipe = _one_recipe(args, "lr-find").for_device(local_device())
    out = Path(args.out) if args.out else out_dir_for(recipe)
    result = lr_find(recipe, out, args.start, args.end, args.steps)
    console.print(f"{len(result.lrs)} steps from {result.lrs[0]:.3g} to {result.lrs[-1]:.3g}"
                  + (f" (stopped: {result.stopped})" if result.stopped else ""), highlight=False)
    if result.suggestion is None:
        raise UserError("lr-find: too few steps before the loss diverged to suggest a rate; lower --start or add --steps")
    console.print(f"suggested train.learning_rate: [bold]{result.suggestion:.3g}[/] (steepest fall of the smoothed loss); "
                  f"plot and losses in {escape(str(out))}", markup=True, highlight=False)
    return 0


def cmd_sweep(args: argparse.Namespace) -> int:
    from ftl.sweep.run import prepare, run_local, show_status
    from ftl.sweep.study import Sweep

    files, overrides = _split(args.items)
    if args.status and len(files) == 1 and not overrides and Path(files[0]).is_dir():
        return show_status(Sweep.open(Path(files[0])))
    if len(files) != 2:
        raise UserError("ftl sweep: name a recipe and a sweep file (ftl sweep RECIPE SWEEP.yaml [key=value ...]), "
                        "or a sweep directory with --status")
    sweep = prepare(Path(files[0]), overrides, Path(files[1]), Path(args.dir) if args.dir else None)
    if args.status:
        return show_status(sweep)
    if args.slurm:
        from ftl.sweep.task import submit

        job = submit(sweep, dry_run=args.dry_run)
        if args.dry_run:
            console.print(f"wrote {escape(str(sweep.root / 'slurm'))}/; submit with:", markup=True, soft_wrap=True)
            print(job)
        else:
            console.print(f"submitted sweep array job {job} ({escape(str(sweep.root))}); `ftl sweep {escape(str(sweep.root))} "
                          "--status` shows its trials", markup=True)
            print(job)
        return 0
    return run_local(sweep)


def cmd_export(args: argparse.Namespace) -> int:
    from ftl.recipe.units import parse_size
    from ftl.export.write import ExportError, export

    if args.max_shard_size is not None and parse_size(args.max_shard_size) is None:
        raise UserError(f"--max-shard-size: '{args.max_shard_size}' is not a size; write e.g. 5GB or 500MB")
    updates = {k: v for k, v in {"dtype": args.dtype, "max_shard_size": args.max_shard_size,
                                 "qlora_merge": args.qlora_merge, "gguf": args.gguf}.items() if v is not None}
    if args.no_verify:
        updates["verify"] = False
    def interrupt(signum: int, frame: object) -> None:
        raise KeyboardInterrupt

    source = Path(args.source)
    if args.best:
        source = best_checkpoint(source)
    previous = signal.signal(signal.SIGTERM, interrupt)  # a killed export cleans up as a Ctrl-C'd one does
    try:
        report = export(source, Path(args.out) if args.out else None, adapter_only=args.adapter_only,
                        updates=updates, trust_remote_code=args.trust_remote_code, base=args.base)
    except KeyboardInterrupt:
        console_err.print("ftl export: interrupted; nothing was written at the output directory", highlight=False)
        return 130
    finally:
        signal.signal(signal.SIGTERM, previous)
    if report.get("verified"):
        console.print(
            f"verification ({report['sequences']} sequences, {report['positions']} positions): the float32 merge matches the "
            f"trained model to {report['merge_max_abs_logit_diff']:.3g} max |logit diff| (tolerance {report['merge_tolerance']:.3g}); "
            f"the files {'are' if report['weights_equal_rounded_merge'] else 'are NOT'} that merge rounded to {report['dtype']}, "
            f"which moves logits by up to {report['rounding_max_abs_logit_diff']:.3g} (greedy agreement "
            f"{report['rounding_greedy_agreement']:.1%})", highlight=False)
    if "gguf_max_abs_logit_diff" in report:
        console.print(f"{report['gguf']} ({report['gguf_bytes'] / 2**20:.0f} MiB, llama.cpp's converter) read back by transformers: "
                      f"max |logit diff| {report['gguf_max_abs_logit_diff']:.3g} from the export, greedy agreement "
                      f"{report['gguf_greedy_agreement']:.1%}", highlight=False)
    if not report["passed"]:
        raise ExportError(f"verification failed: the export does not reproduce the trained model; it is kept for inspection at "
                          f"{report['out']} (see verify.json), not at the output directory")
    console.print(f"[green]exported[/] {report.get('mode', 'adapter')} model to {escape(str(report['out']))}", markup=True)
    return 0


def cmd_preprocess(args: argparse.Namespace) -> int:
    from ftl.models.tokenizer import load_tokenizer
    from ftl.data.preprocess import prepare

    recipe = _one_recipe(args, "preprocess")
    train_set, eval_sets, stats = prepare(recipe, load_tokenizer(recipe.model))
    for source in stats["sources"]:
        dropped = ", ".join(f"{n} ({why})" for why, n in source["dropped"].items()) or "none"
        console.print(f"{source['path']}: {source['rows']} rows, {source['truncated']} truncated, dropped {dropped}, {source['used']} used")
    length = stats["length"]
    console.print(f"train: {stats['examples']} examples, {stats['tokens']} tokens ({stats['trainable_tokens']} trainable); "
                  f"length p50 {length['p50']}, p90 {length['p90']}, p99 {length['p99']}, max {length['max']}")
    if "packing_efficiency" in stats:
        console.print(f"packed into {stats['packed_rows']} rows of {recipe.data.max_length}: {stats['packing_efficiency']:.1%} of slots hold real tokens")
    for name, rows in (eval_sets or {"eval": []}).items():
        console.print(f"{'eval' if name == 'eval' else f'eval set {name}'}: {len(rows)} examples", highlight=False)
    if args.show:
        from ftl.data.preprocess import shown_rows

        marked = not console.is_terminal
        console.print("\ntrained tokens " + ("between [[ and ]]" if marked else "in green, the rest dim") + ":", highlight=False)
        for text in shown_rows(train_set, load_tokenizer(recipe.model), args.show, marked):
            console.print(text, highlight=False, markup=False, soft_wrap=True)
    from ftl.checkpoints.rundir import RunDir

    run = RunDir(Path(recipe.output.dir))
    run.root.mkdir(parents=True, exist_ok=True)
    run.write_data_stats(stats)
    console.print(f"cached in {stats['cache']}")
    return 0


def cmd_slurm(args: argparse.Namespace) -> int:
    from ftl.distributed.slurm import render, submit

    from ftl.checkpoints.rundir import RunDir

    recipe = _one_recipe(args, f"slurm {args.action}")
    directory = RunDir(Path(recipe.output.dir)).slurm
    if args.action == "render":
        print(render(recipe, "export" if args.export else "train"), end="")
        console_err.print(f"(render writes nothing: the script reads {directory}/recipe.yaml, which `ftl slurm submit` writes; "
                          "`ftl slurm submit --dry-run` writes it and the script without submitting)", soft_wrap=True)
        return 0
    if args.dry_run:
        commands = submit(recipe, export=args.export, dependency=args.dependency, dry_run=True)
        console.print(f"wrote {directory}/ (recipe.yaml and the script{'s' if args.export else ''}); submit with:", soft_wrap=True)
        print("\n".join(commands))
        return 0
    ids = submit(recipe, export=args.export, dependency=args.dependency)
    console.print(f"submitted training job {ids[0]}" + (f" and export job {ids[1]} (afterok:{ids[0]})" if len(ids) > 1 else ""))
    print(" ".join(ids))
    return 0


def _count(minimum: int, maximum: int | None = None) -> callable:
    """An argparse type: an integer of at least ``minimum`` (and at most ``maximum``; argparse prints
    the one-line error)."""
    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"'{text[:40]}' is not an integer") from None
        if value < minimum:
            raise argparse.ArgumentTypeError(f"must be at least {minimum} (got {value})")
        if maximum is not None and value > maximum:
            raise argparse.ArgumentTypeError(f"must be at most {maximum} (got {text[:40]})")
        return value
    return parse


LOG_LEVELS = ("DEBUG", "INFO", "WARNING", "ERROR")


def _version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("ftl")
    except PackageNotFoundError:
        return "unknown (not installed)"


def _env_log_level() -> str:
    level = os.environ.get("FTL_LOG_LEVEL", "INFO").upper()
    if level not in LOG_LEVELS:
        raise UserError(f"FTL_LOG_LEVEL: '{level[:40]}' is not a log level; use one of {', '.join(LOG_LEVELS)}")
    return level


def build_parser() -> argparse.ArgumentParser:
    from ftl.cli_start import cmd_demo, cmd_demo_data, cmd_init, cmd_tiny_model
    from ftl.cli_try import cmd_chat, cmd_eval, cmd_generate

    parser = argparse.ArgumentParser(prog="ftl", description="Fine-tune LLMs from one YAML recipe. In order of use: "
                                     "validate, preprocess, plan, train, eval, export (and slurm for clusters).")
    parser.add_argument("--version", action="version", version=f"ftl {_version()}")
    parser.add_argument("--log-level", type=str.upper, choices=LOG_LEVELS, default=_env_log_level(),
                        help="how much ftl logs on stderr (default INFO, or $FTL_LOG_LEVEL)")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    p = sub.add_parser("init", help="write a commented starter recipe for a model directory and a data file")
    p.add_argument("model", help="a local model directory (config.json, weights, tokenizer)")
    p.add_argument("data", help="a .jsonl/.json/.parquet/.csv data file (its format is read from the first row)")
    p.add_argument("--method", choices=["lora", "qlora", "full"], default="lora")
    p.add_argument("--out", default="recipe.yaml", help="default recipe.yaml")
    p.add_argument("--force", action="store_true", help="replace --out if it exists")
    p.set_defaults(fn=cmd_init)

    p = sub.add_parser("validate", help="check recipes and print the resolved recipe")
    p.add_argument("items", nargs="+", metavar="RECIPE_OR_OVERRIDE")
    p.add_argument("-q", "--quiet", action="store_true", help="only say ok or print the errors")
    p.add_argument("--full", action="store_true", help="print every field with its default, not only what the recipe sets")
    p.add_argument("--no-check-files", action="store_true",
                   help="check the recipe alone, not that its local model and data paths exist (a recipe for another machine)")
    p.set_defaults(fn=cmd_validate)

    p = sub.add_parser("preprocess", help="tokenize, mix, pack and cache the data once; print its statistics")
    p.add_argument("items", nargs="+", metavar="RECIPE_OR_OVERRIDE")
    p.add_argument("--show", type=_count(1), metavar="N", help="print the first N training rows with their trained tokens marked")
    p.set_defaults(fn=cmd_preprocess)

    p = sub.add_parser("plan", help="print how a recipe runs: strategy, processes, DeepSpeed JSON, launch command")
    p.add_argument("items", nargs="+", metavar="RECIPE_OR_OVERRIDE")
    p.add_argument("--json", action="store_true", help="machine-readable, with the Accelerate config")
    p.add_argument("--device", choices=["cuda", "cpu"], help="plan for this device (default: this machine's)")
    p.add_argument("--measure", action="store_true", help="train 3 steps here (or 1- and 2-layer proxies) and compare peak memory with the estimate")
    p.add_argument("--gpu-mem", help="memory of one GPU, e.g. 80GB (default: distributed.gpu_memory); strategy auto then picks what fits")
    p.set_defaults(fn=cmd_plan)

    p = sub.add_parser("train", help="train a recipe (several processes are started with accelerate launch)",
                       description="Train RECIPE. Any recipe field can be overridden after it as key.sub=value (a YAML "
                       "value), e.g. `ftl train my.yaml train.learning_rate=1e-4 train.max_steps=200`.")
    p.add_argument("items", nargs="+", metavar="RECIPE_OR_OVERRIDE")
    p.add_argument("--allow-changed", action="append", default=[], metavar="FIELD",
                   help="on resume, continue although FIELD (e.g. train.learning_rate) differs from the checkpoint's recipe")
    p.set_defaults(fn=cmd_train)

    p = sub.add_parser("eval", help="exact-match accuracy of a model or checkpoint by greedy generation; on preference data, which response it prefers (a reward model: pairwise accuracy)")
    p.add_argument("model", help="model directory, run directory (its newest checkpoint) or checkpoint (full model or PEFT adapter)")
    p.add_argument("--data", required=True, help="alpaca or chat data file with reference answers")
    p.add_argument("--format", choices=["alpaca", "chat", "sharegpt"],
                   help="default: the format the run trained with, else read from the data's first row")
    p.add_argument("--scorers", help="comma-separated scorers of the greedy completions, as eval.generate's (exact_match, "
                   "contains, json_valid, json_fields, regex:PATTERN, module:function): each one's mean")
    p.add_argument("--max-new-tokens", type=_count(1), default=64, help="with --scorers (default 64, as eval.generate)")
    p.add_argument("--limit", type=_count(1), help="only the first N rows")
    p.add_argument("--trust-remote-code", action="store_true", help="allow a run whose recipe sets model.trust_remote_code to import its model's Python files")
    p.set_defaults(fn=cmd_eval)

    p = sub.add_parser("export", help="merged, sharded safetensors model (or adapter) from a run or checkpoint, verified")
    p.add_argument("source", help="run directory (newest complete checkpoint), checkpoint directory, or a peft adapter "
                   "directory trained elsewhere (adapter_config.json + adapter_model.safetensors)")
    p.add_argument("--best", action="store_true", help="export the run directory's best checkpoint (checkpoints/best, "
                   "recorded by train.early_stopping) instead of its newest")
    p.add_argument("--out", help="output directory (default: export.dir, or <run dir>/export; <adapter>-merged for an adapter)")
    p.add_argument("--base", help="a peft adapter's base model directory (default: its base_model_name_or_path)")
    p.add_argument("--dtype", choices=["bfloat16", "float16", "float32"])
    p.add_argument("--max-shard-size", help="e.g. 5GB, 500MB")
    p.add_argument("--qlora-merge", choices=["dequantized", "original"])
    p.add_argument("--adapter-only", action="store_true", help="write the PEFT adapter directory instead")
    p.add_argument("--gguf", nargs="?", const="f16", choices=["f32", "f16", "bf16", "q8_0"],
                   help="also write a GGUF file (default type f16) with llama.cpp's converter, read back and compared")
    p.add_argument("--no-verify", action="store_true", help="skip reloading and comparing logits (very large models)")
    p.add_argument("--trust-remote-code", action="store_true", help="allow a run whose recipe sets model.trust_remote_code to import its model's Python files")
    p.set_defaults(fn=cmd_export)

    for name, doc in (("chat", "talk with a run, checkpoint or export (one message per line, with the trained template)"),
                      ("generate", "replies of a run, checkpoint or export to --prompt texts or a data file's prompts, as JSON lines")):
        p = sub.add_parser(name, help=doc)
        p.add_argument("model", help="run directory (its newest checkpoint), checkpoint or exported model directory")
        p.add_argument("--max-new-tokens", type=_count(1), default=256)
        p.add_argument("--temperature", type=float, default=0.0, help="0: greedy (default)")
        p.add_argument("--trust-remote-code", action="store_true", help="allow a run whose recipe sets model.trust_remote_code")
        if name == "chat":
            p.add_argument("--system", help="a system message to start the conversation with")
            p.set_defaults(fn=cmd_chat)
        else:
            p.add_argument("--prompt", action="append", help="a user message (repeatable)")
            p.add_argument("--data", help="alpaca, chat or sharegpt file: its rows' prompts (the conversation before the last reply)")
            p.add_argument("--limit", type=_count(1), help="only the first N rows of --data")
            p.set_defaults(fn=cmd_generate)

    p = sub.add_parser("lr-find", help="learning-rate range test: a short sweep of growing rates on the recipe's model "
                       "and data; a plot, the losses and a suggested train.learning_rate (the run directory is not touched)")
    p.add_argument("items", nargs="+", metavar="RECIPE_OR_OVERRIDE")
    p.add_argument("--start", type=float, default=1e-7, help="first learning rate (default 1e-7)")
    p.add_argument("--end", type=float, default=1.0, help="last learning rate (default 1)")
    p.add_argument("--steps", type=int, default=100, help="optimizer steps of the sweep (default 100)")
    p.add_argument("--out", help="directory for lr_find.png and lr_find.json (default <output.dir>-lr-find)")
    p.set_defaults(fn=cmd_lr_find)

    p = sub.add_parser("sweep", help="hyperparameter sweep with Optuna: trials of the recipe with the sweep file's keys "
                       "varied, pruned on their eval metric, here or as a Slurm job array; the best trial's recipe as YAML",
                       description="ftl sweep RECIPE SWEEP.yaml [key=value ...]: trials one after another here (run it again "
                       "to resume an interrupted sweep), or --slurm as a job array. ftl sweep DIR --status: the trials table.")
    p.add_argument("items", nargs="+", metavar="RECIPE_SWEEP_OR_OVERRIDE")
    p.add_argument("--dir", help="the sweep directory (default <output.dir>-sweep): study.db, trials/, best.yaml")
    p.add_argument("--slurm", action="store_true", help="submit the trials as a Slurm job array (the recipe's slurm section "
                   "for each task; sweep file's parallel tasks at once); a requeued task resumes its trial")
    p.add_argument("--dry-run", action="store_true", help="with --slurm: write the array script, print the sbatch command")
    p.add_argument("--status", action="store_true", help="print the trials table and the best trial; run nothing")
    p.set_defaults(fn=cmd_sweep)

    p = sub.add_parser("slurm", help="render or submit the recipe as a (multi-node) Slurm job")
    p.add_argument("action", choices=["render", "submit"])
    p.add_argument("items", nargs="+", metavar="RECIPE_OR_OVERRIDE")
    p.add_argument("--export", action="store_true", help="render: the export script; submit: also an export job that runs afterok")
    p.add_argument("--dependency", help="sbatch --dependency for the training job, e.g. afterok:123")
    p.add_argument("--dry-run", action="store_true", help="submit: write the scripts and the job's recipe, print the sbatch commands, submit nothing")
    p.set_defaults(fn=cmd_slurm)

    p = sub.add_parser("demo", help="fine-tune the real SmolLM2-135M-Instruct with LoRA, export it, and compare held-out accuracy")
    p.add_argument("--tiny", action="store_true", help="a tiny random Llama instead (no artifacts needed)")
    p.add_argument("--recipe", help="default recipes/demo.yaml (recipes/demo-tiny.yaml with --tiny, recipes/demo-dpo.yaml with --objective dpo)")
    p.add_argument("--objective", help="the objective the demo shows: sft (default: LoRA on a JSON extraction task) or dpo "
                   "(a model fine-tuned to prefer wrong answers, corrected by DPO; held-out preference accuracy)")
    p.add_argument("--workdir", help="default runs/demo (runs/demo-dpo with --objective dpo); a new directory or an earlier demo's")
    p.add_argument("--force", action="store_true", help="use a --workdir that is not an earlier demo's (the demo rebuilds data/, run/ and the model there)")
    p.set_defaults(fn=cmd_demo)

    p = sub.add_parser("tiny-model", help="write a tiny random model with a locally trained tokenizer")
    p.add_argument("out_dir")
    p.add_argument("--arch", default="llama", help="llama | qwen2 | mistral")
    p.add_argument("--hidden-size", type=_count(8), default=128, help="a multiple of 8 (4 heads of even size)")
    p.add_argument("--layers", type=_count(1), default=2)
    p.add_argument("--vocab-size", type=_count(300), default=2048, help="upper bound; a small corpus gives fewer")
    p.add_argument("--corpus", help="text file to train the tokenizer on (default: built-in demo text)")
    p.add_argument("--seed", type=_count(0, 2**32 - 1), default=0)
    p.add_argument("--force", action="store_true", help="write into a non-empty directory (its files of the same names are replaced)")
    p.set_defaults(fn=cmd_tiny_model)

    p = sub.add_parser("demo-data", help="write the demo's train and held-out eval sets (alpaca jsonl)")
    p.add_argument("out_dir")
    p.add_argument("--train-rows", type=_count(1), default=2000)
    p.add_argument("--eval-rows", type=_count(1), default=200)
    p.add_argument("--seed", type=_count(0, 2**32 - 1), default=0)
    p.add_argument("--force", action="store_true", help="write into a non-empty directory (train.jsonl and eval.jsonl are replaced)")
    p.set_defaults(fn=cmd_demo_data)
    return parser


def main(argv: list[str] | None = None) -> None:
    argv = sys.argv[1:] if argv is None else argv
    if "train" in argv[:3]:
        _stop_before_training()
    parser = exit_on_user_error(build_parser)
    args, extra = parser.parse_known_args(argv)
    # Overrides may follow options (`ftl plan R --json a.b=1`); argparse stops collecting at --json.
    if extra and hasattr(args, "items") and all("=" in e and not e.startswith("-") for e in extra):
        args.items += extra
    elif extra:
        parser.error(f"unrecognized arguments: {' '.join(extra)}")
    setup_logging(args.log_level)
    sys.exit(exit_on_user_error(lambda: args.fn(args)))


if __name__ == "__main__":
    main()
