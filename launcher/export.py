"""``ftl export``: a run's checkpoint as a standard Hugging Face model directory, verified.

The output is what serving engines load: sharded safetensors with the standard index,
``config.json`` without a quantization config, ``generation_config.json``, the tokenizer with its
chat template, and a model card. LoRA/QLoRA adapters are merged shard by shard (``ftl.merge``),
full-model checkpoints are re-sharded, and ZeRO-3 checkpoints saved without gathered weights are
consolidated with DeepSpeed's own ``get_fp32_state_dict_from_zero_checkpoint``.

Every export is then checked as a user would use it: ``AutoModelForCausalLM.from_pretrained`` on
the output, compared with the model as trained (base + adapter, quantized as in training) on the
same token sequences; ``verify.json`` records the logit differences and greedy agreement, and a
failed check makes ``ftl export`` exit non-zero.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
from pathlib import Path
from typing import Any

import torch
import yaml
from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer, GenerationConfig

from ftl.checkpoint import STATE, find_resumable, read_state, verify, zero_fp32_state_dict
from ftl.config import ExportSection, Recipe, load_recipe
from ftl.errors import UserError
from ftl.rundir import RunDir
from ftl.merge import Adapter, Quantizer, TensorSource, write_merged
from ftl.weights import DTYPES

log = logging.getLogger(__name__)

# Largest max |logit difference| that passes, relative to the reference logits' standard deviation:
# float32 only reorders sums; bf16/fp16 round every weight (8 and 11 significant bits).
TOLERANCE = {"float32": 1e-4, "float16": 2e-2, "bfloat16": 1e-1}
ORIGINAL_TOLERANCE = 1.0  # qlora_merge: original moves logits by design; only gross errors fail


class ExportError(UserError):
    """The export cannot be made or did not verify."""


def resolve_checkpoint(path: Path) -> tuple[Path, Recipe]:
    """A run directory (its newest complete checkpoint) or a checkpoint directory, and the run's recipe."""
    path = Path(path).resolve()
    run: RunDir | None = RunDir(path)
    if run.recipe.is_file() and run.checkpoints.is_dir():
        checkpoint = find_resumable(path)
        if checkpoint is None:
            raise ExportError(f"{path}: no complete checkpoint to export")
    elif (path / STATE).is_file():
        checkpoint, run = path, RunDir.of_checkpoint(path)
        verify(checkpoint)
        if run is None:
            raise ExportError(f"{path}: not inside a run directory (<run>/checkpoints/step-N with <run>/recipe.yaml); "
                              "export needs the run's recipe")
    else:
        raise ExportError(f"{path}: not a run directory or a checkpoint (no trainer_state.json)")
    return checkpoint, load_recipe(run.recipe)


def export(
    path: Path,
    out: Path | None = None,
    options: ExportSection | None = None,
    adapter_only: bool = False,
    updates: dict[str, Any] | None = None,
    trust_remote_code: bool = False,
) -> dict[str, Any]:
    """Export the checkpoint at ``path`` into ``out``; returns the verification report.

    ``options`` default to the run recipe's ``export`` section; ``updates`` change some of them."""
    checkpoint, recipe = resolve_checkpoint(path)
    if recipe.model.trust_remote_code and not trust_remote_code:
        raise ExportError(f"{checkpoint}: the run's recipe sets model.trust_remote_code, so verifying its export would run "
                          "Python files that come with its model; pass --trust-remote-code if you trust them")
    options = (options or recipe.export).model_copy(update=updates or {})
    out = Path(out or options.dir or RunDir(Path(recipe.output.dir)).export).resolve()
    if out.exists() and not out.is_dir():
        raise ExportError(f"--out: {out} is a file; choose a directory")
    if out.exists() and any(out.iterdir()):
        raise ExportError(f"{out} is not empty; choose another --out or remove it")
    # Written beside the target under a name of this process's own, renamed into place when complete.
    tmp = out.with_name(f".{out.name}.export-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    try:
        is_adapter = (checkpoint / "adapter_config.json").is_file()
        if adapter_only:
            if not is_adapter:
                raise ExportError(f"{checkpoint}: --adapter-only needs a LoRA/QLoRA checkpoint")
            for name in ("adapter_config.json", "adapter_model.safetensors"):
                shutil.copy2(checkpoint / name, tmp / name)
            _write_tokenizer(checkpoint, tmp)
            report = {"adapter_only": True, "passed": True}
        else:
            dtype = DTYPES[options.dtype]
            mode = _write_model(checkpoint, recipe, tmp, dtype, options)
            _write_tokenizer(checkpoint, tmp)
            report = {"mode": mode, "dtype": options.dtype, "checkpoint": str(checkpoint)}
            if options.verify:
                report.update(verify_export(tmp, checkpoint, recipe, options, mode))
            else:
                report.update({"verified": False, "passed": True})
            (tmp / "verify.json").write_text(json.dumps(report, indent=2))
        _write_model_card(tmp, checkpoint, recipe, report)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)  # ours alone; nothing of the user's is touched
        raise
    if out.exists():
        out.rmdir()
    tmp.rename(out)
    report["out"] = str(out)
    return report


