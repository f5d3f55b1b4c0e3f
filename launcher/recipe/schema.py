"""The recipe's schema: one YAML file that describes a whole run, as frozen pydantic sections.

This module is the types only; ``ftl.recipe.load`` reads a file into them (YAML, overrides,
validation, the rules). Later sections (quantization, distributed, slurm, export) slot in as new
sub-models of :class:`Recipe`.
"""

from __future__ import annotations

import os
import re
from pathlib import Path
from types import UnionType
from typing import Annotated, Any, Literal, Union, get_args, get_origin

import yaml
from pydantic import (AfterValidator, AliasChoices, BaseModel, BeforeValidator, ConfigDict, Discriminator, Field,
                      StringConstraints, Tag, ValidationInfo, field_validator)

from ftl.errors import UserError
from ftl.precision import dtype_name, mixed_name
from ftl.recipe.units import parse_size


# A weights' dtype as torch names it; bf16/fp16/fp32 are read as bfloat16/float16/float32 (ftl.precision).
Dtype = Annotated[Literal["bfloat16", "float16", "float32"], BeforeValidator(dtype_name)]


class RecipeError(UserError):
    """A recipe problem the user can fix; ``str()`` is one line per problem."""

    def __init__(self, problems: list[str]):
        self.problems = problems
        super().__init__("\n".join(problems))


# What must never reach a path or a shell line: a newline ends a comment or #SBATCH line.
CONTROL_CHARS = re.compile(r"[\x00-\x1f\x7f-\x9f\u2028\u2029]")  # C0, DEL, C1 (U+0085 ends lines too), separators


def _plain_path(value: str) -> str:
    if CONTROL_CHARS.search(value):
        raise ValueError("control characters (newlines, tabs) are not allowed in a path")
    return value


# A path or name of a file, directory or hub id: never empty ('' would mean the current directory).
PathText = Annotated[str, StringConstraints(min_length=1), AfterValidator(_plain_path)]


class _Section(BaseModel):
    # Every float must be finite: inf or nan trains on nonsense and exits 0.
    model_config = ConfigDict(extra="forbid", populate_by_name=True, allow_inf_nan=False, frozen=True)

    @field_validator("*", mode="before")
    @classmethod
    def _no_coerced_integers(cls, value: Any, info: ValidationInfo) -> Any:
        """An integer field given ``true`` or ``'3'`` is a mistake pydantic would silently coerce (a
        quoted number in YAML, a boolean where a count or seed belongs)."""
        if isinstance(value, (bool, str)) and _is_int_field(cls.model_fields[info.field_name].annotation):
            raise ValueError(f"must be an integer, not {type(value).__name__} {value!r:.40}")
        return value


def _is_int_field(annotation: Any) -> bool:
    """``int`` or ``int | None`` (not bool, float or unions with str)."""
    args = [a for a in get_args(annotation) if a is not type(None)] if get_origin(annotation) in (Union, UnionType) else [annotation]
    return len(args) == 1 and args[0] is int


# ----------------------------------------------------------------------------- sections


class ModelSection(_Section):
    path: PathText = Field(description="Local directory or Hugging Face hub id of the base model.")
    tokenizer: PathText | None = Field(None, description="Tokenizer path if it differs from model.path.")
    dtype: Annotated[Literal["float32", "bfloat16", "float16", "auto"], BeforeValidator(dtype_name)] = "bfloat16"
    attn_implementation: Literal["sdpa", "eager", "flash_attention_2"] | None = "sdpa"
    trust_remote_code: bool = False


