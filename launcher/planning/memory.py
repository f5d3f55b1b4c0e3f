"""Per-device GPU memory estimate of a recipe, and the strategy/micro-batch choice it implies.

Users learn that a job does not fit by an OOM after queueing; this says it before, from the
model's config.json alone (no weights are loaded). Formulas (bytes per device; P = parameters,
N = data-parallel ranks, T = tokens per micro-batch = micro_batch_size x data.max_length). The
published peaks it is held to are in tests/planning/test_memory_reference.py:

- weights: P x dtype bytes. QLoRA's 4-bit linear weights cost 4 bits + their block scales: an
  fp32 absmax per 64 weights (+0.5 bit), or with double quantization an 8-bit absmax plus an fp32
  scale per 256 blocks (+0.127 bit). peft's ``prepare_model_for_kbit_training`` keeps everything
  it does not quantize (embeddings, norms, lm_head) in fp32. LoRA adapters are fp32.
- gradients: trainable P x their dtype bytes.
- optimizer: AdamW keeps two states per trainable parameter in its dtype (8-bit AdamW: 1 byte
  each). DeepSpeed with bf16/fp16 keeps an fp32 master copy and fp32 states: 12 bytes, so a
  full fine-tune costs the ZeRO paper's 16 bytes/parameter (2 weight + 2 gradient + 12).
- sharding (each strategy's ``place``, see ``ftl.distributed.strategies``): ZeRO-1 divides the optimizer by N, ZeRO-2 also the gradients, ZeRO-3 and FSDP2
  everything (plus two layers gathered at a time); offloaded parts move to CPU memory.
- activations (``layer_bytes_per_token``, checked tensor by tensor against a real step by
  ``ftl.planning.probe`` for Llama/Qwen2/Mistral, full/LoRA/QLoRA, with and without checkpointing):
  per layer and token, each RMSNorm's fp32 input; SDPA's q, k, v and output; the MLP's gate, SiLU
  and up outputs; each trained linear's input (cast once per linear under autocast when the
  stream is fp32), and each LoRA adapter's own copy of its input (peft casts it to the adapter's
  fp32, autocast back). Dtypes (``Precision``): QLoRA's kbit preparation makes the residual
  stream and the MLP intermediates fp32; under bf16 autocast fp32 matmul weights get bf16 copies
  (trained ones cached for the whole forward, frozen ones kept per use, lm_head's with the
  logits). With gradient checkpointing only each layer's input stays, and backward recomputes
  one layer at a time; backward through a layer also holds its MLP's and the stream's gradients.
  Eager attention adds the heads x seq x seq score matrices.
- loss: 12 bytes per logit at its peak (fp32 logits, their fp32 log-softmax, its gradient);
  with the fused cross-entropy (``kernels``) one chunk of them plus the hidden states' gradient.
- preference objectives: each row is two sequences (chosen and rejected) in one forward, so twice
  the activations of a row; full fine-tuning with dpo/ipo adds a frozen reference copy of the
  weights, placed as the policy's (divided over the processes by ZeRO-3 and FSDP2).
- the peak is the largest of four phases, each with what is live then: forward (weights,
  optimizer states, gradients held from earlier micro-batches, activations), loss (plus the
  logits), backward (gradients replace activations layer by layer) and the optimizer step (plus
  DeepSpeed's fp32 gradient partition; ftl's fused AdamW makes no temporaries). Paged optimizer
  states are counted as resident (conservative: the QLoRA paper's 65B on 48 GB reads "does not
  fit").
- reserved, what ``nvidia-smi`` shows and what the fit is decided on: the allocated peak plus the
  strategy's allocator slack (10% plain torch, 30% FSDP2, 35% DeepSpeed) plus 0.75 GiB of CUDA context.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable

from ftl import objectives
from ftl.distributed import strategies
from ftl.recipe.schema import Recipe
from ftl.models.families import KNOWN_SHAPES, LINEARS, head_dim, kv_heads
from ftl.precision import BYTES
from ftl.recipe.units import parse_gib
from ftl.errors import UserError

GIB = 2**30
MASK = 1  # bytes per element of a dropout mask: CUDA keeps a bool (CPU: the input dtype)
CONTEXT_GIB = 0.75  # the CUDA context with cuBLAS/cuDNN/NCCL loaded, outside the allocator

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
        kv_heads=kv_heads(config),
        head_dim=head_dim(config),
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
    """GiB per device. ``weights``, ``gradients`` and ``optimizer`` are placed by the strategy,
    ``activations`` is what the decoder keeps for backward at the end of a forward (with autocast's
    weight copies), ``loss`` the logits at the loss step's peak; ``phases`` the allocated total at
    each phase of a step. ``cpu`` is what offloading keeps in host memory per process."""

    weights: float
    gradients: float
    optimizer: float
    activations: float
    loss: float
    cpu: float
    phases: dict[str, float]
    overhead: float  # the strategy's allocator slack: reserved = allocated x (1 + overhead) + context

    @property
    def allocated(self) -> float:
        """What ``torch.cuda.max_memory_allocated`` would report: the largest phase."""
        return max(self.phases.values())

    @property
    def peak_phase(self) -> str:
        return max(self.phases, key=lambda name: self.phases[name])

    @property
    def reserved(self) -> float:
        """What ``nvidia-smi`` shows: the allocator's reserved pool and the CUDA context."""
        return self.allocated * (1 + self.overhead) + CONTEXT_GIB

    def fits(self, gpu_gib: float) -> bool:
        return self.reserved <= gpu_gib

    def table(self) -> dict[str, float]:
        return {"weights": self.weights, "gradients": self.gradients, "optimizer": self.optimizer,
                "activations": self.activations, "loss": self.loss, **{f"phase {k}": v for k, v in self.phases.items()},
                "allocated (peak)": self.allocated, "reserved (nvidia-smi)": self.reserved, "cpu (offload)": self.cpu}


