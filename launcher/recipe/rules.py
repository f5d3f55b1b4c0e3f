"""Settings that are each valid but cannot work together, found before any model is loaded.

The schema (``ftl.recipe.schema``) checks each field; this module holds every rule across sections,
and asks the strategy the run uses (``strategy: auto`` resolved) and its objective for the rules
that depend on them (``ftl.distributed.strategies``, ``ftl.objectives``). Pure: a recipe in, (key path, message) pairs out.
"""

from __future__ import annotations

import importlib.util
from typing import TYPE_CHECKING

from ftl import objectives
from ftl.distributed import strategies
from ftl.data.formats import FORMATS, names
from ftl.recipe.units import parse_gib, slurm_seconds
from ftl import scorers
from ftl.training import early_stopping

if TYPE_CHECKING:
    from ftl.recipe.schema import Recipe

Problems = list[tuple[tuple, str]]


def check(recipe: Recipe) -> Problems:
    """Every cross-section rule, on a recipe with what it implies filled in (``with_implied``)."""
    return (_method(recipe) + objectives.check(recipe) + _data(recipe) + early_stopping.check(recipe) + _generate(recipe) + _output(recipe)
            + _machines(recipe) + strategies.for_recipe(recipe).check())


def _method(recipe: Recipe) -> Problems:
    method, quant = recipe.method, recipe.quantization
    problems: Problems = []
    if method.freeze and method.type != "full":
        problems.append((("method", "freeze"), "applies to method.type: full; LoRA already freezes the base model"))
    if method.type == "qlora" and quant.bits != 4:
        problems.append((("quantization", "bits"), "method.type: qlora means a 4-bit base; for an 8-bit base use method.type: lora"))
    if method.type == "full" and quant.bits is not None:
        problems.append((("quantization", "bits"), "full fine-tuning cannot train quantized weights; use method.type: lora or "
                         "qlora, or remove quantization.bits"))
    if method.type != "full" and method.lora.dtype == "base" and recipe.train.mixed_precision == "fp16":
        problems.append((("method", "lora", "dtype"), "fp16 loss scaling needs fp32 adapters (their gradients are unscaled "
                         "in fp32); use dtype: float32, or train.mixed_precision: bf16"))
    if quant.bits == 8 and quant.quant_storage != "uint8":
        problems.append((("quantization", "quant_storage"), "applies to 4-bit quantization only"))
    return problems


def _data(recipe: Recipe) -> Problems:
    data = recipe.data
    problems: Problems = []
    if data.streaming:
        if recipe.train.max_steps is None:
            problems.append((("train", "max_steps"), "data.streaming needs train.max_steps (a stream has no length to count epochs by)"))
        for key, bad in (("packing", data.packing), ("eval_fraction", data.eval_fraction), ("train", len(data.train) > 1),
                         ("train", any(s.weight != 1.0 or s.samples for s in data.train))):
            if bad:
                problems.append((("data", key), "not available with data.streaming: one train source, no packing, mixing or "
                                 "eval_fraction; preprocess instead"))
    for key, source in data.source_keys():
        chat_only = [name for name, default in (("roles_to_train", ["assistant"]), ("train_eot", True), ("mask_history", False))
                     if getattr(source, name) != default]
        if not FORMATS[source.format].conversation and chat_only:
            conversations = " or ".join(names(lambda f: f.conversation))
            problems.append((("data", *key, chat_only[0]), f"applies to format {conversations}, not {source.format}"))
    if data.eval_fraction and data.eval:
        problems.append((("data", "eval_fraction"), "set either data.eval (a separate eval source) or data.eval_fraction, not both"))
    return problems


def _generate(recipe: Recipe) -> Problems:
    """eval.generate: a set with reference answers, a model that generates, scorers that exist."""
    gen = recipe.eval.generate
    if gen is None:
        return []
    problems: Problems = []
    sets = recipe.data.eval_sets()
    if gen.set not in sets:
        known = ", ".join(sets) or "none: set data.eval (eval_fraction's rows have no separate file to generate from)"
        problems.append((("eval", "generate", "set"), f"'{gen.set}' is not an eval set of data.eval (sets: {known})"))
    elif not all(FORMATS[s.format].answers for s in sets[gen.set]):
        problems.append((("eval", "generate", "set"), f"'{gen.set}' needs rows with reference answers "
                         f"({' or '.join(names(lambda f: f.answers))} format)"))
    if objectives.for_recipe(recipe).head != "causal_lm":
        problems.append((("eval", "generate"), f"method.objective {recipe.method.objective} trains a score head, which "
                         "generates nothing; use ftl eval's pairwise accuracy"))
    strategy = strategies.for_recipe(recipe)
    if strategy.shards_weights:
        problems.append((("eval", "generate"), f"generation needs each process's whole model; not under {strategy.name} yet "
                         "(ddp, zero1 and zero2 generate)"))
    for k, spec in enumerate(gen.scorers):
        wrong = scorers.check(spec)
        if wrong:
            problems.append((("eval", "generate", "scorers", k), wrong))
    return problems


def _output(recipe: Recipe) -> Problems:
    if "wandb" in recipe.output.report_to and importlib.util.find_spec("wandb") is None:
        return [(("output", "report_to"), "wandb is not installed; pip install wandb, or remove it from report_to")]
    return []


def _machines(recipe: Recipe) -> Problems:
    """Machines, processes and the Slurm job that runs them."""
    dist, slurm = recipe.distributed, recipe.slurm
    problems: Problems = []
    # A Slurm job's nodes are its machines, and GPUs per node its processes per machine (with_implied).
    if dist.num_machines != slurm.nodes:
        problems.append((("distributed", "num_machines"), f"is {dist.num_machines} but slurm.nodes is {slurm.nodes}; set one of them"))
    if slurm.gpus_per_node and dist.num_processes != slurm.gpus_per_node:
        problems.append((("distributed", "num_processes"), f"is {dist.num_processes} but slurm.gpus_per_node is "
                         f"{slurm.gpus_per_node}; set one of them"))
    limit = slurm_seconds(slurm.time)
    if limit is None:
        problems.append((("slurm", "time"), f"'{slurm.time}' is not a Slurm time (MM, MM:SS, HH:MM:SS, D-HH, D-HH:MM, D-HH:MM:SS)"))
    elif slurm.signal_grace >= limit:
        problems.append((("slurm", "signal_grace"), f"{slurm.signal_grace}s is not less than the time limit ({limit}s); "
                         "the job would stop at once"))
    if dist.gpu_memory is not None and not parse_gib(dist.gpu_memory):
        problems.append((("distributed", "gpu_memory"), f"'{dist.gpu_memory}' is not a size; write e.g. 80GB, 24G or 40960MB"))
    if dist.machine_rank >= dist.num_machines:
        problems.append((("distributed", "machine_rank"), f"must be below num_machines ({dist.num_machines})"))
    return problems