class DataSource(_Section):
    path: PathText = Field(description="A local .json/.jsonl/.parquet file or directory, or a datasets name.")
    format: Literal["alpaca", "chat", "sharegpt", "completion", "preference", "unpaired"] = Field(
        "alpaca", description="alpaca (instruction/input/output), chat (OpenAI messages, tool calls, a tools column), "
        "sharegpt (conversations of from/value), completion (text), preference (prompt/chosen/rejected, for "
        "method.objective dpo, ipo, simpo, orpo), unpaired (prompt/completion/label, for method.objective kto).")
    split: str = "train"
    subset: str | None = Field(None, description="datasets configuration name (for hub datasets).")
    weight: float = Field(1.0, gt=0, le=1000, description="Mixing: rows drawn per epoch = weight x the source's rows (repeats above 1).")
    samples: int | None = Field(None, ge=1, le=100_000_000, description="Mixing: exactly this many rows per epoch (overrides weight).")
    fields: dict[str, str] = Field(
        default_factory=dict,
        description="Map from the format's field names to the columns of this source, "
        "e.g. {instruction: question, output: answer}.",
    )

    roles_to_train: list[Literal["system", "user", "assistant", "tool"]] = Field(
        default_factory=lambda: ["assistant"], description="chat/sharegpt: whose messages are trained.")
    train_eot: bool = Field(True, description="chat/sharegpt: train each trained message's end-of-turn token "
                            "(without it the model never learns to stop).")
    mask_history: bool = Field(False, description="chat/sharegpt: train only the last assistant turn of each conversation.")

    @field_validator("fields")
    @classmethod
    def _known_fields(cls, fields: dict[str, str]) -> dict[str, str]:
        known = {"instruction", "input", "output", "messages", "text", "role", "content", "prompt", "chosen", "rejected"}
        for key in fields:
            if key not in known:
                raise ValueError(f"unknown field '{key}' in fields mapping; known: {', '.join(sorted(known))}")
        return fields


# data.eval: one source or a list (one set, logged as eval_loss), or named sets, name -> source(s),
# each logged as eval_<name>_loss (the first also as eval_loss). The tag picks the branch, so a
# typo inside a source is reported once (ftl.recipe.errors drops the tag from the key path).
EVAL_NAME = re.compile(r"[a-z][a-z0-9_]{0,39}")
EvalSets = Annotated[Union[Annotated[list[DataSource], Tag("sources")], Annotated[dict[str, list[DataSource]], Tag("named")]],
                     Discriminator(lambda v: "named" if isinstance(v, dict) else "sources")]


class DataSection(_Section):
    train: list[DataSource] = Field(min_length=1)
    eval: EvalSets | None = Field(None, description="Held-out rows: a source, a list of them, or named sets "
                                  "{name: source(s)} (e.g. task and retain), each evaluated and logged on its own.")
    max_length: int = Field(2048, ge=8, le=1 << 20)
    mask_prompt: bool = Field(True, description="Train only on responses (assistant turns); -100 elsewhere.")
    add_eos: bool = Field(True, description="Append the EOS token to alpaca/completion examples.")
    packing: bool = Field(False, description="Pack several examples into each max_length row (attention never crosses them).")
    eval_fraction: float | None = Field(None, gt=0, lt=1, description="Hold out this fraction of the train rows for eval.")
    cache_dir: PathText | None = Field(None, description="Where tokenized/packed data is cached; default <output.dir>/data.")
    streaming: bool = Field(False, description="Read and tokenize the train source lazily (data larger than memory).")
    invalid_pairs: Literal["error", "drop"] = Field(
        "error", description="preference rows whose chosen and rejected are the same tokens, or with no response token "
        "left within max_length: an error naming file and row, or dropped with a counted warning.")

    @field_validator("train", "eval", mode="before")
    @classmethod
    def _one_or_many(cls, value: Any, info: ValidationInfo) -> Any:
        if info.field_name == "eval" and isinstance(value, dict) and "path" not in value:  # named sets
            for name in value:
                if not isinstance(name, str) or not EVAL_NAME.fullmatch(name):
                    raise ValueError(f"eval set name {name!r}: use lowercase letters, digits and _ (e.g. task, retain)")
            return {name: [sources] if isinstance(sources, dict) else sources for name, sources in value.items()}
        return [value] if isinstance(value, dict) else value

    @property
    def named_eval(self) -> bool:
        return isinstance(self.eval, dict)

    def eval_sets(self) -> dict[str, list[DataSource]]:
        """Every eval set by name; an unnamed list is the one set ``eval``."""
        if self.eval is None:
            return {}
        return dict(self.eval) if isinstance(self.eval, dict) else {"eval": self.eval}

    def eval_sources(self) -> list[DataSource]:
        return [source for sources in self.eval_sets().values() for source in sources]

    def eval_keys(self) -> list[tuple[tuple, DataSource]]:
        """Each eval source with its key path in the recipe (for errors)."""
        if isinstance(self.eval, dict):
            return [(("eval", name, k), s) for name, sources in self.eval.items() for k, s in enumerate(sources)]
        return [(("eval", k), s) for k, s in enumerate(self.eval or [])]

    def source_keys(self) -> list[tuple[tuple, DataSource]]:
        """Every train and eval source with its key path in the recipe (for errors)."""
        return [(("train", k), s) for k, s in enumerate(self.train)] + self.eval_keys()

    def metric_prefix(self, name: str) -> str:
        """How eval set ``name``'s metrics are logged: ``eval_`` for the one unnamed set,
        ``eval_<name>_`` for a named one (then ``<prefix>loss``, ``<prefix>vs_base``, ``<prefix><scorer>``)."""
        return f"eval_{name}_" if self.named_eval else "eval_"


