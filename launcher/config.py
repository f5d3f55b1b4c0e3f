"""The recipe: one YAML file that describes a whole run.

Loading a recipe goes YAML file -> CLI overrides (``a.b.c=value``) -> pydantic schema. Every error
is turned into a :class:`RecipeError` whose lines name the key path, the YAML line it came from and
what to do, so a user never sees a traceback for a typo. Later sections (quantization,
distributed, slurm, export) slot in as new sub-models of :class:`Recipe`.
"""

from __future__ import annotations

import importlib.util
import re
from pathlib import Path
from typing import Annotated, Any, Literal

import yaml
from pydantic import AfterValidator, AliasChoices, BaseModel, ConfigDict, Field, StringConstraints, ValidationError, field_validator

from ftl import recipe_yaml
from ftl.errors import UserError


class RecipeError(UserError):
    """A recipe problem the user can fix; ``str()`` is one line per problem."""

    def __init__(self, problems: list[str]):
        self.problems = problems
        super().__init__("\n".join(problems))


# What must never reach a path or a shell line: a newline ends a comment or #SBATCH line.
CONTROL_CHARS = re.compile(r"[\x00-\x1f\x7f]")


def _plain_path(value: str) -> str:
    if CONTROL_CHARS.search(value):
        raise ValueError("control characters (newlines, tabs) are not allowed in a path")
    return value


# A path or name of a file, directory or hub id: never empty ('' would mean the current directory).
PathText = Annotated[str, StringConstraints(min_length=1), AfterValidator(_plain_path)]


class _Section(BaseModel):
    # Every float must be finite: inf or nan trains on nonsense and exits 0.
    model_config = ConfigDict(extra="forbid", populate_by_name=True, allow_inf_nan=False)


# ----------------------------------------------------------------------------- sections


class ModelSection(_Section):
    path: PathText = Field(description="Local directory or Hugging Face hub id of the base model.")
    tokenizer: PathText | None = Field(None, description="Tokenizer path if it differs from model.path.")
    dtype: Literal["float32", "bfloat16", "float16", "auto"] = "bfloat16"
    attn_implementation: Literal["sdpa", "eager", "flash_attention_2"] | None = "sdpa"
    trust_remote_code: bool = False


class DataSource(_Section):
    path: PathText = Field(description="A local .json/.jsonl/.parquet file or directory, or a datasets name.")
    format: Literal["alpaca", "chat", "completion"] = "alpaca"
    split: str = "train"
    subset: str | None = Field(None, description="datasets configuration name (for hub datasets).")
    weight: float = Field(1.0, gt=0, le=1000, description="Mixing: rows drawn per epoch = weight x the source's rows (repeats above 1).")
    samples: int | None = Field(None, ge=1, le=100_000_000, description="Mixing: exactly this many rows per epoch (overrides weight).")
    fields: dict[str, str] = Field(
        default_factory=dict,
        description="Map from the format's field names to the columns of this source, "
        "e.g. {instruction: question, output: answer}.",
    )

    @field_validator("fields")
    @classmethod
    def _known_fields(cls, fields: dict[str, str]) -> dict[str, str]:
        known = {"instruction", "input", "output", "messages", "text", "role", "content"}
        for key in fields:
            if key not in known:
                raise ValueError(f"unknown field '{key}' in fields mapping; known: {', '.join(sorted(known))}")
        return fields


class DataSection(_Section):
    train: list[DataSource] = Field(min_length=1)
    eval: list[DataSource] | None = None
    max_length: int = Field(2048, ge=8, le=1 << 20)
    mask_prompt: bool = Field(True, description="Train only on responses (assistant turns); -100 elsewhere.")
    add_eos: bool = Field(True, description="Append the EOS token to alpaca/completion examples.")
    packing: bool = Field(False, description="Pack several examples into each max_length row (attention never crosses them).")
    eval_fraction: float | None = Field(None, gt=0, lt=1, description="Hold out this fraction of the train rows for eval.")
    cache_dir: PathText | None = Field(None, description="Where tokenized/packed data is cached; default <output.dir>/data.")
    streaming: bool = Field(False, description="Read and tokenize the train source lazily (data larger than memory).")

    @field_validator("train", "eval", mode="before")
    @classmethod
    def _one_or_many(cls, value: Any) -> Any:
        return [value] if isinstance(value, dict) else value