@dataclass(frozen=True)
class Precision:
    """Bytes per element of what a step creates, which depend on more than the compute dtype."""

    compute: int  # matmul and attention outputs: autocast's dtype, else the weights'
    stream: int  # residual stream and norm outputs: the weights' dtype (fp32 once kbit-prepared)
    mlp: int  # gate/up outputs: 4-bit/8-bit layers return their input's dtype (the fp32 stream)
    autocast: bool  # inputs are cast per op (a new copy per consumer)
    weight_copies: bool  # fp32 matmul weights cast to the autocast dtype on every use
    adapter: int  # LoRA adapters (method.lora.dtype)


def precision(recipe: Recipe, chosen: strategies.Strategy) -> Precision:
    """The dtypes a step of ``recipe`` creates its tensors in, under the strategy that runs it."""
    mixed = recipe.train.mixed_precision != "no"
    weights = BYTES.get(recipe.model.dtype, 2)
    if mixed and chosen.module_in_compute_dtype:
        weights = 2  # DeepSpeed casts the module; FSDP2 gathers it in param_dtype
    kbit = recipe.method.type != "full" and recipe.quantization.bits in (4, 8)
    upcast = kbit and recipe.quantization.upcast_unquantized
    stream = 4 if upcast else weights  # prepare_model_for_kbit_training upcasts embeddings and norms
    autocast = mixed and not chosen.module_in_compute_dtype
    compute = 2 if mixed else stream
    return Precision(compute=compute, stream=stream, mlp=stream if kbit else compute, autocast=autocast,
                     weight_copies=autocast and (weights == 4 or upcast), adapter=adapter_bytes(recipe, weights))


@dataclass
class Activations:
    """Bytes of one micro-batch (see the module docstring for each term)."""

    blocks: float  # kept by the decoder for backward at the end of its forward
    copies: float  # autocast's copies of the decoder's fp32 weights, kept from the forward into backward
    layer: float  # backward's working set beyond that: a layer's gradients (and its recomputation)
    loss: float  # the logits at the peak of the loss, and lm_head's weight copy


def _lora_targets(recipe: Recipe) -> list[str]:
    targets = recipe.method.lora.target_modules
    if targets == "all-linear":
        return list(LINEARS)
    names = [targets] if isinstance(targets, str) else targets
    return [n for n in LINEARS if any(n == t or n.endswith(t) for t in names)]


