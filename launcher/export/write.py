"""``ftl export``: a run's checkpoint as a standard Hugging Face model directory, verified.

The output is what serving engines load: sharded safetensors with the standard index,
``config.json`` without a quantization config, ``generation_config.json``, the tokenizer with its
chat template, and a model card. LoRA/QLoRA adapters are merged shard by shard (``ftl.export.merge``),
full-model checkpoints are re-sharded, and ZeRO-3 checkpoints saved without gathered weights are
consolidated with DeepSpeed's own ``get_fp32_state_dict_from_zero_checkpoint``.

Every export is then checked (``ftl.export.verify``): the float32 merge against the model as
trained, and the files against the merge rounded to the export dtype; ``verify.json`` records both,
and a failed check makes ``ftl export`` exit non-zero and leaves the files at ``<out>.failed``,
never at ``<out>`` where a serving job would pick them up.

What serving stacks read is written for them: ``config.json`` keeps the base's keys and adds the
legacy ones transformers 4.x reads (``rope_theta``, ``rope_scaling``, ``torch_dtype``); the chat
template is the one the model was trained with (``chat`` data: the tokenizer's; ``alpaca`` and
``completion`` data: one that renders the training prompt); files are readable by other users; the
model card and adapter config hold no local paths.
"""

from __future__ import annotations

import json
import logging
import math
import os
import shutil
import socket
from pathlib import Path
from typing import Any

import torch
import yaml
from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer, GenerationConfig

from ftl import objectives
from ftl.checkpoints.checkpoint import STATE, find_resumable, read_state, verify
from ftl.recipe.schema import ExportSection, Recipe
from ftl.recipe.load import load_recipe
from ftl.errors import UserError
from ftl.export.template import trained_chat_template
from ftl.export.verify import TOLERANCE, verification_sequences, verify_export
from ftl.training.resume import check_same_base
from ftl.checkpoints.rundir import RunDir
from ftl.export.merge import Adapter, Merge, Quantizer, TensorSource, write_merged
from ftl.models.build import HEADS, head_of
from ftl.distributed.strategies.zero import zero_fp32_state_dict
from ftl.precision import DTYPES

log = logging.getLogger(__name__)


class ExportError(UserError):
    """The export cannot be made or did not verify."""


def resolve_checkpoint(path: Path, base: str | None = None) -> tuple[Path, Recipe, bool]:
    """A run directory (its newest complete checkpoint) or a checkpoint directory, and the run's
    recipe; or a plain peft adapter trained elsewhere and the recipe its export needs (then True)."""
    from ftl.models.peft_adapter import adapter_recipe, is_plain_adapter

    path = Path(path).resolve()
    run: RunDir | None = RunDir(path)
    if not (path / STATE).is_file() and not run.checkpoints.is_dir() and is_plain_adapter(path):
        return path, adapter_recipe(path, base, _local_model_dir), True
    if run.recipe_to_read.is_file() and run.checkpoints.is_dir():
        checkpoint = find_resumable(path)
        if checkpoint is None:
            raise ExportError(f"{path}: no complete checkpoint to export")
    elif (path / STATE).is_file():
        checkpoint, run = path, RunDir.of_checkpoint(path)
        verify(checkpoint)
        if run is None:
            raise ExportError(f"{path}: not inside a run directory (<run>/checkpoints/step-N with <run>/run.yaml); "
                              "export needs the run's recipe")
    else:
        raise ExportError(f"{path}: not a run directory, a checkpoint (no trainer_state.json) or a peft adapter "
                          "(adapter_config.json + adapter_model.safetensors)")
    if base is not None:
        raise ExportError("--base: only for a peft adapter trained elsewhere; a run's checkpoint merges into its recipe's model.path")
    return checkpoint, load_recipe(run.recipe_to_read), False


