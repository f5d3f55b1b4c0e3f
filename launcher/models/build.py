"""Build the model to train from the recipe: load the base, decide what is trainable, wrap it.

The training loop never asks which method it runs: this module returns a model whose
``requires_grad`` flags say what to train (LoRA adapters through peft, or the base weights minus
any frozen patterns) and a tokenizer that always has a pad token.
"""

from __future__ import annotations

import fnmatch
import json
import logging
import math
import os
import sys
from pathlib import Path
from typing import Any

import torch
from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification, AutoTokenizer, BitsAndBytesConfig, PreTrainedModel

from ftl import objectives
from ftl.recipe.schema import MethodSection, ModelSection, QuantizationSection, Recipe
from ftl.errors import first_line
from ftl.models.families import decoder_layers
from ftl.precision import DTYPES, torch_dtype
from ftl.models.tokenizer import LOAD_ERRORS, ModelError, check_local, load_tokenizer, set_pad_token

log = logging.getLogger(__name__)


def quantization_config(quant: QuantizationSection) -> BitsAndBytesConfig | None:
    """The bitsandbytes config for ``quantization``, or None for a full-precision base."""
    if quant.bits is None:
        return None
    if quant.bits == 8:
        return BitsAndBytesConfig(load_in_8bit=True, llm_int8_skip_modules=quant.skip_modules or None)
    return BitsAndBytesConfig(
        load_in_4bit=True,
        bnb_4bit_quant_type=quant.quant_type,
        bnb_4bit_use_double_quant=quant.double_quant,
        bnb_4bit_compute_dtype=DTYPES[quant.compute_dtype],
        bnb_4bit_quant_storage=DTYPES[quant.quant_storage] if quant.quant_storage != "uint8" else torch.uint8,
        llm_int8_skip_modules=quant.skip_modules or None,
    )


# A model's head (``Objective.head``): how transformers builds it, and peft's task for it (SEQ_CLS
# trains the new score head whole beside the adapters and saves it with them).
HEADS: dict[str, tuple[Any, str, dict[str, Any]]] = {
    "causal_lm": (AutoModelForCausalLM, "CAUSAL_LM", {}),
    "score": (AutoModelForSequenceClassification, "SEQ_CLS", {"num_labels": 1}),
}


def head_of(path: str | Path) -> str:
    """The head of a saved model: ``score`` for a sequence-classification config or adapter, else ``causal_lm``."""
    path = Path(path)
    if (path / "adapter_config.json").is_file():
        task = json.loads((path / "adapter_config.json").read_text()).get("task_type")
        return "score" if task == "SEQ_CLS" else "causal_lm"
    if (path / "config.json").is_file():
        architectures = json.loads((path / "config.json").read_text()).get("architectures") or []
        return "score" if any(a.endswith("ForSequenceClassification") for a in architectures) else "causal_lm"
    return "causal_lm"


def load_base_model(
    cfg: ModelSection, tokenizer: Any | None = None, quant: QuantizationSection | None = None, head: str = "causal_lm"
) -> PreTrainedModel:
    bnb_config = quantization_config(quant) if quant is not None else None
    auto_class, _, head_kwargs = HEADS[head]
    extra: dict[str, Any] = dict(head_kwargs)
    if bnb_config is not None:
        extra["quantization_config"] = bnb_config
        if torch.cuda.is_available():
            # bitsandbytes quantizes while loading, on the device the weights land on: this rank's GPU.
            extra["device_map"] = {"": int(os.environ.get("LOCAL_RANK", "0"))}
    check_local(cfg.path, "model.path")
    try:
        model = auto_class.from_pretrained(
            cfg.path,
            dtype=torch_dtype(cfg.dtype),
            attn_implementation=cfg.attn_implementation,
            trust_remote_code=cfg.trust_remote_code,
            **extra,
        )
    except LOAD_ERRORS as err:
        kind = "a causal LM" if head == "causal_lm" else "a model with a score head"
        raise ModelError(f"model.path: cannot load {kind} from '{cfg.path}': {first_line(err)}") from None
    if tokenizer is not None:
        embedding = model.get_input_embeddings()
        # num_embeddings, not the weight's shape: ZeRO-3 partitions the weight while loading.
        rows = getattr(embedding, "num_embeddings", None) or embedding.weight.shape[0]
        if len(tokenizer) > rows:
            raise ModelError(f"model.tokenizer: the tokenizer has {len(tokenizer)} tokens but the model's embedding has {rows} rows; "
                             "use the model's own tokenizer")
        if model.config.pad_token_id is None:
            model.config.pad_token_id = tokenizer.pad_token_id
    if bnb_config is not None and bnb_config.load_in_4bit:
        one_4bit_compute_path(model)
    return model