def _adapter_params(recipe: Recipe, shape: Shape) -> int:
    lora, linears = recipe.method.lora, shape.linears()
    return shape.layers * sum(lora.r * (linears[n][0] + linears[n][1]) + (linears[n][1] if lora.use_dora else 0)
                              for n in _lora_targets(recipe))


def adapter_bytes(recipe: Recipe, model_bytes: int) -> int:
    """Bytes per adapter parameter: peft's fp32, or the base's dtype (QLoRA: its compute dtype)."""
    if recipe.method.lora.dtype == "float32":
        return 4
    if recipe.method.type == "qlora" or recipe.quantization.bits in (4, 8):
        return BYTES.get(recipe.quantization.compute_dtype, 2)
    return model_bytes


def _saved_inputs(recipe: Recipe, p: Precision, group: tuple[str, ...], width: int, dtype: int, shared: bool = False) -> float:
    """Bytes per token kept of one input that the linears of ``group`` read (``dtype`` its bytes).

    A trained weight's linear keeps its input (cast once per linear under autocast, or the tensor
    itself, shared); a frozen one keeps nothing. A LoRA adapter's ``lora_A`` keeps the input as
    it multiplies it: the tensor itself when no cast or dropout comes between, else its own copy
    (peft casts to the adapter's dtype, dropout makes a new tensor and a bool mask, autocast casts
    to the compute dtype)."""
    if recipe.method.type == "full":
        if shared:  # the tensor is already kept by the op that made it
            return 0.0
        return (len(group) if p.autocast and dtype != p.compute else 1) * p.compute * width
    adapters = len(set(_lora_targets(recipe)) & set(group))
    if adapters == 0:
        return 0.0
    kept = p.compute if p.autocast else p.adapter  # the dtype lora_A multiplies in
    dropout = recipe.method.lora.dropout > 0
    if not dropout and p.adapter == dtype and kept == dtype:
        return 0.0 if shared else kept * width
    return adapters * (kept + (MASK if dropout else 0)) * width


def layer_bytes_per_token(recipe: Recipe, shape: Shape, p: Precision, seq: int) -> float:
    """What one decoder layer keeps for backward, per token: a Llama/Qwen2/Mistral block as
    transformers runs it (measured tensor by tensor, see ``ftl.planning.probe``)."""
    d, q, kv, i, heads = shape.hidden, shape.heads * shape.head_dim, shape.kv_heads * shape.head_dim, shape.intermediate, shape.heads
    full = recipe.method.type == "full"
    norm = 4 * d + 4 + (p.stream * d if full else 0)  # the fp32 input and 1/rms; the normalised input if the weight trains
    attention = p.compute * (2 * q + 2 * kv) + 4 * heads  # SDPA keeps q, k, v, its output and the log-sum-exp
    if recipe.model.attn_implementation == "eager":
        attention += 2 * heads * seq * p.compute  # scores and their softmax
    mlp = 3 * p.mlp * i  # gate output (SiLU's input), SiLU's output and up's output (the product's inputs)
    inputs = (_saved_inputs(recipe, p, ("q_proj", "k_proj", "v_proj"), d, p.stream)
              + _saved_inputs(recipe, p, ("o_proj",), q, p.compute, shared=True)
              + _saved_inputs(recipe, p, ("gate_proj", "up_proj"), d, p.stream)
              + _saved_inputs(recipe, p, ("down_proj",), i, p.mlp))
    adapters = 0 if full else len(_lora_targets(recipe)) * recipe.method.lora.r * (p.compute if p.autocast else p.adapter)
    if not full and recipe.method.lora.use_dora:  # DoRA rescales the base output (the stream's dtype
        # from a 4-bit layer) and the LoRA output: it keeps both
        adapters += (p.mlp + p.compute) * sum(shape.linears()[n][1] for n in _lora_targets(recipe))
    return 2 * norm + attention + mlp + inputs + adapters