class LoraSection(_Section):
    r: int = Field(16, ge=1, le=65536, validation_alias=AliasChoices("r", "rank"))
    alpha: float = Field(32, gt=0)
    dropout: float = Field(0.05, ge=0, lt=1)
    target_modules: str | list[str] = "all-linear"
    modules_to_save: list[str] = Field(default_factory=list)
    use_rslora: bool = False
    use_dora: bool = False


class MethodSection(_Section):
    type: Literal["full", "lora", "qlora"] = "lora"
    lora: LoraSection = Field(default_factory=LoraSection)
    freeze: list[str] = Field(
        default_factory=list,
        description="Full fine-tuning only: glob patterns of parameter names to keep frozen, "
        "e.g. 'model.embed_tokens.*' or 'model.layers.0.*'.",
    )



class QuantizationSection(_Section):
    bits: Literal[4, 8] | None = Field(None, description="Load the frozen base in 4 or 8 bits (bitsandbytes).")
    quant_type: Literal["nf4", "fp4"] = "nf4"
    double_quant: bool = Field(True, description="Quantize the 4-bit block scales too (~0.37 bits/parameter saved).")
    compute_dtype: Literal["bfloat16", "float16", "float32"] = "bfloat16"
    quant_storage: Literal["uint8", "bfloat16", "float16", "float32"] = Field(
        "uint8", description="Element type that packs 4-bit weights; bfloat16 lets ZeRO-3/FSDP shard them."
    )
    skip_modules: list[str] = Field(default_factory=lambda: ["lm_head"], description="Modules kept in full precision.")


class TrainSection(_Section):
    epochs: float = Field(1.0, gt=0, le=100_000)
    max_steps: int | None = Field(None, ge=1, le=10**9, description="Optimizer steps; overrides epochs when set.")
    micro_batch_size: int = Field(1, ge=1, le=1 << 16)
    gradient_accumulation_steps: int = Field(1, ge=1, le=1 << 16)
    learning_rate: float = Field(2e-4, gt=0)
    lr_scheduler: Literal["linear", "cosine", "constant"] = "cosine"
    warmup_steps: int | None = Field(None, ge=0, le=10**9)
    warmup_ratio: float = Field(0.0, ge=0, le=1)
    weight_decay: float = Field(0.0, ge=0)
    adam_beta1: float = Field(0.9, ge=0, lt=1)
    adam_beta2: float = Field(0.999, ge=0, lt=1)
    adam_epsilon: float = Field(1e-8, gt=0)
    max_grad_norm: float | None = Field(1.0, gt=0)
    seed: int = Field(42, ge=0, lt=2**32, description="Seeds Python, NumPy and torch (0 to 2**32 - 1).")
    eval_steps: int | None = Field(None, ge=1, le=10**9, description="Evaluate every N optimizer steps (and at the end).")
    save_steps: int | None = Field(None, ge=1, le=10**9, description="Checkpoint every N optimizer steps (and at the end).")
    logging_steps: int = Field(1, ge=1, le=10**9)
    gradient_checkpointing: bool = False
    mixed_precision: Literal["no", "bf16", "fp16"] = "no"
    resume: str = Field(
        "auto",
        description="auto: continue from the run directory's newest complete checkpoint if there is one; "
        "never: start fresh; or the path of a checkpoint directory.",
    )
    optimizer: Literal["adamw_torch", "adamw_8bit", "paged_adamw_8bit", "paged_adamw_32bit"] = "adamw_torch"
    peak_tflops: float | None = Field(None, gt=0, description="Peak TFLOP/s of one device, for MFU (default: known GPUs).")