def one_4bit_compute_path(model: torch.nn.Module) -> None:
    """Make every 4-bit layer compute the same way in training, evaluation and export checks.

    On CPUs with AVX-512 BF16, bitsandbytes repacks a ``Linear4bit``'s weight the first time it
    runs in eval mode without grad, and from then on multiplies through a bf16 kernel, in eval and
    afterwards in training too (that kernel has no autograd). The model that was trained would
    then depend on when an evaluation happened and on the CPU, the faithful merge could not
    reproduce it, and the repacked weights cannot be saved from float storage. The per-layer
    switch keeps the dequantize-then-matmul path that training uses on every CPU (and on GPU,
    where it does not apply).
    """
    import bitsandbytes as bnb

    for module in model.modules():
        if isinstance(module, bnb.nn.Linear4bit):
            module.support_avx512bf16_for_cpu = False


def compute_in_float32(model: torch.nn.Module) -> torch.nn.Module:
    """The same trained model computing in float32: every floating tensor upcast (values unchanged),
    each 4-bit layer replaced by a float32 linear holding the weight its matmul used in training
    (bitsandbytes dequantizes into the compute dtype, so the NF4 values rounded to it).

    Export verification compares the float32 merge with the model as trained; evaluated in the
    recipe's bf16, that comparison would measure bf16 noise (about 1% of a logit), not the merge.
    """
    bnb = sys.modules.get("bitsandbytes")  # not imported: no 4-bit layers
    if bnb is not None:
        import copy

        for name, module in list(model.named_modules()):
            if isinstance(module, bnb.nn.Linear4bit):
                state = copy.copy(module.weight.quant_state)
                state.dtype = module.compute_dtype or state.dtype
                linear = torch.nn.Linear(module.in_features, module.out_features, bias=module.bias is not None)
                linear.weight.data = bnb.functional.dequantize_4bit(module.weight.data, state).float()
                if module.bias is not None:
                    linear.bias.data = module.bias.data.float()
                parent, _, child = name.rpartition(".")
                setattr(model.get_submodule(parent), child, linear.requires_grad_(False))
    for tensor in [*model.parameters(), *model.buffers()]:
        if tensor.is_floating_point() and tensor.dtype != torch.float32:
            tensor.data = tensor.data.float()
    return model


def apply_method(model: PreTrainedModel, method: MethodSection, gradient_checkpointing: bool,
                 upcast_unquantized: bool = True, head: str = "causal_lm") -> PreTrainedModel:
    """Make the right parameters trainable: LoRA adapters, or the base minus frozen patterns."""
    if getattr(model, "is_quantized", False) and upcast_unquantized:
        from peft import prepare_model_for_kbit_training

        # QLoRA's recipe: freeze the base, keep norms/embeddings/head in fp32, make inputs require grad.
        model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=False)
    elif getattr(model, "is_quantized", False):
        model.requires_grad_(False)  # the frozen base as loaded (inputs get grads in _wrap_lora)
    if gradient_checkpointing:
        _enable_checkpointing(model)
    if method.type in ("lora", "qlora"):
        return _wrap_lora(model, method, HEADS[head][1])
    freeze_patterns(model, method.freeze)
    if not any(p.requires_grad for p in model.parameters()):
        raise ModelError("method.freeze: the patterns freeze every parameter; nothing would be trained")
    return model


def _wrap_lora(model: PreTrainedModel, method: MethodSection, task_type: str = "CAUSAL_LM") -> PreTrainedModel:
    from peft import LoraConfig, get_peft_model

    lora = method.lora
    config = LoraConfig(
        r=lora.r,
        lora_alpha=lora.alpha,
        lora_dropout=lora.dropout,
        target_modules=lora.target_modules,
        modules_to_save=lora.modules_to_save or None,
        use_rslora=lora.use_rslora,
        use_dora=lora.use_dora,
        task_type=task_type,
    )
    names = {name for name, _ in model.named_modules()}
    for module in lora.modules_to_save:
        if not any(name == module or name.endswith("." + module) for name in names):
            raise ModelError(f"method.lora.modules_to_save: the model has no module named '{module}' (e.g. lm_head, embed_tokens)")
    try:
        peft_model = get_peft_model(model, config, autocast_adapter_dtype=lora.dtype == "float32")
    except ValueError as err:
        raise ModelError(f"method.lora.target_modules: {first_line(err)}") from None
    if _is_checkpointing(model):
        # The frozen embeddings produce no grad; without this, checkpointed blocks see no input grad.
        peft_model.enable_input_require_grads()
    return peft_model


def _enable_checkpointing(model: PreTrainedModel) -> None:
    """Non-reentrant activation checkpointing (transformers 5 renamed the method; 4.x has the old name)."""
    kwargs = {"use_reentrant": False}
    if callable(getattr(model, "activation_checkpointing_enable", None)):
        model.activation_checkpointing_enable(activation_checkpointing_kwargs=kwargs)
    else:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs=kwargs)
    model.config.use_cache = False


def _is_checkpointing(model: PreTrainedModel) -> bool:
    if getattr(model, "is_activation_checkpointing", None) is not None:
        return bool(model.is_activation_checkpointing)
    return bool(getattr(model, "is_gradient_checkpointing", False))