def activation_terms(recipe: Recipe, shape: Shape, tokens: int, seq: int, p: Precision, fused_ce: bool) -> Activations:
    """What a micro-batch of ``tokens`` (rows of ``seq``) holds beyond weights, gradients and optimizer states."""
    d, v = shape.hidden, shape.vocab
    full = recipe.method.type == "full"
    layer = layer_bytes_per_token(recipe, shape, p, seq) * tokens
    final_norm = (4 * d + 4 + (p.stream * d if full else 0)) * tokens
    output = p.stream * d * tokens  # the decoder's output (each checkpointed layer's input likewise)
    layer_weights = shape.linear_params / shape.layers
    head = v * d
    copies = recompute_copies = 0.0
    head_copy = 0.0  # lm_head's (kept with the logits)
    if p.weight_copies and full:  # trained weights: cached by autocast for the whole forward
        copies, head_copy = 2.0 * shape.linear_params, 2.0 * head
    elif p.weight_copies:  # frozen fp32 weights: a copy kept by each linear whose input needs a gradient
        per_layer = 0.0 if recipe.quantization.bits in (4, 8) else 2.0 * layer_weights
        if recipe.train.gradient_checkpointing:
            recompute_copies = per_layer  # only the layer being recomputed
        else:
            copies = per_layer * shape.layers
        head_copy = 2.0 * head
    if not full and p.autocast and p.adapter != p.compute:
        copies += 2.0 * _adapter_params(recipe, shape)  # the adapters' bf16 copies, cached by autocast
    rotary = 2 * shape.head_dim * p.stream * tokens  # cos and sin, shared by the layers
    # Backward through a layer holds the gradients of its MLP activations and of the stream;
    # DoRA's weight norm makes an fp32 W + BA of each adapted linear.
    gradients = (3 * p.compute * shape.intermediate + 2 * p.stream * d) * tokens
    if not full and recipe.method.lora.use_dora:
        gradients += 4.0 * sum(a * b for n, (a, b) in shape.linears().items() if n in _lora_targets(recipe))
    if recipe.train.gradient_checkpointing:
        blocks, backward_layer = shape.layers * output + final_norm + output + rotary, layer + recompute_copies + gradients
    else:
        blocks, backward_layer = shape.layers * layer + final_norm + output + rotary, gradients
    if fused_ce:  # kernels/fused_ce.py: one chunk of logits, and the stored input gradient
        from ftl.kernels.fused_ce import chunk_size

        loss = chunk_size(tokens, d, v) * v * (p.compute + 4 + 4) + tokens * d * p.compute
    else:  # fp32 logits, their fp32 log-softmax (kept for backward) and its gradient
        loss = tokens * v * 12.0
    loss += head_copy
    return Activations(blocks=blocks, copies=copies, layer=backward_layer, loss=loss)


def _optimizer_bytes(recipe: Recipe, trainable: int, trainable_bytes: float, master: bool) -> tuple[float, float]:
    """(states, the step's temporaries): DeepSpeed steps on an fp32 copy of its gradient partition;
    torch's fused AdamW (``ftl.training.optim``) and bitsandbytes step in place."""
    optimizer = recipe.train.optimizer
    if master:
        return trainable * 12.0, trainable * 4.0  # fp32 master weights + fp32 Adam m and v
    if optimizer in ("adamw_8bit", "paged_adamw_8bit"):
        return trainable * 2.0, 0.0
    if optimizer == "paged_adamw_32bit":
        return trainable * 8.0, 0.0
    return 2.0 * trainable_bytes, 0.0  # m and v in the parameters' dtype