class LoraSection(_Section):
    r: int = Field(16, ge=1, le=65536, validation_alias=AliasChoices("r", "rank"))
    alpha: float = Field(32, gt=0)
    dropout: float = Field(0.05, ge=0, lt=1)
    target_modules: str | list[str] = "all-linear"
    modules_to_save: list[str] = Field(default_factory=list)
    use_rslora: bool = False
    use_dora: bool = False
    dtype: Literal["float32", "base"] = Field(
        "float32", description="the adapters' dtype: float32 (peft's default over a bf16/fp16 base: fp32 adapters, "
        "gradients and AdamW states), or base (the base model's, or QLoRA's compute dtype, as LitGPT and torchtune "
        "train bf16-true: half the adapter memory and no fp32 copies of the adapters' inputs).")


class MethodSection(_Section):
    type: Literal["full", "lora", "qlora"] = "lora"
    objective: Literal["sft", "dpo", "ipo", "simpo", "orpo", "kto", "reward"] = Field(
        "sft", description="sft (next-token loss on responses), a preference objective on chosen/rejected pairs "
        "(dpo, ipo, simpo, orpo; data format preference), kto on completions labelled desirable or not (data format "
        "unpaired), or reward: a reward model (a score head) trained on preference pairs; their settings are in the "
        "preference, kto and reward sections.")
    lora: LoraSection = Field(default_factory=LoraSection)
    freeze: list[str] = Field(
        default_factory=list,
        description="Full fine-tuning only: glob patterns of parameter names to keep frozen, "
        "e.g. 'model.embed_tokens.*' or 'model.layers.0.*'.",
    )



class PreferenceSection(_Section):
    beta: float = Field(0.1, gt=0, le=1000, description="dpo/ipo/simpo: strength of the preference (IPO's tau); "
                        "orpo: not used (see orpo_alpha).")
    label_smoothing: float = Field(0.0, ge=0, lt=0.5, description="dpo (sigmoid: conservative DPO; robust), simpo: "
                                   "the assumed fraction of flipped labels.")
    loss_type: Literal["sigmoid", "hinge", "robust"] = Field("sigmoid", description="dpo only: the DPO variant.")
    simpo_gamma: float = Field(0.5, ge=0, le=1000, description="simpo only: the target reward margin gamma.")
    orpo_alpha: float = Field(0.1, gt=0, le=1000, description="orpo only: weight of the odds-ratio term beside the NLL "
                              "of the chosen response (the paper's lambda).")
    reference: Literal["auto", "model", "precomputed"] = Field(
        "auto", description="dpo/ipo: the reference model. auto: LoRA/QLoRA use the base with the adapter disabled (no "
        "second copy), full fine-tuning a frozen copy of the starting model (sharded as the policy under zero3 and "
        "fsdp2); model: that frozen copy; precomputed: one pass before training stores the reference log-probabilities "
        "with the preprocessed data (no reference in memory).")