class OutputSection(_Section):
    dir: PathText = Field(description="The run directory: resolved recipe, metrics, checkpoints.")
    overwrite: bool = Field(
        False, description="With train.resume: never, allow starting over in a run directory that has checkpoints."
    )
    keep_last: int | None = Field(None, ge=1, le=1_000_000, description="Keep only the newest K checkpoints (older ones are deleted after a new one is complete).")
    report_to: list[Literal["tensorboard", "wandb"]] = Field(
        default_factory=lambda: ["tensorboard"],
        description="Where metrics go besides metrics.jsonl: TensorBoard (<dir>/tensorboard) and/or Weights & Biases.",
    )
    wandb_project: str = Field("ftl", description="W&B project (with report_to: [wandb]; WANDB_MODE=offline works without network).")
    run_name: str | None = Field(None, description="Run name for W&B; default the run directory's name.")


class ZeroSection(_Section):
    offload_optimizer: bool = Field(False, description="Keep optimizer states (and the step) on CPU (DeepSpeed's cpu_adam).")
    offload_params: bool = Field(False, description="ZeRO-3 only: keep parameters on CPU between uses.")
    gather_16bit_weights_on_model_save: bool = Field(
        True, description="ZeRO-3: gather full weights on rank 0 at every checkpoint (needed for a loadable model in it)."
    )
    overlap_comm: bool = True
    contiguous_gradients: bool = True
    reduce_bucket_size: int = Field(500_000_000, ge=1, le=1 << 40)
    allgather_bucket_size: int = Field(500_000_000, ge=1, le=1 << 40)
    stage3_prefetch_bucket_size: int = Field(50_000_000, ge=1, le=1 << 40)
    stage3_param_persistence_threshold: int = Field(100_000, ge=0, le=1 << 40)


class FsdpSection(_Section):
    reshard_after_forward: bool = Field(True, description="Free gathered parameters after forward (ZeRO-3 like); false keeps them (ZeRO-2 like).")
    cpu_offload: bool = Field(False, description="Keep sharded parameters, gradients and optimizer states on CPU.")
    param_dtype: Literal["auto", "float32", "bfloat16", "float16"] = Field(
        "auto", description="dtype of gathered parameters for compute; auto follows train.mixed_precision."
    )
    reduce_dtype: Literal["float32", "bfloat16", "float16"] = "float32"


class DistributedSection(_Section):
    strategy: Literal["auto", "single", "ddp", "zero1", "zero2", "zero3", "fsdp2"] = Field(
        "auto", description="auto: single for one process; ddp for LoRA/QLoRA; zero3 for full fine-tuning."
    )
    num_processes: int = Field(1, ge=1, le=1024, description="Processes (GPUs) per machine.")
    num_machines: int = Field(1, ge=1, le=100_000)
    machine_rank: int = Field(0, ge=0, le=100_000)
    main_process_ip: str = "127.0.0.1"
    main_process_port: int = Field(29500, ge=1, le=65535)
    rdzv_backend: Literal["static", "c10d"] = "static"
    timeout_minutes: int = Field(30, ge=1, le=100_000, description="Collective timeout; long enough for rank 0 to prepare data.")
    gpu_memory: str | None = Field(
        None, description="Memory of one GPU, e.g. 80GB: `ftl plan` checks the estimate against it, and strategy auto "
        "picks the cheapest strategy and largest micro-batch that fit."
    )
    zero: ZeroSection = Field(default_factory=ZeroSection)
    fsdp: FsdpSection = Field(default_factory=FsdpSection)


class ExportSection(_Section):
    dir: PathText | None = Field(None, description="Where `ftl export` writes the model; default <output.dir>/export.")
    dtype: Literal["bfloat16", "float16", "float32"] = "bfloat16"
    max_shard_size: str = Field("5GB", description="Largest safetensors shard, e.g. 5GB, 500MB.")

    @field_validator("max_shard_size")
    @classmethod
    def _a_size(cls, value: str) -> str:
        if parse_size(value) is None:
            raise ValueError(f"'{value}' is not a size; write e.g. 5GB or 500MB (units KB, MB, GB, TB)")
        return value
    qlora_merge: Literal["dequantized", "original"] = Field(
        "dequantized",
        description="QLoRA: merge into the NF4-dequantized base (the model that was trained) or the original-precision base.",
    )
    verify: bool = Field(True, description="Reload the export and compare its logits with the trained model.")
    verify_prompts: int = Field(8, ge=1, le=100_000, description="Sequences (eval rows) compared by verification.")


