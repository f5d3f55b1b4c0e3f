"""``ftl init``: a commented starter recipe for a model directory and a data file.

What it can read it decides (the data's format, the model's dtype and context, whether the
tokenizer has the chat template and pad token chat data needs, a ``max_length`` that fits the data);
the rest are the defaults Axolotl, TRL and torchtune users start from (LoRA r=16 on all linear
layers, cosine schedule, 3 epochs), written out with a comment each so the file can be edited.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

from ftl import objectives
from ftl.errors import UserError
from ftl.data.formats import FORMATS
from ftl.objectives.preference import DPO
from ftl.objectives.sft import SFT

SAMPLE_ROWS = 200


def starter_recipe(model: Path, data: Path, method: str = "lora") -> str:
    """The YAML text of a recipe for ``model`` and ``data`` (checked: both exist and fit together)."""
    from transformers import AutoConfig

    from ftl.recipe.schema import ModelSection
    from ftl.evaluate import detect_format
    from ftl.models.tokenizer import load_tokenizer

    if not (model / "config.json").is_file():
        raise UserError(f"{model}: not a model directory (no config.json); download the model first")
    if not data.exists():
        raise UserError(f"{data}: data file not found")
    fmt = detect_format(data)
    config = AutoConfig.from_pretrained(model)
    tokenizer = load_tokenizer(ModelSection(path=str(model)))
    notes = []
    if FORMATS[fmt].conversation and not tokenizer.chat_template:
        raise UserError(f"{model}: the data is {fmt} but the tokenizer has no chat template; point model.tokenizer at the "
                        "instruct model's tokenizer, or use alpaca/completion data")
    objective = objectives.default_for(fmt)
    if objective is DPO:
        notes.append("# preference pairs: trained with DPO (method.objective); ipo, simpo and orpo work the same way")
    lengths = _lengths(data, fmt, tokenizer)
    context = getattr(config, "max_position_embeddings", None) or 4096
    longest = max(lengths) if lengths else 512
    max_length = min(context, 2 ** math.ceil(math.log2(max(64, longest))))
    rows = _row_count(data)
    dtype = str(getattr(config, "dtype", None) or getattr(config, "torch_dtype", None) or "bfloat16").removeprefix("torch.")
    name = model.resolve().name
    lines = [
        f"# Starter recipe written by `ftl init` for {name} and {data.name}. Check it with",
        "# `ftl validate` and `ftl preprocess --show 3`, then `ftl plan` and `ftl train`.",
        "model:",
        f"  path: {model.resolve()}",
        f"  dtype: {dtype if dtype in ('float32', 'bfloat16', 'float16') else 'bfloat16'}   # the weights' own dtype",
        "data:",
        f"  train: {{path: {data.resolve()}, format: {fmt}}}   # format read from the first row",
        f"  max_length: {max_length}   # the longest of {len(lengths)} sampled rows is {longest} tokens (context {context})",
    ]
    if rows >= 200:
        lines.append("  eval_fraction: 0.05   # hold out 5% of the rows for eval loss")
    lines += notes
    lines += ["method:", f"  type: {method}   # lora | qlora (4-bit base) | full"]
    if objective is not SFT:
        lines.append(f"  objective: {objective.name}")
    if method != "full":
        lines += ["  lora: {r: 16, alpha: 32, dropout: 0.05, target_modules: all-linear}"]
    if method == "qlora":
        lines += ["quantization: {bits: 4}   # NF4 with double quantization, bf16 compute"]
    lines += [
        "train:",
        "  epochs: 3",
        "  micro_batch_size: 4",
        "  gradient_accumulation_steps: 4   # 16 rows per optimizer step",
        f"  learning_rate: {'5.0e-6' if objective is not SFT else ('2.0e-5' if method == 'full' else '2.0e-4')}",
        "  lr_scheduler: cosine",
        "  warmup_ratio: 0.03",
        "  mixed_precision: auto   # bf16 where the hardware computes it natively",
        "  gradient_checkpointing: true",
        "  logging_steps: 10",
        "  save_minutes: 30   # a checkpoint every 30 minutes of training (and at the end)",
        "output:",
        f"  dir: runs/{name}-{method}",
        "",
    ]
    return "\n".join(lines)


def _lengths(data: Path, fmt: str, tokenizer: Any) -> list[int]:
    """Token counts of the first rows, rendered as training renders them (preference: the longer side)."""
    from ftl.recipe.schema import DataSection, DataSource
    from ftl.data.sources import load_source, tokenize_row

    source = DataSource(path=str(data), format=fmt)
    cfg = DataSection(train=[source], max_length=1 << 20)
    rows = load_source(source)
    lengths = []
    for index in range(min(SAMPLE_ROWS, len(rows))):
        try:
            row = tokenize_row(rows[index], source, tokenizer, cfg, f"{data}: row {index}")
        except UserError:
            continue  # `ftl preprocess` reports such rows; a starter recipe needs only a length
        lengths.append(max(len(row["input_ids"]), len(row.get("rejected_input_ids") or [])))
    return lengths


def _row_count(data: Path) -> int:
    from ftl.recipe.schema import DataSource
    from ftl.data.sources import load_source

    return len(load_source(DataSource(path=str(data), format="completion")))
