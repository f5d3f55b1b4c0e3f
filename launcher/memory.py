"""Per-device GPU memory estimate of a recipe, and the strategy/micro-batch choice it implies.

Users learn that a job does not fit by an OOM after queueing; this says it before, from the
model's config.json alone (no weights are loaded). Formulas (bytes per device; P = parameters,
N = data-parallel ranks, T = tokens per micro-batch = micro_batch_size x data.max_length):

- weights: P x dtype bytes. QLoRA's 4-bit linear weights cost 4 bits + their block scales: an
  fp32 absmax per 64 weights (+0.5 bit), or with double quantization an 8-bit absmax plus an fp32
  scale per 256 blocks (+0.127 bit). peft's ``prepare_model_for_kbit_training`` keeps everything
  it does not quantize (embeddings, norms, lm_head) in fp32. LoRA adapters are fp32.
- gradients: trainable P x their dtype bytes.
- optimizer: AdamW keeps two states per trainable parameter in its dtype (8-bit AdamW: 1 byte
  each). DeepSpeed with bf16/fp16 keeps an fp32 master copy and fp32 states: 12 bytes, so a
  full fine-tune costs the ZeRO paper's 16 bytes/parameter (2 weight + 2 gradient + 12).
- sharding (each strategy's ``place``, see ``ftl.strategies``): ZeRO-1 divides the optimizer by N, ZeRO-2 also the gradients, ZeRO-3 and FSDP2
  everything (plus two layers gathered at a time); offloaded parts move to CPU memory.
- activations: per layer and token, the tensors kept for backward by a Llama-style block in the
  compute dtype: 4 x hidden (norm in/out twice) + 3 x (q + kv widths) (projections, RoPE,
  attention output) + 4 x intermediate (gate, up, SiLU, product), plus LoRA dropout's copies of
  the adapted inputs. With gradient checkpointing only each layer's input stays, and one layer is
  recomputed at a time. Eager attention adds the heads x seq x seq score matrices (SDPA does not).
  The loss adds the logits: T x vocab x (compute bytes + 4 for the fp32 copy + 4 for its gradient);
  with the fused cross-entropy (``kernels``) only one chunk of them (``chunk_size``: about
  T x hidden / vocab tokens), plus the hidden states' gradient (T x hidden) that it stores.
- preference objectives: each row is two sequences (chosen and rejected) in one forward, so twice
  the activations of a row; full fine-tuning with dpo/ipo adds a frozen reference copy of the
  weights, placed as the policy's (divided over the processes by ZeRO-3 and FSDP2); the reference
  forward of LoRA runs the same weights without grad and keeps nothing.
- margin: 10% of the total plus 1 GiB (CUDA context, allocator fragmentation) before a run is
  said to fit.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from ftl import strategies
from ftl.config import Recipe
from ftl.units import parse_gib
from ftl.errors import UserError

GIB = 2**30
BYTES = {"float32": 4, "bfloat16": 2, "float16": 2}
LINEARS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
MARGIN_FRACTION, MARGIN_GIB = 0.10, 1.0

# Architectures of common hub models, for planning on a machine that cannot download config.json.
KNOWN_SHAPES = {
    "llama-3.1-8b": dict(hidden=4096, intermediate=14336, layers=32, heads=32, kv_heads=8, head_dim=128, vocab=128256, tied=False),
    "llama-3.1-70b": dict(hidden=8192, intermediate=28672, layers=80, heads=64, kv_heads=8, head_dim=128, vocab=128256, tied=False),
    "qwen2.5-7b": dict(hidden=3584, intermediate=18944, layers=28, heads=28, kv_heads=4, head_dim=128, vocab=152064, tied=False),
    "mistral-7b": dict(hidden=4096, intermediate=14336, layers=32, heads=32, kv_heads=8, head_dim=128, vocab=32768, tied=False),
}


@dataclass(frozen=True)
class Shape:
    hidden: int
    intermediate: int
    layers: int
    heads: int
    kv_heads: int
    head_dim: int
    vocab: int
    tied: bool

    def linears(self) -> dict[str, tuple[int, int]]:
        """(in, out) features of each linear layer in one decoder block."""
        d, q, kv, i = self.hidden, self.heads * self.head_dim, self.kv_heads * self.head_dim, self.intermediate
        return {"q_proj": (d, q), "k_proj": (d, kv), "v_proj": (d, kv), "o_proj": (q, d),
                "gate_proj": (d, i), "up_proj": (d, i), "down_proj": (i, d)}

    @property
    def linear_params(self) -> int:
        return self.layers * sum(a * b for a, b in self.linears().values())

    @property
    def other_params(self) -> int:
        """Embeddings, lm_head (unless tied) and norms: never quantized."""
        return self.vocab * self.hidden * (1 if self.tied else 2) + (2 * self.layers + 1) * self.hidden

    @property
    def params(self) -> int:
        return self.linear_params + self.other_params


def shape_from_config(config: Any) -> Shape:
    heads = config.num_attention_heads
    return Shape(
        hidden=config.hidden_size,
        intermediate=config.intermediate_size,
        layers=config.num_hidden_layers,
        heads=heads,
        kv_heads=getattr(config, "num_key_value_heads", None) or heads,
        head_dim=getattr(config, "head_dim", None) or config.hidden_size // heads,
        vocab=config.vocab_size,
        tied=bool(getattr(config, "tie_word_embeddings", False)),
    )


def model_shape(path: str) -> Shape:
    """The architecture of ``model.path``: its config.json (local or cached), else a known hub model."""
    from transformers import AutoConfig

    try:  # never the network: a plan must answer at once
        return shape_from_config(AutoConfig.from_pretrained(path, local_files_only=True))
    except (OSError, ValueError, AttributeError) as err:
        name = path.rstrip("/").split("/")[-1].lower().removesuffix("-instruct")
        if name in KNOWN_SHAPES:
            return Shape(**KNOWN_SHAPES[name])
        raise UserError(f"model.path: cannot read the config.json of '{path}' to estimate memory ({str(err).splitlines()[0]}); "
                        f"download the model or plan a recipe that points at a local copy") from None


@dataclass
class Estimate:
    """GiB per device, by part; ``cpu`` is what offloading keeps in host memory per process."""

    weights: float
    gradients: float
    optimizer: float
    activations: float
    cpu: float

    @property
    def total(self) -> float:
        return self.weights + self.gradients + self.optimizer + self.activations

    @property
    def with_margin(self) -> float:
        return self.total * (1 + MARGIN_FRACTION) + MARGIN_GIB

    def fits(self, gpu_gib: float) -> bool:
        return self.with_margin <= gpu_gib

    def table(self) -> dict[str, float]:
        return {"weights": self.weights, "gradients": self.gradients, "optimizer": self.optimizer,
                "activations": self.activations, "total": self.total, "with margin": self.with_margin, "cpu (offload)": self.cpu}


def _lora_targets(recipe: Recipe) -> list[str]:
    targets = recipe.method.lora.target_modules
    if targets == "all-linear":
        return list(LINEARS)
    names = [targets] if isinstance(targets, str) else targets
    return [n for n in LINEARS if any(n == t or n.endswith(t) for t in names)]


def estimate(recipe: Recipe, shape: Shape, strategy: str | None = None, micro_batch_size: int | None = None) -> Estimate:
    """Peak GPU memory per device of ``recipe`` (optionally with another strategy or micro-batch)."""
    chosen = strategies.build(strategy or recipe.strategy, recipe)
    mb = micro_batch_size or recipe.train.micro_batch_size
    method, quant, train = recipe.method, recipe.quantization, recipe.train
    model_bytes = BYTES.get(recipe.model.dtype, 2)
    mixed = train.mixed_precision != "no"
    compute_bytes = 2 if mixed or model_bytes == 2 else 4
    master = chosen.fp32_master and mixed
    if master:
        model_bytes = 2  # e.g. DeepSpeed's bf16/fp16 mode casts the module; fp32 lives in its optimizer

    # Parameters: how many are trained, and the bytes of trainable and frozen weights.
    if method.type == "full":
        trainable, trainable_bytes, frozen_bytes = shape.params, shape.params * model_bytes, 0.0
    else:
        lora = method.lora
        linears = shape.linears()
        trainable = shape.layers * sum(lora.r * (linears[n][0] + linears[n][1]) + (linears[n][1] if lora.use_dora else 0)
                                       for n in _lora_targets(recipe))
        trainable_bytes = trainable * (model_bytes if master else 4.0)  # peft keeps adapters in fp32
        kept_bytes = model_bytes
        if quant.bits == 4:
            bits = 4 + (8 / 64 + 32 / (64 * 256) if quant.double_quant else 32 / 64)
            kept_bytes = 4  # prepare_model_for_kbit_training upcasts what is not quantized
            frozen_bytes = shape.linear_params * bits / 8 + shape.other_params * kept_bytes
        elif quant.bits == 8:
            kept_bytes = 4
            row_scales = shape.layers * sum(o for _, o in linears.values()) * 4
            frozen_bytes = shape.linear_params + row_scales + shape.other_params * kept_bytes
        else:
            frozen_bytes = shape.params * model_bytes
        for name in lora.modules_to_save:  # a trainable copy next to the frozen original
            copy = shape.vocab * shape.hidden if name in ("lm_head", "embed_tokens") else 0
            trainable += copy
            trainable_bytes += copy * kept_bytes
    weights = trainable_bytes + frozen_bytes
    if method.objective in ("dpo", "ipo") and method.type == "full" and recipe.preference.reference != "precomputed":
        weights += shape.params * model_bytes  # the frozen reference copy
    gradients = trainable_bytes
    if master:
        optimizer = trainable * 12.0  # fp32 master weights + fp32 Adam m and v
    elif train.optimizer in ("adamw_8bit", "paged_adamw_8bit"):
        optimizer = trainable * 2.0
    elif train.optimizer == "paged_adamw_32bit":
        optimizer = trainable * 8.0
    else:
        optimizer = 2.0 * trainable_bytes  # m and v in the parameters' dtype

    # Sharding and offload: the strategy's terms.
    layer_bytes = shape.linear_params / shape.layers * (0.5 if quant.bits == 4 else model_bytes)
    weights, gradients, optimizer, cpu = chosen.place(weights, gradients, optimizer, layer_bytes)

    sequences = mb * (2 if method.objective != "sft" else 1)  # preference rows: chosen and rejected
    activations = _activation_bytes(recipe, shape, sequences, compute_bytes, chosen.uses_fused_ce() and method.objective == "sft")
    return Estimate(weights / GIB, gradients / GIB, optimizer / GIB, activations / GIB, cpu / GIB)


def _activation_bytes(recipe: Recipe, shape: Shape, micro_batch_size: int, compute_bytes: int, fused_ce: bool) -> float:
    seq = recipe.data.max_length
    tokens = micro_batch_size * seq
    d, q, kv, i = shape.hidden, shape.heads * shape.head_dim, shape.kv_heads * shape.head_dim, shape.intermediate
    per_token_layer = 4 * d + 3 * (q + kv) + 4 * i
    if recipe.method.type != "full" and recipe.method.lora.dropout > 0:
        targets = _lora_targets(recipe)
        per_token_layer += sum(shape.linears()[n][0] for n in targets)  # dropout's copy of each adapted input
    layer = per_token_layer * tokens * compute_bytes
    if recipe.model.attn_implementation == "eager":
        layer += 2 * shape.heads * seq * tokens * compute_bytes  # scores and softmax, kept for backward
    if recipe.train.gradient_checkpointing:
        blocks = shape.layers * d * tokens * compute_bytes + layer
    else:
        blocks = shape.layers * layer
    if fused_ce:  # kernels/fused_ce.py: one chunk of logits, and the stored input gradient
        from ftl.kernels.fused_ce import chunk_size

        logits = chunk_size(tokens, d, shape.vocab) * shape.vocab * (compute_bytes + 4 + 4) + tokens * d * compute_bytes
    else:
        logits = tokens * shape.vocab * (compute_bytes + 4 + 4)
    return blocks + logits


def micro_batch_options(recipe: Recipe) -> list[int]:
    """Micro-batch sizes that keep the global batch (micro x accumulation), largest first."""
    batch = recipe.train.micro_batch_size * recipe.train.gradient_accumulation_steps
    return [m for m in range(batch, 0, -1) if batch % m == 0]


def strategy_options(recipe: Recipe) -> list[Recipe]:
    """``recipe`` with each strategy valid for it, cheapest (least communication or offload) first."""
    options = [("single", {})] if recipe.world_size == 1 else [
        ("ddp", {}), ("zero1", {}), ("zero2", {}), ("zero3", {}), ("zero3", {"offload_optimizer": True}),
        ("zero3", {"offload_optimizer": True, "offload_params": True})]
    valid = []
    for strategy, offload in options:
        dist = recipe.distributed
        trial = recipe.model_copy(update={"distributed": dist.model_copy(update={
            "strategy": strategy, "zero": dist.zero.model_copy(update=offload)})})
        if not strategies.for_recipe(trial).check():
            valid.append(trial)
    return valid


def autofit(recipe: Recipe, gpu_gib: float, shape: Shape) -> tuple[Recipe, Estimate, bool]:
    """For ``strategy: auto``: the cheapest strategy that fits at micro-batch 1, then the largest
    micro-batch that still fits (global batch kept). Returns (recipe with the choice, its
    estimate, whether it fits); when nothing fits, the last (most sharded) option at micro-batch 1."""
    options = strategy_options(recipe)
    chosen = next((o for o in options if estimate(o, shape, micro_batch_size=1).fits(gpu_gib)), options[-1])
    batch = recipe.train.micro_batch_size * recipe.train.gradient_accumulation_steps
    sizes = micro_batch_options(recipe)
    mb = next((m for m in sizes if estimate(chosen, shape, micro_batch_size=m).fits(gpu_gib)), 1)
    chosen = chosen.model_copy(update={"train": chosen.train.model_copy(update={
        "micro_batch_size": mb, "gradient_accumulation_steps": batch // mb})})
    result = estimate(chosen, shape)
    return chosen, result, result.fits(gpu_gib)


def fit_recipe(recipe: Recipe, gpu_memory: str | None = None) -> tuple[Recipe, Estimate, float | None]:
    """The recipe to run and its estimate: with GPU memory known (``--gpu-mem`` or
    ``distributed.gpu_memory``) and ``strategy: auto``, strategy and micro-batch are chosen to fit."""
    text = gpu_memory or recipe.distributed.gpu_memory
    gpu_gib = parse_gib(text) if text else None
    if text and not gpu_gib:
        raise UserError(f"--gpu-mem '{text}' is not a size; write e.g. 80GB, 24G or 40960MB")
    shape = model_shape(recipe.model.path)
    if gpu_gib and recipe.distributed.strategy == "auto":
        recipe, result, _ = autofit(recipe, gpu_gib, shape)
        return recipe, result, gpu_gib
    return recipe, estimate(recipe, shape), gpu_gib