def estimate(recipe: Recipe, shape: Shape, strategy: str | None = None, micro_batch_size: int | None = None,
             max_length: int | None = None) -> Estimate:
    """Peak GPU memory per device of ``recipe`` (optionally with another strategy, micro-batch or
    sequence length)."""
    chosen = strategies.build(strategy or recipe.strategy, recipe)
    mb = micro_batch_size or recipe.train.micro_batch_size
    seq = max_length or recipe.data.max_length
    method, quant, train = recipe.method, recipe.quantization, recipe.train
    model_bytes = BYTES.get(recipe.model.dtype, 2)
    mixed = train.mixed_precision != "no"
    master = chosen.fp32_master and mixed
    if master:
        model_bytes = 2  # e.g. DeepSpeed's bf16/fp16 mode casts the module; fp32 lives in its optimizer

    # Parameters: how many are trained, and the bytes of trainable and frozen weights.
    if method.type == "full":
        trainable, trainable_bytes, frozen_bytes = shape.params, shape.params * model_bytes, 0.0
    else:
        lora = method.lora
        linears = shape.linears()
        trainable = _adapter_params(recipe, shape)
        trainable_bytes = trainable * (model_bytes if master else adapter_bytes(recipe, model_bytes))
        # prepare_model_for_kbit_training upcasts what is not quantized (unless told not to)
        kept_bytes = 4 if quant.bits in (4, 8) and quant.upcast_unquantized else model_bytes
        if quant.bits == 4:
            bits = 4 + (8 / 64 + 32 / (64 * 256) if quant.double_quant else 32 / 64)
            frozen_bytes = shape.linear_params * bits / 8 + shape.other_params * kept_bytes
        elif quant.bits == 8:
            row_scales = shape.layers * sum(o for _, o in linears.values()) * 4
            frozen_bytes = shape.linear_params + row_scales + shape.other_params * kept_bytes
        else:
            frozen_bytes = shape.params * model_bytes
        for name in lora.modules_to_save:  # a trainable copy next to the frozen original
            copy = shape.vocab * shape.hidden if name in ("lm_head", "embed_tokens") else 0
            trainable += copy
            trainable_bytes += copy * kept_bytes
    weights = trainable_bytes + frozen_bytes
    objective = objectives.for_recipe(recipe)
    if objective.reference_copy(recipe):
        weights += shape.params * model_bytes  # the frozen reference copy
    gradients = trainable_bytes
    optimizer, step_temp = _optimizer_bytes(recipe, trainable, trainable_bytes, master)

    # Sharding and offload: the strategy's terms (its temporaries shard and move with its states).
    layer_bytes = shape.linear_params / shape.layers * (0.5 if quant.bits == 4 else model_bytes)
    unsharded_optimizer = optimizer
    weights, gradients, optimizer, cpu = chosen.place(weights, gradients, optimizer, layer_bytes)
    step_temp *= optimizer / unsharded_optimizer if unsharded_optimizer else 0.0

    sequences = mb * objective.sequences_per_row  # preference rows: chosen and rejected
    p = precision(recipe, chosen)
    act = activation_terms(recipe, shape, sequences * seq, seq, p, chosen.uses_fused_ce() and objective.fused_ce)
    resident = weights + optimizer
    held = gradients if train.gradient_accumulation_steps > 1 else 0.0  # earlier micro-batches' gradients
    forward = resident + held + act.blocks + act.copies
    phases = {"forward": forward, "loss": forward + act.loss,
              "backward": resident + max(held + act.blocks + act.copies + act.layer, gradients),
              "optimizer step": resident + gradients + step_temp}
    return Estimate(weights / GIB, gradients / GIB, optimizer / GIB, (act.blocks + act.copies) / GIB, act.loss / GIB,
                    cpu / GIB, {k: v / GIB for k, v in phases.items()}, chosen.allocator_overhead)


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


def _largest(fits: Callable[[int], bool], low: int, high: int) -> int | None:
    """The largest n in [low, high] with fits(n), for fits that is true up to some n (bisection)."""
    if not fits(low):
        return None
    while low < high:
        mid = (low + high + 1) // 2
        low, high = (mid, high) if fits(mid) else (low, mid - 1)
    return low


def largest_fit(recipe: Recipe, gpu_gib: float, shape: Shape) -> dict[str, int | None]:
    """What to ask for before renting a GPU: the largest micro-batch at ``data.max_length``, and
    the longest ``data.max_length`` at the recipe's micro-batch, whose reserved estimate fits."""
    return {
        "micro_batch_size": _largest(lambda m: estimate(recipe, shape, micro_batch_size=m).fits(gpu_gib), 1, 4096),
        "max_length": _largest(lambda n: estimate(recipe, shape, max_length=n).fits(gpu_gib), 1, 1 << 20),
    }


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