def _write_model(checkpoint: Path, recipe: Recipe, out: Path, dtype: torch.dtype, options: ExportSection) -> str:
    base_dir = _local_model_dir(recipe.model.path)
    quantizer = None
    if (checkpoint / "adapter_config.json").is_file():
        source, adapter = TensorSource.from_dir(base_dir), Adapter.load(checkpoint)
        mode = "lora"
        if recipe.quantization.bits == 4:
            mode = f"qlora-{options.qlora_merge}"
            if options.qlora_merge == "dequantized":
                quantizer = _quantizer(base_dir, recipe, set(adapter.replaced))
        elif recipe.quantization.bits == 8:
            mode = "lora-8bit-original"  # int8 rounding is not reproduced; verification reports the difference
        config_dir = base_dir
    elif any(checkpoint.glob("model*.safetensors")):
        source, adapter, mode, config_dir = TensorSource.from_dir(checkpoint), None, "full", checkpoint
    elif (checkpoint / "deepspeed").is_dir():
        state = zero_fp32_state_dict(checkpoint)
        source, adapter, mode, config_dir = TensorSource.from_state_dict(state), None, "full-zero3", base_dir
    else:
        raise ExportError(f"{checkpoint}: no adapter, model weights or deepspeed/ state to export")
    files = write_merged(source, out, dtype, options.max_shard_size, adapter, quantizer)
    config = AutoConfig.from_pretrained(config_dir)
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    if adapter is not None and any(name.endswith("lm_head.weight") for name in adapter.replaced):
        config.tie_word_embeddings = False  # the trained head is its own tensor now
    config.dtype = dtype
    config.save_pretrained(out)
    try:
        generation = GenerationConfig.from_pretrained(config_dir)
    except OSError:
        generation = GenerationConfig.from_model_config(config)
    generation.save_pretrained(out)
    log.info("%s export: %d file(s) in %s", mode, len(files), out)
    return mode


def _quantizer(base_dir: Path, recipe: Recipe, replaced: set[str]) -> Quantizer:
    """Which weights bitsandbytes quantized in training: every nn.Linear outside skip_modules."""
    config = AutoConfig.from_pretrained(base_dir)
    with torch.device("meta"):
        skeleton = AutoModelForCausalLM.from_config(config)
    skip = set(recipe.quantization.skip_modules)
    weights = {
        f"{name}.weight"
        for name, module in skeleton.named_modules()
        if isinstance(module, torch.nn.Linear) and not (set(name.split(".")) & skip)
    } - replaced
    quant = recipe.quantization
    storage = torch.uint8 if quant.quant_storage == "uint8" else DTYPES[quant.quant_storage]
    return Quantizer(weights, DTYPES.get(recipe.model.dtype, torch.bfloat16), quant.quant_type, quant.double_quant, storage)


def _local_model_dir(path: str) -> Path:
    if Path(path).is_dir():
        return Path(path)
    try:
        from huggingface_hub import snapshot_download

        return Path(snapshot_download(path, local_files_only=True, allow_patterns=["*.json", "*.safetensors"]))
    except Exception:
        raise ExportError(f"model.path: {path} is neither a local directory nor in the Hugging Face cache; download it first") from None


def _write_tokenizer(checkpoint: Path, out: Path) -> None:
    AutoTokenizer.from_pretrained(checkpoint).save_pretrained(out)