class SlurmSection(_Section):
    partition: str | None = None
    account: str | None = None
    qos: str | None = None
    nodes: int = Field(1, ge=1, le=100_000, description="Machines; distributed.num_machines follows it.")
    gpus_per_node: int | None = Field(None, ge=0, le=1024, description="--gpus-per-node; distributed.num_processes defaults to it.")
    cpus_per_task: int | None = Field(None, ge=1, le=100_000, description="CPUs for each node's task (one task per node).")
    mem: str | None = Field(None, description="Memory per node, e.g. 500G.")
    time: str = Field("24:00:00", description="Time limit, e.g. 2-00:00:00.")
    job_name: str = "ftl"
    output_dir: PathText | None = Field(None, description="Logs; default <output.dir>/slurm.")
    extra_sbatch: list[str] = Field(default_factory=list, description="More #SBATCH lines, e.g. ['--exclusive'].")
    setup: list[str] = Field(default_factory=list, description="Shell lines run first on each node, e.g. 'module load cuda/12.4'.")
    env: dict[str, str] = Field(default_factory=dict, description="Environment for the job (overrides ftl's NCCL defaults).")
    container_image: str | None = Field(None, description="Run each node's task in this image (pyxis: srun --container-image).")
    container_mounts: str | None = None
    signal_grace: int = Field(300, ge=10, le=10**7, description="Seconds before the time limit at which the job checkpoints and requeues.")
    max_restarts: int = Field(3, ge=0, le=10_000, description="How often the job requeues itself after a timed-out or preempted attempt.")
    port: int = Field(29500, ge=1, le=65535, description="Rendezvous port on the first node.")

    @field_validator("env")
    @classmethod
    def _env_names(cls, env: dict[str, str]) -> dict[str, str]:
        for key in env:
            if not re.fullmatch(r"[A-Za-z_][A-Za-z0-9_]*", key):
                raise ValueError(f"{key[:40]!r} is not an environment variable name (letters, digits and _, not starting with a digit)")
        return env


class Recipe(_Section):
    model: ModelSection
    data: DataSection
    method: MethodSection = Field(default_factory=MethodSection)
    quantization: QuantizationSection = Field(default_factory=QuantizationSection)
    train: TrainSection = Field(default_factory=TrainSection)
    distributed: DistributedSection = Field(default_factory=DistributedSection)
    export: ExportSection = Field(default_factory=ExportSection)
    slurm: SlurmSection = Field(default_factory=SlurmSection)
    output: OutputSection
    kernels: Literal["auto", "none"] | list[Literal["rmsnorm", "swiglu", "fused_ce"]] = Field(
        "none", description="ftl's kernels (kernels/): auto = all the model supports (Triton on CUDA, PyTorch elsewhere), "
        "none, or a list of rmsnorm, swiglu, fused_ce."
    )

    def to_yaml(self) -> str:
        return yaml.safe_dump(self.model_dump(mode="json"), sort_keys=False)

    @property
    def world_size(self) -> int:
        """Processes in the whole run (every machine)."""
        return self.distributed.num_processes * self.distributed.num_machines

    @property
    def strategy(self) -> str:
        """The strategy the run uses: ``distributed.strategy``, with ``auto`` decided here and only here.

        One process -> ``single``; LoRA/QLoRA (few trainable parameters, the frozen base fits each
        device) -> ``ddp``; full fine-tuning (weights, gradients and Adam states of every parameter:
        16 bytes/parameter in mixed precision) -> ``zero3``, which shards all of them.
        """
        if self.distributed.strategy != "auto":
            return self.distributed.strategy
        if self.world_size == 1:
            return "single"
        return "zero3" if self.method.type == "full" else "ddp"

    def resolved(self) -> Recipe:
        """A copy with local paths made absolute, so every rank and node reads the same files."""
        data = self.model_dump()

        def absolute(path: str | None) -> str | None:
            if path is None:
                return None
            candidate = Path(path).expanduser()
            return str(candidate.resolve()) if candidate.exists() else path

        data["model"]["path"] = absolute(data["model"]["path"])
        data["model"]["tokenizer"] = absolute(data["model"]["tokenizer"])
        for source in data["data"]["train"] + (data["data"]["eval"] or []):
            source["path"] = absolute(source["path"])
        data["output"]["dir"] = str(Path(data["output"]["dir"]).expanduser().resolve())
        if data["data"]["cache_dir"]:
            data["data"]["cache_dir"] = str(Path(data["data"]["cache_dir"]).expanduser().resolve())
        return Recipe.model_validate(data)