class KtoSection(_Section):
    beta: float = Field(0.1, gt=0, le=1000, description="strength of the preference: the implied reward is beta times "
                        "the log-ratio to the reference (TRL's KTOConfig.beta).")
    desirable_weight: float = Field(1.0, gt=0, le=1000, description="weight of the desirable rows' losses; with fewer "
                                    "desirable than undesirable rows raise it so that weight x count is about even (the "
                                    "KTO paper keeps the ratio within 1 to 4/3).")
    undesirable_weight: float = Field(1.0, gt=0, le=1000, description="weight of the undesirable rows' losses.")
    reference: Literal["auto", "model", "precomputed"] = Field(
        "auto", description="the reference model, as preference.reference: auto (LoRA/QLoRA: the adapter disabled; full: "
        "a frozen copy), model (the frozen copy), precomputed (log-probabilities stored before the first step).")


class RewardSection(_Section):
    center_rewards_coefficient: float = Field(0.0, ge=0, le=1000, description="weight of the mean squared sum of a "
                                              "pair's rewards, which keeps rewards centred on zero (TRL's "
                                              "center_rewards_coefficient; 0.01 is the usual value).")


class QuantizationSection(_Section):
    bits: Literal[4, 8] | None = Field(None, description="Load the frozen base in 4 or 8 bits (bitsandbytes).")
    quant_type: Literal["nf4", "fp4"] = "nf4"
    double_quant: bool = Field(True, description="Quantize the 4-bit block scales too (~0.37 bits/parameter saved).")
    compute_dtype: Dtype = "bfloat16"
    quant_storage: Annotated[Literal["uint8", "bfloat16", "float16", "float32"], BeforeValidator(dtype_name)] = Field(
        "uint8", description="Element type that packs 4-bit weights; bfloat16 lets ZeRO-3/FSDP shard them."
    )
    skip_modules: list[str] = Field(default_factory=lambda: ["lm_head"], description="Modules kept in full precision.")
    upcast_unquantized: bool = Field(
        True, description="peft's prepare_model_for_kbit_training: embeddings, norms and lm_head in fp32 (so are the "
        "residual stream and MLP activations). false keeps them in model.dtype, as torchtune, LitGPT and Unsloth do: "
        "less memory, bf16 norms.")