def _write_model_card(out: Path, checkpoint: Path, recipe: Recipe, report: dict[str, Any]) -> None:
    state = read_state(checkpoint)
    data = ", ".join(s.path for s in recipe.data.train)
    lines = [
        "---", f"base_model: {recipe.model.path}", "library_name: transformers", "tags: [ftl, fine-tuned]", "---", "",
        f"# Fine-tuned {Path(recipe.model.path).name}", "",
        f"- base model: `{recipe.model.path}`",
        f"- method: {recipe.method.type}" + (f" (r={recipe.method.lora.r}, alpha={recipe.method.lora.alpha})" if recipe.method.type != "full" else ""),
        f"- export: {report.get('mode', 'adapter')}, {report.get('dtype', '')}",
        f"- data: {data}",
        f"- steps: {state['step']} of {state.get('total_steps')}",
        f"- final eval loss: {state.get('final_eval_loss')}",
    ]
    if report.get("verified"):
        lines.append(f"- verification: max |logit diff| {report['max_abs_logit_diff']:.3g}, greedy agreement "
                     f"{report['greedy_agreement']:.1%}, {'passed' if report['passed'] else 'FAILED'}")
    lines += ["", "## Recipe", "", "```yaml", yaml.safe_dump(recipe.model_dump(mode="json"), sort_keys=False).strip(), "```", ""]
    (out / "README.md").write_text("\n".join(lines))


# ----------------------------------------------------------------------------- verification


@torch.no_grad()
def verify_export(out: Path, checkpoint: Path, recipe: Recipe, options: ExportSection, mode: str) -> dict[str, Any]:
    """Logits of the export (loaded as a user would) against the model as trained."""
    from ftl.model import load_for_inference

    exported = AutoModelForCausalLM.from_pretrained(out, dtype=DTYPES[options.dtype]).eval()
    if mode == "full-zero3":
        reference = AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(out), dtype=torch.float32).eval()
        reference.load_state_dict(zero_fp32_state_dict(checkpoint), strict=False)
    else:
        reference, _ = load_for_inference(checkpoint, dtype=torch.float32, trust_remote_code=recipe.model.trust_remote_code)
    tokenizer = AutoTokenizer.from_pretrained(out)
    sequences = _verification_sequences(recipe, tokenizer, options.verify_prompts)
    max_diff, sum_diff, count, agree, positions, scale = 0.0, 0.0, 0, 0, 0, 0.0
    for ids in sequences:
        input_ids = torch.tensor([ids])
        ref = reference(input_ids=input_ids).logits.float()[0]
        got = exported(input_ids=input_ids).logits.float()[0]
        diff = (ref - got).abs()
        max_diff = max(max_diff, diff.max().item())
        sum_diff, count = sum_diff + diff.sum().item(), count + diff.numel()
        agree += (ref.argmax(-1) == got.argmax(-1)).sum().item()
        positions += len(ids)
        scale = max(scale, ref.std().item())
    tolerance = (ORIGINAL_TOLERANCE if mode.endswith("original") else TOLERANCE[options.dtype]) * scale
    return {
        "verified": True,
        "sequences": len(sequences),
        "positions": positions,
        "max_abs_logit_diff": max_diff,
        "mean_abs_logit_diff": sum_diff / max(count, 1),
        "greedy_agreement": agree / max(positions, 1),
        "reference_logit_std": scale,
        "tolerance": tolerance,
        "passed": max_diff <= tolerance,
    }


def _verification_sequences(recipe: Recipe, tokenizer: Any, limit: int) -> list[list[int]]:
    """Token ids of the first rows of the eval split (else train), or fixed prompts without data."""
    from ftl.data import build_dataset

    for sources in (recipe.data.eval, recipe.data.train):
        if sources and all(Path(s.path).exists() for s in sources):
            dataset = build_dataset(sources, tokenizer, recipe.data)
            return [list(dataset[i]["input_ids"]) for i in range(min(limit, len(dataset)))]
    texts = ["The capital of France is", "def fibonacci(n):", "Write a haiku about the sea.", "1, 2, 3, 5, 8,"]
    return [tokenizer(t)["input_ids"] for t in texts[:limit]]