# ----------------------------------------------------------------------------- loading


def load_recipe(path: str | Path, overrides: list[str] | None = None) -> Recipe:
    """Read a recipe file, apply ``key.sub=value`` overrides and validate it."""
    path = Path(path)
    try:
        raw, lines = recipe_yaml.parse(recipe_yaml.read_text(path), str(path))
    except recipe_yaml.RecipeYamlError as err:
        raise RecipeError([str(err)]) from None
    if not isinstance(raw, dict):
        raise RecipeError([f"{path}: a recipe is a YAML mapping with sections model, data, method, train, output"])
    for override in overrides or []:
        lines[_apply_override(raw, override)] = "command-line override"
    return validate_recipe(raw, source=str(path), lines=lines)


def validate_recipe(raw: dict, source: str = "<recipe>", lines: dict[tuple, int | str] | None = None) -> Recipe:
    """Validate a recipe dict, translating pydantic errors into one actionable line each."""
    lines = lines or {}
    try:
        recipe = Recipe.model_validate(raw)
    except ValidationError as err:
        raise RecipeError([_describe(e, source, lines) for e in err.errors()]) from None
    recipe = with_implied(recipe)
    problems = []
    for key, message in check_combinations(recipe):
        problems.append(f"{_where(source, _nearest_line(key, lines))}: {'.'.join(key)}: {message}")
    if problems:
        raise RecipeError(problems)
    return recipe


def with_implied(recipe: Recipe) -> Recipe:
    """A copy with what the recipe implies filled in: ``method.type: qlora`` means a 4-bit base, a
    Slurm job's nodes are its machines and its GPUs per node its processes per machine (unless
    those are set otherwise, which :func:`check_combinations` reports)."""
    quant, dist, slurm = recipe.quantization, recipe.distributed, recipe.slurm
    updates: dict[str, Any] = {}
    if recipe.method.type == "qlora" and quant.bits is None:
        updates["quantization"] = quant.model_copy(update={"bits": 4})
    machines = slurm.nodes if slurm.nodes > 1 and dist.num_machines == 1 else dist.num_machines
    processes = slurm.gpus_per_node if slurm.gpus_per_node and dist.num_processes == 1 else dist.num_processes
    if (machines, processes) != (dist.num_machines, dist.num_processes):
        updates["distributed"] = dist.model_copy(update={"num_machines": machines, "num_processes": processes})
    return recipe.model_copy(update=updates) if updates else recipe