class EarlyStoppingSection(_Section):
    metric: str = Field("eval_loss", description="The logged eval metric to judge (eval_loss).")
    mode: Literal["min", "max"] = Field("min", description="min: lower is better (a loss); max: higher is better.")
    patience: int = Field(3, ge=1, le=10**6, description="Evaluations in a row without an improvement that stop the run.")
    min_delta: float = Field(0.0, ge=0, description="How much better than the best so far counts as an improvement.")


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
    save_minutes: float | None = Field(30.0, gt=0, le=10**7, description="Without save_steps: checkpoint when this many "
                                       "minutes of training passed since the last one (and at the end), so a crash loses at "
                                       "most that much; null: only at the end.")
    logging_steps: int = Field(1, ge=1, le=10**9)
    gradient_checkpointing: bool = False
    compile: bool = Field(False, description="torch.compile each decoder layer (inductor): the first steps compile "
                          "(about a minute; cached for later runs), the rest run faster. single, ddp and fsdp2.")
    mixed_precision: Annotated[Literal["no", "bf16", "fp16", "auto"], BeforeValidator(mixed_name)] = Field(
        "no", description="Autocast dtype of forward passes (under DeepSpeed: a bf16/fp16 module, fp32 master weights). auto: bf16 where the "
        "device computes it natively (CUDA GPUs from Ampere on; CPUs with AVX-512 BF16 or AMX), else no; decided on "
        "the machine that trains.")
    resume: str = Field(
        "auto",
        description="auto: continue from the run directory's newest complete checkpoint if there is one; "
        "never: start fresh; or the path of a checkpoint directory.",
    )
    optimizer: Literal["adamw_torch", "adamw_8bit", "paged_adamw_8bit", "paged_adamw_32bit"] = "adamw_torch"
    allow_changed: list[str] = Field(
        default_factory=list, description="On resume, recipe fields (dotted, e.g. train.learning_rate) that may differ "
        "from the checkpoint's; any other change that alters training is refused. (`ftl train --allow-changed FIELD`)")
    peak_tflops: float | None = Field(None, gt=0, description="Peak TFLOP/s of one device, for MFU (default: known GPUs).")
    early_stopping: EarlyStoppingSection | None = Field(None, description="Judge every evaluation: save each new best as "
                                                        "checkpoints/best (never pruned; ftl export RUN --best) and stop after "
                                                        "`patience` evaluations without one.")


class OutputSection(_Section):
    dir: PathText = Field(description="The run directory: resolved recipe, metrics, checkpoints.")

    @field_validator("dir")
    @classmethod
    def _a_directory_of_its_own(cls, value: str) -> str:
        if not value.strip():
            raise ValueError("is blank; name the run's directory, e.g. runs/my-run")
        if Path(value).expanduser().resolve() == Path("/"):
            raise ValueError("is the filesystem root; name a directory of the run's own, e.g. runs/my-run")
        return value
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
    param_dtype: Annotated[Literal["auto", "float32", "bfloat16", "float16"], BeforeValidator(dtype_name)] = Field(
        "auto", description="dtype of gathered parameters for compute; auto follows train.mixed_precision."
    )
    reduce_dtype: Dtype = "float32"


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


class GenerateSection(_Section):
    set: str = Field("eval", description="The eval set to generate for: a name of data.eval's named sets, or eval (the unnamed one).")
    rows: int = Field(16, ge=1, le=100_000, description="Its first N rows, greedily, every evaluation.")
    max_new_tokens: int = Field(64, ge=1, le=1 << 16)
    scorers: list[str] = Field(default_factory=lambda: ["exact_match"], min_length=1, description="exact_match, contains, "
                               "json_valid, json_fields, regex:PATTERN, or module:function (ftl.scorers); each logged as "
                               "eval_<scorer> (eval_<set>_<scorer> for a named set).")


class EvalSection(_Section):
    generate: GenerateSection | None = Field(None, description="Generation metrics at every evaluation (ftl.scorers).")


class ExportSection(_Section):
    dir: PathText | None = Field(None, description="Where `ftl export` writes the model; default <output.dir>/export.")
    dtype: Dtype = "bfloat16"
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
    gguf: Literal["f32", "f16", "bf16", "q8_0"] | None = Field(
        None, description="Also write a GGUF file of this type (llama.cpp's converter), checked against the export.")