def export(
    path: Path,
    out: Path | None = None,
    options: ExportSection | None = None,
    adapter_only: bool = False,
    updates: dict[str, Any] | None = None,
    trust_remote_code: bool = False,
    base: str | None = None,
) -> dict[str, Any]:
    """Export the checkpoint at ``path`` into ``out``; returns the verification report.

    ``options`` default to the run recipe's ``export`` section; ``updates`` change some of them."""
    checkpoint, recipe, foreign = resolve_checkpoint(path, base)
    if foreign:
        out = Path(out or Path(path).resolve().with_name(Path(path).resolve().name + "-merged"))
    elif (checkpoint / "adapter_config.json").is_file():  # merged into, and verified against, the base at model.path
        check_same_base(checkpoint, read_state(checkpoint), recipe.model.path,
                        "put the base it was trained on back at that path to export this adapter", ExportError)
    if recipe.model.trust_remote_code and not trust_remote_code:
        raise ExportError(f"{checkpoint}: the run's recipe sets model.trust_remote_code, so verifying its export would run "
                          "Python files that come with its model; pass --trust-remote-code if you trust them")
    options = (options or recipe.export).model_copy(update=updates or {})
    out = Path(out or options.dir or RunDir(Path(recipe.output.dir)).export).resolve()
    try:
        out.exists()
    except OSError as err:  # a name longer than the file system allows, a loop of links
        raise ExportError(f"--out: cannot use {str(out)[:200]}: {err.strerror}") from None
    if out.exists() and not out.is_dir():
        raise ExportError(f"--out: {out} is a file; choose a directory")
    if out.exists() and any(out.iterdir()):
        raise ExportError(f"{out} is not empty; choose another --out or remove it")
    # Written beside the target under a name of this process's own, renamed into place when complete.
    tmp = out.with_name(f".{out.name}.export-{socket.gethostname()}-{os.getpid()}")
    _remove_dead_exports(out)
    shutil.rmtree(tmp, ignore_errors=True)
    try:
        tmp.mkdir(parents=True)
    except OSError as err:  # a file where a directory of the path should be, no permission, a full disk
        raise ExportError(f"--out: cannot create {out.parent}/: {err.strerror}") from None
    head = head_of(checkpoint) if foreign else objectives.for_recipe(recipe).head  # score: a reward model
    try:
        is_adapter = (checkpoint / "adapter_config.json").is_file()
        if adapter_only:
            if not is_adapter:
                raise ExportError(f"{checkpoint}: --adapter-only needs a LoRA/QLoRA checkpoint")
            _write_adapter(checkpoint, recipe, tmp)
            report = {"adapter_only": True, "passed": True}
            if options.gguf:
                from ftl.export import gguf

                base = _local_model_dir(recipe.model.path)
                report["gguf"] = gguf.convert(tmp, options.gguf, tmp / f"adapter-{options.gguf}.gguf", base=base).name
        else:
            dtype = DTYPES[options.dtype]
            mode, merge = _write_model(checkpoint, recipe, tmp, dtype, options, head)
            template = _write_tokenizer(checkpoint, recipe, tmp, foreign)
            report = {"mode": mode, "dtype": options.dtype, "checkpoint": f"{checkpoint.parent.name}/{checkpoint.name}",
                      "chat_template": template}
            if foreign:
                from ftl.models.peft_adapter import UNKNOWN

                report.update(checkpoint=checkpoint.name, unknown=UNKNOWN)
            sequences = None
            if options.verify:
                sequences = verification_sequences(recipe, AutoTokenizer.from_pretrained(tmp), options.verify_prompts)
                report.update(verify_export(tmp, checkpoint, recipe, options, mode, merge, sequences, head))
            else:
                report.update({"verified": False, "passed": True})
            if options.gguf and report["passed"]:
                report.update(_write_gguf(tmp, options, report, sequences))
            (tmp / "verify.json").write_text(json.dumps(_json_safe(report), indent=2, allow_nan=False))
        _write_model_card(tmp, checkpoint, recipe, report, head)
        _readable(tmp)
    except BaseException as err:
        shutil.rmtree(tmp, ignore_errors=True)  # ours alone; nothing of the user's is touched
        if isinstance(err, OSError):
            raise ExportError(f"export to {out} failed: {err.strerror or err} (nothing was written there)") from None
        raise
    if not report["passed"]:  # kept for inspection, away from where a serving job looks
        out = _fresh_name(out.with_name(out.name + ".failed"))  # an existing one may be anybody's: never removed
    elif out.exists():
        out.rmdir()
    tmp.rename(out)
    report["out"] = str(out)
    return report