def check_combinations(recipe: Recipe) -> list[tuple[tuple, str]]:
    """Settings that are each valid but cannot work together, found before any model is loaded.

    Pure: reads the recipe (after :func:`with_implied`) and returns (key path, message) pairs;
    every cross-section rule of the schema lives here, and rules that depend on the strategy
    check the one the run will use (``strategy: auto`` resolved by :attr:`Recipe.strategy`).
    """
    method, quant = recipe.method, recipe.quantization
    problems: list[tuple[tuple, str]] = []
    if method.freeze and method.type != "full":
        problems.append((("method", "freeze"), "applies to method.type: full; LoRA already freezes the base model"))
    if method.type == "qlora":
        if quant.bits != 4:
            problems.append(
                (("quantization", "bits"), "method.type: qlora means a 4-bit base; for an 8-bit base use method.type: lora")
            )
    if method.type == "full" and quant.bits is not None:
        problems.append(
            (("quantization", "bits"), "full fine-tuning cannot train quantized weights; use method.type: lora or qlora, or remove quantization.bits")
        )
    if quant.bits == 8 and quant.quant_storage != "uint8":
        problems.append((("quantization", "quant_storage"), "applies to 4-bit quantization only"))
    data = recipe.data
    if data.streaming:
        if recipe.train.max_steps is None:
            problems.append((("train", "max_steps"), "data.streaming needs train.max_steps (a stream has no length to count epochs by)"))
        for key, bad in (("packing", data.packing), ("eval_fraction", data.eval_fraction), ("train", len(data.train) > 1),
                         ("train", any(s.weight != 1.0 or s.samples for s in data.train))):
            if bad:
                problems.append((("data", key), "not available with data.streaming: one train source, no packing, mixing or eval_fraction; preprocess instead"))
    if recipe.data.eval_fraction and recipe.data.eval:
        problems.append((("data", "eval_fraction"), "set either data.eval (a separate eval source) or data.eval_fraction, not both"))
    if "wandb" in recipe.output.report_to and importlib.util.find_spec("wandb") is None:
        problems.append((("output", "report_to"), "wandb is not installed; pip install wandb, or remove it from report_to"))
    problems += _check_distributed(recipe)
    problems += check_kernels(recipe)  # after _check_distributed: it settles the world size auto depends on
    return problems


# They shard lm_head's weight outside its forward, where the fused cross-entropy reads it.
SHARDED_HEAD_STRATEGIES = ("zero3", "fsdp2")


def uses_fused_ce(kernels: str | list[str], strategy: str) -> bool:
    """Whether the fused cross-entropy runs: listed, or ``auto`` where lm_head is not sharded."""
    if kernels == "auto":
        return strategy not in SHARDED_HEAD_STRATEGIES
    return isinstance(kernels, list) and "fused_ce" in kernels


def check_kernels(recipe: Recipe) -> list[tuple[tuple, str]]:
    """A listed fused_ce under the strategy the recipe resolves to (``auto`` included)."""
    strategy = recipe.strategy
    if isinstance(recipe.kernels, list) and "fused_ce" in recipe.kernels and strategy in SHARDED_HEAD_STRATEGIES:
        return [(("kernels",), f"fused_ce reads lm_head's weight outside its forward, which {strategy} keeps sharded "
                 "there; leave fused_ce out (kernels: auto does)")]
    return []