def compile_layers(model: torch.nn.Module) -> None:
    """``train.compile``: each decoder layer compiled in place, as torchtune and torchtitan do.
    The layers share their code, so one graph serves them all; state-dict names do not change."""
    for layer in decoder_layers(model, "train.compile:", "set train.compile: false for this architecture"):
        layer.compile()


def freeze_patterns(model: torch.nn.Module, patterns: list[str]) -> None:
    names = [name for name, _ in model.named_parameters()]
    for pattern in patterns:
        matched = [n for n in names if fnmatch.fnmatchcase(n, pattern)]
        if not matched:
            example = names[min(2, len(names) - 1)]
            raise ModelError(f"method.freeze: pattern '{pattern}' matches no parameter (names look like '{example}')")
    for name, param in model.named_parameters():
        if any(fnmatch.fnmatchcase(name, p) for p in patterns):
            param.requires_grad_(False)


def parameter_count(param: torch.Tensor) -> int:
    """Parameters a tensor holds: a bitsandbytes 4-bit weight packs two per byte (its ``numel`` is half
    the layer's parameters), and its quantization state knows the layer's shape."""
    state = getattr(param, "quant_state", None)
    return math.prod(state.shape) if state is not None and getattr(state, "shape", None) else param.numel()


def build_model(recipe: Recipe) -> tuple[PreTrainedModel, Any]:
    """Tokenizer and trainable model for ``recipe``."""
    head = objectives.for_recipe(recipe).head
    tokenizer = load_tokenizer(recipe.model)
    model = load_base_model(recipe.model, tokenizer, recipe.quantization, head)
    model = apply_method(model, recipe.method, recipe.train.gradient_checkpointing, recipe.quantization.upcast_unquantized, head)
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    total = sum(parameter_count(p) for p in model.parameters())
    log.info("trainable parameters: %d of %d (%.2f%%)", trainable, total, 100 * trainable / max(total, 1))
    return model, tokenizer


def _cached(name: str) -> bool:
    """Whether a hub id is in the Hugging Face cache (ftl never downloads while loading for inference)."""
    try:
        from huggingface_hub import snapshot_download

        snapshot_download(name, local_files_only=True, allow_patterns=["config.json"])
        return True
    except Exception:
        return False


def load_for_inference(
    path: str | Path, dtype: torch.dtype = torch.float32, trust_remote_code: bool = False
) -> tuple[PreTrainedModel, Any]:
    """Load a saved checkpoint (full model or PEFT adapter) or a base model for generation.

    An adapter checkpoint inside a run directory is attached to the base loaded exactly as in
    training (the run's ``run.yaml``): a QLoRA adapter on a freshly quantized base, since on
    the full-precision base it computes something else. A run directory may be someone else's:
    its recipe's ``model.trust_remote_code`` (which imports the model's Python files) is honoured
    only when the caller passes ``trust_remote_code`` (``--trust-remote-code`` on the command).
    """
    path = Path(path)
    check_local(str(path), str(path))
    try:
        if (path / "adapter_config.json").exists():
            from peft import PeftModel

            from ftl.checkpoints.rundir import RunDir

            run = RunDir.of_checkpoint(path)
            recipe_file = run.recipe_to_read if run is not None else None
            if recipe_file is not None:
                from ftl.recipe.load import load_recipe

                recipe = load_recipe(recipe_file)
                if recipe.model.trust_remote_code and not trust_remote_code:
                    raise ModelError(
                        f"{recipe_file}: model.trust_remote_code is true, so loading this run would run Python files "
                        "that come with its model; pass --trust-remote-code if you trust them"
                    )
                base = load_base_model(recipe.model, quant=recipe.quantization, head=head_of(path))
            else:
                from peft import PeftConfig

                base_path = PeftConfig.from_pretrained(path).base_model_name_or_path
                if not Path(base_path).is_dir() and not _cached(base_path):
                    raise ModelError(f"{path}: an adapter of '{base_path}', which is neither a local directory nor in the "
                                     "Hugging Face cache; load the merged export (`ftl export` without --adapter-only) or "
                                     "the run's checkpoint instead, or run from where that base is")
                auto_class, _, head_kwargs = HEADS[head_of(path)]
                base = auto_class.from_pretrained(base_path, dtype=dtype, **head_kwargs)
            model = PeftModel.from_pretrained(base, path)
            # an --adapter-only export ships no tokenizer: the base's
            tokenizer_path = path if (path / "tokenizer_config.json").is_file() else model.peft_config["default"].base_model_name_or_path
        else:
            model = HEADS[head_of(path)][0].from_pretrained(path, dtype=dtype)
            tokenizer_path = path
        tokenizer = AutoTokenizer.from_pretrained(tokenizer_path)
    except LOAD_ERRORS as err:
        raise ModelError(f"{path}: cannot load a model for inference: {first_line(err)}") from None
    set_pad_token(tokenizer)
    if getattr(model.config, "pad_token_id", None) is None:  # a score head reads each row's last real token by it
        model.config.pad_token_id = tokenizer.pad_token_id
    return model.eval(), tokenizer