def _remove_dead_exports(out: Path) -> None:
    """Temporary directories of earlier exports to ``out`` whose process is gone (a kill -9, a power
    cut) on this machine: named ``.<out>.export-<host>-<pid>`` by this module, so they are ours to remove."""
    for stale in out.parent.glob(f".{out.name}.export-{socket.gethostname()}-*"):
        pid = stale.name.rsplit("-", 1)[-1]
        if pid.isdigit() and int(pid) != os.getpid() and not Path(f"/proc/{pid}").exists() and stale.is_dir():
            log.info("removing %s, left by an export that did not finish", stale)
            shutil.rmtree(stale, ignore_errors=True)


def _json_safe(value: Any) -> Any:
    """JSON has no NaN or Infinity (Python writes them, other readers reject the file): a logit
    difference that is not finite is written as the string "nan"/"inf" and fails the check anyway."""
    if isinstance(value, dict):
        return {k: _json_safe(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_json_safe(v) for v in value]
    if isinstance(value, float) and not math.isfinite(value):
        return str(value)
    return value


def _fresh_name(path: Path) -> Path:
    """``path``, or ``path-2``, ``path-3``, ... whichever does not exist yet."""
    candidate, n = path, 1
    while candidate.exists() or candidate.is_symlink():
        n += 1
        candidate = path.with_name(f"{path.name}-{n}")
    return candidate


def _write_model(checkpoint: Path, recipe: Recipe, out: Path, dtype: torch.dtype, options: ExportSection,
                 head: str = "causal_lm") -> tuple[str, Merge]:
    base_dir = _local_model_dir(recipe.model.path)
    quantizer, base_dtype = None, None
    if (checkpoint / "adapter_config.json").is_file():
        base_dtype = DTYPES.get(recipe.model.dtype)  # None for auto: the stored dtype, as training loaded it
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
    if head == "score":
        source.drop("lm_head.weight")  # a reward model's output is its score head
    merge = Merge(source, adapter, quantizer, base_dtype, "score.weight" if head == "score" else "lm_head.weight")
    files = write_merged(merge, out, dtype, options.max_shard_size)
    untie = adapter is not None and any(name.endswith("lm_head.weight") for name in adapter.replaced)
    config = serving_config(json.loads((config_dir / "config.json").read_text()), options.dtype, untie)
    if head == "score":
        config = score_config(config, AutoTokenizer.from_pretrained(checkpoint).pad_token_id)
    (out / "config.json").write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
    if head == "causal_lm":  # (a reward model does not generate)
        try:
            generation = GenerationConfig.from_pretrained(config_dir)
        except OSError:
            generation = GenerationConfig.from_model_config(AutoConfig.from_pretrained(out))
        generation.save_pretrained(out)
    log.info("%s export: %d file(s) in %s", mode, len(files), out)
    return mode, merge


def serving_config(config: dict[str, Any], dtype: str, untie: bool) -> dict[str, Any]:
    """The base's config.json as its keys were, for the export: no quantization config, the export
    dtype, and the keys transformers 4.x reads beside those transformers 5 writes. (A config re-saved
    by transformers 5 keeps RoPE only in ``rope_parameters``; transformers 4.57 then silently uses
    RoPE base 10000.)"""
    config = dict(config)
    config.pop("quantization_config", None)
    config["dtype"] = config["torch_dtype"] = dtype
    if untie:
        config["tie_word_embeddings"] = False  # the trained head is its own tensor now
    rope = config.get("rope_parameters")
    if isinstance(rope, dict) and "rope_theta" in rope:  # (per-layer-type dicts have no single legacy form)
        config.setdefault("rope_theta", rope["rope_theta"])
        scaling = {k: v for k, v in rope.items() if k != "rope_theta"}
        config.setdefault("rope_scaling", scaling if scaling.get("rope_type", "default") != "default" else None)
    return config


def score_config(config: dict[str, Any], pad_token_id: int | None) -> dict[str, Any]:
    """A causal LM's config as the reward model's: the sequence-classification architecture with one
    output, and the pad token by which it finds each row's last token."""
    config = dict(config)
    config["architectures"] = [a.replace("ForCausalLM", "ForSequenceClassification") for a in config.get("architectures") or []]
    config["id2label"], config["label2id"] = {"0": "LABEL_0"}, {"LABEL_0": 0}
    config.pop("num_labels", None)
    if config.get("pad_token_id") is None:
        config["pad_token_id"] = pad_token_id
    return config


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
    return Quantizer(weights, quant.quant_type, quant.double_quant, storage, DTYPES[quant.compute_dtype])


def _local_model_dir(path: str) -> Path:
    if Path(path).is_dir():
        return Path(path)
    try:
        from huggingface_hub import snapshot_download

        return Path(snapshot_download(path, local_files_only=True, allow_patterns=["*.json", "*.safetensors"]))
    except Exception:
        raise ExportError(f"model.path: {path} is neither a local directory nor in the Hugging Face cache; download it first") from None


def _write_gguf(out: Path, options: ExportSection, report: dict[str, Any], sequences: list[list[int]] | None) -> dict[str, Any]:
    """llama.cpp's conversion of the verified export; in float32 it must give the export's logits
    (on the verification's own sequences; none when verification is off)."""
    from ftl.export import gguf

    path = gguf.convert(out, options.gguf, out / f"model-{options.gguf}.gguf")
    if sequences is None:
        return {"gguf": path.name}
    result = gguf.compare(out, path, sequences)
    if options.gguf == "f32" and result["gguf_max_abs_logit_diff"] > TOLERANCE * report["reference_logit_std"]:
        result["passed"] = False
    return result


def _write_tokenizer(checkpoint: Path, recipe: Recipe, out: Path, foreign: bool = False) -> str:
    """The tokenizer with the chat template the model was trained with; returns where it came from.
    (An adapter trained elsewhere: its own tokenizer files, else the base's, with their template.)"""
    if foreign:
        source = checkpoint if (checkpoint / "tokenizer_config.json").is_file() else Path(recipe.model.path)
        AutoTokenizer.from_pretrained(source).save_pretrained(out)
        return f"the tokenizer's own ({'the adapter' if source == checkpoint else 'the base'}'s; the training data is unknown)"
    tokenizer = AutoTokenizer.from_pretrained(checkpoint)
    template, origin = trained_chat_template(tokenizer, recipe)
    if template is not None:
        tokenizer.chat_template = template
    tokenizer.save_pretrained(out)
    return origin


def _write_adapter(checkpoint: Path, recipe: Recipe, out: Path) -> None:
    """The adapter alone, as vLLM's ``LoRARequest`` and llama.cpp's LoRA converter load it: no tokenizer
    files (vLLM warns about them), the base named without a local path."""
    config = json.loads((checkpoint / "adapter_config.json").read_text())
    if config.get("modules_to_save"):
        raise ExportError(f"{checkpoint}: the adapter trains whole modules ({', '.join(config['modules_to_save'])}, "
                          "method.lora.modules_to_save), which vLLM and llama.cpp cannot load from an adapter; export the "
                          "merged model (without --adapter-only), or load the checkpoint directory itself with peft")
    config["base_model_name_or_path"] = _public_name(recipe.model.path)
    (out / "adapter_config.json").write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
    shutil.copy2(checkpoint / "adapter_model.safetensors", out / "adapter_model.safetensors")


def _public_name(path: str) -> str:
    """A hub id as it is; a local directory by its name (a card or config read elsewhere must not
    point into this machine's file system)."""
    return Path(path).name if Path(path).is_absolute() or Path(path).exists() else path


def _readable(out: Path) -> None:
    """safetensors writes files mode 0600 whatever the umask; a serving container running as another
    user must read them. Files get the mode the umask gives any new file (0644 under umask 022)."""
    umask = os.umask(0)
    os.umask(umask)
    for path in [out, *out.iterdir()]:
        path.chmod((0o777 if path.is_dir() else 0o666) & ~umask)


def _write_model_card(out: Path, checkpoint: Path, recipe: Recipe, report: dict[str, Any], head: str) -> None:
    state = read_state(checkpoint) if (checkpoint / STATE).is_file() else {"step": "unknown"}
    base = _public_name(recipe.model.path)
    data = ", ".join(Path(s.path).name for s in recipe.data.train)
    library = "peft" if report.get("adapter_only") else "transformers"
    auto = HEADS[head][0].__name__  # a reward model: AutoModelForSequenceClassification
    lines = [
        "---", f"base_model: {base}", f"library_name: {library}", "tags: [ftl, fine-tuned]", "---", "",
        f"# Fine-tuned {base}", "",
        f"- base model: `{base}`",
        f"- method: {recipe.method.type}" + (f" (r={recipe.method.lora.r}, alpha={recipe.method.lora.alpha})" if recipe.method.type != "full" else ""),
        f"- export: {report.get('mode', 'adapter')}" + (f", {report['dtype']}" if "dtype" in report else ""),
        f"- data: {data} ({', '.join(sorted({s.format for s in recipe.data.train}))} format)",
        f"- steps: {state['step']} of {state.get('total_steps')}",
        f"- final eval loss: {state.get('final_eval_loss')}",
    ]
    if "chat_template" in report:
        lines.append(f"- chat template: {report['chat_template']}")
    if report.get("verified"):
        lines.append(f"- verification: the float32 merge matches the trained model to {report['merge_max_abs_logit_diff']:.3g} "
                     f"(max |logit diff|), the files are that merge rounded to {report['dtype']} "
                     f"({'exactly' if report['weights_equal_rounded_merge'] else 'NOT exactly'}); {report['dtype']} rounding "
                     f"moves logits by up to {report['rounding_max_abs_logit_diff']:.3g} (greedy agreement "
                     f"{report['rounding_greedy_agreement']:.1%}); {'passed' if report['passed'] else 'FAILED'}")
    lines += ["", "## Use", ""] + (_adapter_usage(base) if report.get("adapter_only") else [
        "```python", f"from transformers import {auto}, AutoTokenizer", "",
        f'model = {auto}.from_pretrained("path/to/this/directory")',
        'tokenizer = AutoTokenizer.from_pretrained("path/to/this/directory")', "```"])
    recipe_text = yaml.safe_dump(_without_local_paths(recipe.model_dump(mode="json")), sort_keys=False).strip()
    lines += ["", "## Recipe", "", "```yaml", recipe_text, "```", ""]
    (out / "README.md").write_text("\n".join(lines))


def _adapter_usage(base: str) -> list[str]:
    """How to load the adapter alone: onto its base with peft (``AutoPeftModelForCausalLM`` finds the
    base only by a hub id; a local base is named here without its path)."""
    return [f"A LoRA adapter of `{base}`. Load the base (a local copy: its directory) and put the adapter on it:", "",
            "```python", "from peft import PeftModel", "from transformers import AutoModelForCausalLM", "",
            f'base = AutoModelForCausalLM.from_pretrained("path/to/{base}")',
            'model = PeftModel.from_pretrained(base, "path/to/this/directory")',
            "model = model.merge_and_unload()  # optional: one plain model", "```", "",
            "vLLM loads it with `LLM(model=BASE, enable_lora=True)` and a `LoRARequest` naming this directory."]


def _without_local_paths(value: Any) -> Any:
    if isinstance(value, dict):
        return {k: _without_local_paths(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_without_local_paths(v) for v in value]
    if isinstance(value, str) and value.startswith("/"):
        return Path(value).name
    return value