def _check_distributed(recipe: Recipe) -> list[tuple[tuple, str]]:
    dist, quant, slurm = recipe.distributed, recipe.quantization, recipe.slurm
    problems: list[tuple[tuple, str]] = []
    # A Slurm job's nodes are its machines, and GPUs per node its processes per machine (with_implied).
    if slurm.nodes > 1 and dist.num_machines != slurm.nodes:
        problems.append((("distributed", "num_machines"), f"is {dist.num_machines} but slurm.nodes is {slurm.nodes}; set one of them"))
    if slurm.gpus_per_node and dist.num_processes != slurm.gpus_per_node:
        problems.append((("distributed", "num_processes"), f"is {dist.num_processes} but slurm.gpus_per_node is {slurm.gpus_per_node}; set one of them"))
    limit = slurm_seconds(slurm.time)
    if limit is None:
        problems.append((("slurm", "time"), f"'{slurm.time}' is not a Slurm time (MM, MM:SS, HH:MM:SS, D-HH, D-HH:MM, D-HH:MM:SS)"))
    elif slurm.signal_grace >= limit:
        problems.append((("slurm", "signal_grace"), f"{slurm.signal_grace}s is not less than the time limit ({limit}s); the job would stop at once"))
    if dist.gpu_memory is not None and not parse_gib(dist.gpu_memory):
        problems.append((("distributed", "gpu_memory"), f"'{dist.gpu_memory}' is not a size; write e.g. 80GB, 24G or 40960MB"))
    world, strategy = recipe.world_size, recipe.strategy
    # Rules about the strategy name the one auto resolved to, so a user sees why.
    named = f"strategy auto (here {strategy})" if dist.strategy == "auto" else f"strategy {strategy}"
    if dist.machine_rank >= dist.num_machines:
        problems.append((("distributed", "machine_rank"), f"must be below num_machines ({dist.num_machines})"))
    if dist.strategy == "single" and world > 1:
        problems.append((("distributed", "strategy"), f"single means one process, but num_processes x num_machines = {world}; use ddp, zero1/2/3, fsdp2 or auto"))
    if dist.strategy in ("ddp", "zero1", "zero2", "zero3", "fsdp2") and world == 1:
        problems.append((("distributed", "num_processes"), f"strategy {dist.strategy} needs 2 or more processes; set num_processes (per machine) or strategy: single"))
    zero = dist.zero
    if zero.offload_params and strategy != "zero3":
        problems.append((("distributed", "zero", "offload_params"), f"parameter offload needs strategy zero3, not {named}"))
    if zero.offload_optimizer and strategy not in ("zero1", "zero2", "zero3"):
        problems.append((("distributed", "zero", "offload_optimizer"), f"needs strategy zero1, zero2 or zero3, not {named} "
                         "(for fsdp2 use distributed.fsdp.cpu_offload)"))
    if strategy.startswith("zero") and recipe.train.optimizer != "adamw_torch":
        problems.append((("train", "optimizer"), f"DeepSpeed ({named}) runs its own partitioned AdamW; use adamw_torch"))
    if strategy in ("zero3", "fsdp2") and quant.bits is not None and quant.quant_storage == "uint8":
        problems.append((("quantization", "quant_storage"), f"{named} shards only floating-point tensors; set quant_storage: bfloat16 (the compute dtype)"))
    if strategy in ("zero3", "fsdp2") and quant.bits == 8:
        problems.append((("quantization", "bits"), f"8-bit bases cannot be sharded by {named}; use 4 bits with quant_storage, or ddp"))
    return problems


def parse_size(text: str) -> float | None:
    """A shard size as huggingface_hub's sharding accepts it ('5GB', '500MB') in bytes; None if it is not one."""
    match = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([KMGT])B\s*", str(text), re.IGNORECASE)
    if not match or float(match.group(1)) <= 0:
        return None
    return float(match.group(1)) * 1000 ** " KMGT".index(match.group(2).upper())


def parse_gib(text: str) -> float | None:
    """'80GB', '80G', '80GiB', '24000MB' -> GiB (None if not a size). Units are binary, as in Slurm (an '80GB' card is 80 GiB)."""
    match = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([KMGT])?i?B?\s*", str(text), re.IGNORECASE)
    if not match:
        return None
    scale = {"K": 2**-20, "M": 2**-10, "G": 1, "T": 2**10}[(match.group(2) or "G").upper()]
    return float(match.group(1)) * scale


def slurm_seconds(value: str) -> int | None:
    """Seconds in a Slurm time limit: MM, MM:SS, HH:MM:SS, D-HH, D-HH:MM or D-HH:MM:SS."""
    match = re.fullmatch(r"(?:(\d+)-)?(\d+)(?::(\d+))?(?::(\d+))?", value.strip())
    if not match:
        return None
    days, a, b, c = match.groups()
    if days is not None:  # D-HH[:MM[:SS]]
        return int(days) * 86400 + int(a) * 3600 + int(b or 0) * 60 + int(c or 0)
    if c is not None:  # HH:MM:SS
        return int(a) * 3600 + int(b) * 60 + int(c)
    return int(a) * 60 + int(b or 0)  # MM or MM:SS


def _apply_override(raw: dict, override: str) -> tuple:
    key, sep, value = override.partition("=")
    parts = key.strip().split(".")
    if not sep or not all(parts):
        raise RecipeError([f"override '{override}': expected key.sub=value with no empty part, e.g. train.learning_rate=1e-4"])
    node = raw
    for part in parts[:-1]:
        child = node.get(part)
        if child is None:
            child = node[part] = {}
        if not isinstance(child, dict):
            raise RecipeError([f"override '{override}': '{part}' is not a section"])
        node = child
    try:
        node[parts[-1]] = recipe_yaml.override_value(value, override)
    except recipe_yaml.RecipeYamlError as err:
        raise RecipeError([str(err)]) from None
    return tuple(parts)