class SlurmSection(_Section):
    partition: str | None = None
    account: str | None = None
    qos: str | None = None
    nodes: int = Field(1, ge=1, le=100_000, description="Machines; distributed.num_machines follows it.")
    gpus_per_node: int | None = Field(None, ge=0, le=1024, description="--gpus-per-node; unset: distributed.num_processes (when above 1), which defaults to it in turn; 0 for a CPU cluster.")
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
    preference: PreferenceSection = Field(default_factory=PreferenceSection)
    kto: KtoSection = Field(default_factory=KtoSection)
    reward: RewardSection = Field(default_factory=RewardSection)
    quantization: QuantizationSection = Field(default_factory=QuantizationSection)
    train: TrainSection = Field(default_factory=TrainSection)
    distributed: DistributedSection = Field(default_factory=DistributedSection)
    eval: EvalSection = Field(default_factory=EvalSection)
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

    def for_device(self, device: str) -> Recipe:
        """The recipe with ``train.mixed_precision: auto`` decided for ``device`` (cuda | cpu), here
        and only here. Called where the run's hardware is known: by ``ftl train`` and every rank
        (a Slurm job decides on its nodes, not on the login node) and by ``ftl plan --device``."""
        if self.train.mixed_precision != "auto":
            return self
        precision = "bf16" if bf16_native(device) else "no"
        return self.model_copy(update={"train": self.train.model_copy(update={"mixed_precision": precision})})

    def resolved(self) -> Recipe:
        """A copy with local paths made absolute, so every rank and node reads the same files."""
        data = self.model_dump()

        def absolute(path: str | None) -> str | None:
            if path is None:
                return None
            candidate = expand_path(path)
            return str(candidate.resolve()) if candidate.exists() else path

        data["model"]["path"] = absolute(data["model"]["path"])
        data["model"]["tokenizer"] = absolute(data["model"]["tokenizer"])
        evals = data["data"]["eval"] or []
        for source in data["data"]["train"] + ([s for sources in evals.values() for s in sources] if isinstance(evals, dict) else evals):
            source["path"] = absolute(source["path"])
        data["output"]["dir"] = str(expand_path(data["output"]["dir"]).resolve())
        if data["data"]["cache_dir"]:
            data["data"]["cache_dir"] = str(expand_path(data["data"]["cache_dir"]).resolve())
        return Recipe.model_validate(data)

    def missing_files(self) -> list[tuple[tuple, str]]:
        """Local paths that do not exist (``ftl validate`` reports them before ``train`` would, a
        minute later). A name that reads as a hub id (``org/model``, a datasets name) is not checked."""
        problems: list[tuple[tuple, str]] = []
        for key, path, what in [(("model", "path"), self.model.path, "model directory"),
                                (("model", "tokenizer"), self.model.tokenizer, "tokenizer directory"),
                                *[(("data", *key, "path"), s.path, "data file") for key, s in self.data.source_keys()]]:
            if path is None or expand_path(path).exists() or not _looks_local(path, data=what == "data file"):
                continue
            problems.append((key, f"{path}: {what} not found (relative paths are resolved from {Path.cwd()})"))
        return problems


def expand_path(path: str) -> Path:
    """``~`` and environment variables expanded; ``$FTL_ARTIFACTS`` is the artifacts directory
    (``make artifacts``) even where the variable is unset, as the README's recipes use it."""
    from ftl.artifacts import artifacts_dir

    text = re.sub(r"\$(\{FTL_ARTIFACTS\}|FTL_ARTIFACTS(?![A-Za-z0-9_]))", lambda _: str(artifacts_dir()), path)
    return Path(os.path.expandvars(text)).expanduser()


def _looks_local(path: str, data: bool) -> bool:
    """A path meant as a local file or directory rather than a hub id (``org/name``)."""
    if path.startswith(("/", "./", "../", "~", "$")) or path.count("/") > 1 or path.endswith("/"):
        return True
    return data and Path(path).suffix in (".json", ".jsonl", ".parquet", ".csv")


def bf16_native(device: str) -> bool:
    """Whether bf16 matmuls run in hardware, so autocast to bf16 is faster than fp32: CUDA from
    compute capability 8.0 (``ftl plan --device cuda`` on a machine without a GPU assumes one),
    and CPUs with AVX-512 BF16 or AMX; elsewhere torch converts bf16 in software, slower than fp32."""
    import torch

    if device == "cuda":
        return not torch.cuda.is_available() or torch.cuda.is_bf16_supported(including_emulation=False)
    capabilities = torch.cpu.get_capabilities()
    return bool(capabilities.get("avx512_bf16") or capabilities.get("amx_bf16"))