def _describe(error: dict, source: str, lines: dict[tuple, int | str]) -> str:
    loc = tuple(error["loc"])
    # Errors raised by model validators end their loc at the section; strip pydantic's internals.
    loc = tuple(p for p in loc if not (isinstance(p, str) and p.startswith("function-")))
    dotted = ".".join(str(p) for p in loc) or "(recipe)"
    where = _where(source, _nearest_line(loc, lines))
    kind = error["type"]
    if kind == "extra_forbidden":
        valid = _valid_keys(loc[:-1])
        hint = _suggest(str(loc[-1]), valid)
        tip = f"did you mean {hint}?" if hint else f"valid keys here: {', '.join(valid)}"
        return f"{where}: unknown key '{loc[-1]}' at {dotted}; {tip}"
    if kind == "missing":
        return f"{where}: missing required key {dotted}"
    message = error["msg"].removeprefix("Value error, ")
    got = error.get("input")
    shown = "" if isinstance(got, (dict, list)) or kind.startswith("value_error") else f" (got {got!r})"
    return f"{where}: {dotted}: {message}{shown}"


def _where(source: str, line: int | str | None) -> str:
    """``file:line`` for a YAML key, ``file (command-line override)`` for an override."""
    if isinstance(line, int):
        return f"{source}:{line}"
    return f"{source} ({line})" if line else source


def _nearest_line(loc: tuple, lines: dict[tuple, int | str]) -> int | str | None:
    for end in range(len(loc), 0, -1):
        if loc[:end] in lines:
            return lines[loc[:end]]
    return None


def _valid_keys(section_loc: tuple) -> list[str]:
    """Field names (and aliases) of the schema section at ``section_loc``."""
    model: Any = Recipe
    for part in section_loc:
        if isinstance(part, int):
            continue
        field = model.model_fields.get(part)
        if field is None:
            return []
        model = _section_type(field.annotation)
        if model is None:
            return []
    names: list[str] = []
    for name, field in model.model_fields.items():
        names.append(name)
        alias = field.validation_alias
        if isinstance(alias, AliasChoices):
            names.extend(a for a in alias.choices if isinstance(a, str) and a != name)
    return names


def _section_type(annotation: Any) -> Any:
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return annotation
    for arg in getattr(annotation, "__args__", ()):
        found = _section_type(arg)
        if found is not None:
            return found
    return None


def _suggest(word: str, candidates: list[str]) -> str | None:
    """Closest valid key by edit distance (transpositions count as one edit)."""
    scored = sorted((_edit_distance(word.lower(), c.lower()), c) for c in candidates)
    close = [c for d, c in scored if d <= max(1, len(word) // 3)]
    if not close:
        return None
    best = close[0]
    # Name the alias target too, e.g. 'rank' is an alias of 'r'.
    model_names = [c for c in candidates if c != best and _edit_distance(best, c) > 0 and best.startswith(c)]
    extra = f" (or '{model_names[0]}')" if model_names else ""
    return f"'{best}'{extra}"


def _edit_distance(a: str, b: str) -> int:
    """Optimal string alignment distance (Levenshtein + adjacent transpositions)."""
    d = [[0] * (len(b) + 1) for _ in range(len(a) + 1)]
    for i in range(len(a) + 1):
        d[i][0] = i
    for j in range(len(b) + 1):
        d[0][j] = j
    for i in range(1, len(a) + 1):
        for j in range(1, len(b) + 1):
            cost = 0 if a[i - 1] == b[j - 1] else 1
            d[i][j] = min(d[i - 1][j] + 1, d[i][j - 1] + 1, d[i - 1][j - 1] + cost)
            if i > 1 and j > 1 and a[i - 1] == b[j - 2] and a[i - 2] == b[j - 1]:
                d[i][j] = min(d[i][j], d[i - 2][j - 2] + 1)
    return d[len(a)][len(b)]
