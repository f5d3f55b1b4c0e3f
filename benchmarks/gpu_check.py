"""One prepared GPU acceptance run: every GPU-only path of ftl in one command, with a report.

    python benchmarks/gpu_check.py --out DIR [--budget 540]   # on a GPU machine (installs .whl/ first)
    python benchmarks/gpu_check.py --smoke --out DIR            # every part's code on CPU, a tiny model

GPU time is lent rarely and briefly (one H100/H200, ~15 minutes, starting bare, no package
registry), so nothing here explores: each part runs in processes of its own under a time budget (a
share of ``--budget``) and reports what it finished even when it runs out. ``DIR`` gets
``report.json`` (every item) and ``report.md`` (the tables for the README); a part's log goes to
``DIR/logs.txt`` only where something failed.

Parts:
  env        the machine: torch/CUDA/NCCL/Triton versions, bf16 support, which of ftl's imports are missing
  kernels    ftl's Triton kernels (RMSNorm, SwiGLU, fused linear cross-entropy) against their PyTorch
             references on the device: forward and gradients in bf16 and fp32 at several shapes,
             the error, and fwd+bwd time (and, for the loss, peak memory) against the reference
  bnb        bitsandbytes' 4-bit path on the device: NF4 quantize/dequantize, Linear4bit forward and
             input gradients against the dequantized weight
  train      one-device training steps of a ~1.1B Llama shape (TinyLlama's): LoRA with and without
             ``kernels: auto``, with ``train.compile``, full (torch's fused AdamW), QLoRA; real tokens/s,
             MFU, ``max_memory_allocated`` against ``ftl plan``'s estimate
  precision ``mixed_precision: auto`` (what it resolved to), fp16 (the GradScaler path), eager and
             FlashAttention-2 attention (where flash_attn is installed) against SDPA
  nccl       two processes on the one GPU (NCCL), or the error NCCL gives
  hf         HF Trainer + peft on the same model and rows: ftl's tokens/s as a ratio of HF's

``train``, ``precision``, ``nccl`` and ``hf`` run ftl's trainer, which needs ``datasets`` and so
pyarrow and pandas: those do not fit the 64 MiB tree that travels (``make gpu-wheels``); where
the machine lacks them, these parts report that and are skipped. ``--smoke`` runs every part on
CPU with a tiny model in a few steps (Triton through its interpreter), so the script never rots;
its numbers mean nothing.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any, Callable

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))  # the sibling benchmark, also under PYTHONSAFEPATH
from cpu_vs_hf import make_data, timed_hf_trainer  # noqa: E402

# Share of the budget per part (a part that finishes early leaves its time to the later ones).
PARTS = {"env": 0.03, "kernels": 0.12, "bnb": 0.05, "train": 0.38, "precision": 0.2, "nccl": 0.1, "hf": 0.12}
TRAINER_NEEDS = ("datasets", "pyarrow", "pandas", "pydantic", "rich", "jinja2", "matplotlib", "peft", "accelerate")
SHAPE = dict(hidden_size=2048, num_hidden_layers=16, intermediate_size=5632, num_attention_heads=32, num_key_value_heads=4)
SMOKE_SHAPE = dict(hidden_size=64, num_hidden_layers=2, intermediate_size=128, num_attention_heads=4, num_key_value_heads=2)
MICRO, ACCUM = 4, 2
# Relative max error (max |got - want| / max |want|) a kernel may have against its reference.
TOL = {"float32": 1e-4, "bfloat16": 2e-2}

# name: (method, recipe overrides, what it needs beyond the trainer's imports)
VARIANTS: dict[str, tuple[str, dict, tuple[str, ...]]] = {
    "lora": ("lora", {}, ()),
    "lora kernels:none": ("lora", {"kernels": "none"}, ()),
    "lora compile": ("lora", {"train.compile": True}, ()),
    "full": ("full", {}, ()),
    "qlora": ("qlora", {}, ("bitsandbytes",)),
    "lora mixed_precision:auto": ("lora", {"train.mixed_precision": "auto"}, ()),
    "lora fp16": ("lora", {"train.mixed_precision": "fp16", "model.dtype": "float16"}, ()),
    "lora eager attention": ("lora", {"model.attn_implementation": "eager"}, ()),
    "lora flash_attention_2": ("lora", {"model.attn_implementation": "flash_attention_2"}, ("flash_attn",)),
}
PART_VARIANTS = {"train": ["lora", "lora kernels:none", "lora compile", "full", "qlora"],
                 "precision": ["lora mixed_precision:auto", "lora fp16", "lora eager attention", "lora flash_attention_2"]}
SMOKE_SKIPS = {"lora compile": "the compiled path is covered on CPU by the test suite's compiled-trace tests"}


def emit(part: str, name: str, status: str, **values: Any) -> None:
    """One finished item, as a line the driver collects (so a part cut off by its budget keeps what it did)."""
    print("RESULT " + json.dumps({"part": part, "name": name, "status": status, **values}, default=str), flush=True)


def missing(modules: tuple[str, ...] | list[str]) -> list[str]:
    return [m for m in modules if importlib.util.find_spec(m) is None]


# ----------------------------------------------------------------------------- parts (in a worker process)


def part_env(args: argparse.Namespace) -> None:
    import torch

    cuda = torch.cuda.is_available()
    values = {"python": sys.version.split()[0], "torch": torch.__version__, "cuda": torch.version.cuda,
              "device": torch.cuda.get_device_name() if cuda else "cpu",
              "capability": ".".join(map(str, torch.cuda.get_device_capability())) if cuda else None,
              "bf16": torch.cuda.is_bf16_supported() if cuda else None,
              "nccl": ".".join(map(str, torch.cuda.nccl.version())) if cuda else None,
              "gpu_memory_gib": round(torch.cuda.get_device_properties(0).total_memory / 2**30, 1) if cuda else None,
              "cpus": os.cpu_count()}
    for name in ("triton", "transformers", "accelerate", "peft", "bitsandbytes", "datasets", "deepspeed", "flash_attn"):
        if importlib.util.find_spec(name) is not None:
            from importlib.metadata import PackageNotFoundError, version
            try:
                values[name] = version(name.replace("_", "-"))
            except PackageNotFoundError:
                values[name] = "present"
    values["missing"] = missing(list(TRAINER_NEEDS) + ["bitsandbytes", "triton", "flash_attn"])
    emit("env", "machine", "ok", **values)


def _timed(fn: Callable[[], Any], device: str, repeats: int) -> float:
    """Median seconds of ``fn`` after one warm-up call."""
    import torch

    sync = torch.cuda.synchronize if device == "cuda" else (lambda: None)
    if repeats > 1:  # (the smoke run times one call: under Triton's interpreter it says nothing anyway)
        fn()
        sync()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        sync()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def _rel_error(got: Any, want: Any) -> float:
    return float((got.float() - want.float()).abs().max() / want.float().abs().max().clamp_min(1e-12))


def part_kernels(args: argparse.Namespace) -> None:
    import torch

    from ftl.kernels.fused_ce import linear_cross_entropy, linear_cross_entropy_reference
    from ftl.kernels.rmsnorm import rms_norm, rms_norm_reference
    from ftl.kernels.swiglu import swiglu, swiglu_reference

    device = "cpu" if args.smoke else "cuda"
    repeats = 1 if args.smoke else 20
    # (tokens, hidden) for RMSNorm, (tokens, intermediate) for SwiGLU, (tokens, hidden, vocab) for the loss
    shapes = {"rmsnorm": [(37, 67)] if args.smoke else [(8192, 2048), (16384, 4096), (8191, 5120)],
              "swiglu": [(37, 131)] if args.smoke else [(8192, 5632), (16384, 14336), (8191, 13824)],
              "fused_ce": [(45, 40, 301)] if args.smoke else [(8192, 2048, 32000), (16384, 4096, 128256)]}
    cases = {
        "rmsnorm": lambda s, dt: ((torch.randn(s, device=device, dtype=dt), torch.rand(s[1], device=device, dtype=dt) + 0.5),
                                  lambda x, w: rms_norm(x, w, 1e-6, backend="triton"), lambda x, w: rms_norm_reference(x, w, 1e-6)),
        "swiglu": lambda s, dt: ((torch.randn(s, device=device, dtype=dt), torch.randn(s, device=device, dtype=dt)),
                                 lambda g, u: swiglu(g, u, backend="triton"), swiglu_reference),
        "fused_ce": lambda s, dt: _loss_case(s, dt, device, linear_cross_entropy, linear_cross_entropy_reference),
    }
    for kernel, kernel_shapes in shapes.items():
        for dtype in (torch.bfloat16, torch.float32):
            for shape in kernel_shapes:
                name = f"{kernel} {str(dtype).removeprefix('torch.')} {'x'.join(map(str, shape))}"
                try:
                    torch.manual_seed(0)
                    inputs, fast, reference = cases[kernel](shape, dtype)
                    errors = [_rel_error(a, b) for a, b in zip(_grads(fast, inputs), _grads(reference, inputs))]
                    seconds = {side: _timed(lambda f=f: _grads(f, inputs), device, repeats) for side, f in (("triton", fast), ("torch", reference))}
                    memory = _peak_ratio(fast, reference, inputs) if device == "cuda" and kernel == "fused_ce" else None
                    tol = TOL[str(dtype).removeprefix("torch.")]
                    emit("kernels", name, "ok" if max(errors) <= tol else "fail", max_rel_error=max(errors), tolerance=tol,
                         speedup=seconds["torch"] / seconds["triton"], triton_ms=1e3 * seconds["triton"],
                         torch_ms=1e3 * seconds["torch"], peak_memory_vs_torch=memory)
                except Exception as err:  # noqa: BLE001 - a report of what failed, not a crash of the check
                    emit("kernels", name, "fail", error=f"{type(err).__name__}: {err}"[:300])
                torch.cuda.empty_cache() if device == "cuda" else None


def _loss_case(shape, dtype, device, fused, reference):
    import torch

    tokens, hidden, vocab = shape
    h, w = torch.randn(tokens, hidden, device=device, dtype=dtype), torch.randn(vocab, hidden, device=device, dtype=dtype) * 0.02
    labels = torch.randint(0, vocab, (tokens,), device=device)
    labels[: tokens // 8] = -100  # a prompt's tokens
    return (h, w), lambda a, b: fused(a, b, labels, backend="triton"), lambda a, b: reference(a.float(), b.float(), labels)


def _grads(fn, inputs):
    import torch

    leaves = [x.detach().clone().requires_grad_(True) for x in inputs]
    out = fn(*leaves)
    gen = torch.Generator(device=out.device).manual_seed(1)
    out.backward(torch.randn(out.shape, device=out.device, dtype=out.dtype, generator=gen))
    return [out.detach()] + [x.grad for x in leaves]


def _peak_ratio(fast, reference, inputs) -> float:
    import torch

    peaks = []
    for fn in (fast, reference):
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
        _grads(fn, inputs)
        torch.cuda.synchronize()
        peaks.append(torch.cuda.max_memory_allocated() - base)
    return peaks[0] / peaks[1]


def part_bnb(args: argparse.Namespace) -> None:
    import bitsandbytes as bnb
    import torch
    from bitsandbytes.functional import dequantize_4bit, quantize_4bit

    device = "cpu" if args.smoke else "cuda"
    n, k = (64, 128) if args.smoke else (4096, 4096)
    for dtype in (torch.bfloat16, torch.float32):
        name = f"nf4 double-quant {str(dtype).removeprefix('torch.')} {n}x{k}"
        try:
            torch.manual_seed(0)
            weight = torch.randn(n, k, dtype=dtype, device=device) * 0.02
            packed, state = quantize_4bit(weight, quant_type="nf4", compress_statistics=True)
            restored = dequantize_4bit(packed, state)
            layer = bnb.nn.Linear4bit(k, n, bias=False, compute_dtype=dtype, quant_type="nf4", compress_statistics=True)
            layer.weight = bnb.nn.Params4bit(weight.cpu(), requires_grad=False, quant_type="nf4", compress_statistics=True)
            layer = layer.to(device)
            x = torch.randn(8, k, dtype=dtype, device=device, requires_grad=True)
            out = layer(x)
            out.float().pow(2).sum().backward()
            dense = restored.to(dtype)  # the same quantization of the same weight (the layer's own may be repacked for the CPU kernel)
            x_ref = x.detach().clone().requires_grad_(True)
            ref = x_ref @ dense.t()
            ref.float().pow(2).sum().backward()
            errors = {"forward": _rel_error(out, ref), "input_grad": _rel_error(x.grad, x_ref.grad)}
            tol = TOL[str(dtype).removeprefix("torch.")]
            emit("bnb", name, "ok" if max(errors.values()) <= tol else "fail", tolerance=tol,
                 quantization_rel_error=_rel_error(restored, weight), **{f"{k}_rel_error": v for k, v in errors.items()},
                 layer_device=str(layer.weight.device))
        except Exception as err:  # noqa: BLE001
            emit("bnb", name, "fail", error=f"{type(err).__name__}: {err}"[:300])


def write_model(work: Path, smoke: bool) -> None:
    """The benchmark model: TinyLlama's shape with random bf16 weights (tiny in smoke), and a BPE
    tokenizer trained on the rows, once per work directory."""
    if (work / "model" / "config.json").exists():
        return
    import torch
    from transformers import AutoModelForCausalLM, LlamaConfig

    from ftl.tiny import build_tokenizer

    rows = [json.loads(line) for line in (work / "data.jsonl").read_text().splitlines()]
    tokenizer = build_tokenizer([r["instruction"] + " " + r["output"] for r in rows], vocab_size=4096)
    config = LlamaConfig(vocab_size=512 if smoke else 32000, max_position_embeddings=4096, **(SMOKE_SHAPE if smoke else SHAPE),
                         pad_token_id=tokenizer.pad_token_id, bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id)
    torch.manual_seed(0)
    AutoModelForCausalLM.from_config(config, dtype=torch.float32 if smoke else torch.bfloat16).save_pretrained(work / "model")
    tokenizer.save_pretrained(work / "model")


def recipe(work: Path, name: str, method: str, steps: int, smoke: bool, overrides: dict) -> dict:
    qlora = method == "qlora"
    raw = {
        "model": {"path": str(work / "model"), "dtype": "float32" if smoke else "bfloat16"},
        "data": {"train": {"path": str(work / "data.jsonl")}, "max_length": 256 if smoke else 2048, "packing": True},
        "method": {"type": method, "lora": {"r": 16, "alpha": 32, "dropout": 0.0}},
        "quantization": {"compute_dtype": "float32" if smoke else "bfloat16"} if qlora else {},
        "train": {"max_steps": steps, "micro_batch_size": MICRO, "gradient_accumulation_steps": ACCUM, "logging_steps": 1,
                  "learning_rate": 2e-4 if method != "full" else 2e-5, "gradient_checkpointing": True, "seed": 0, "resume": "never",
                  "mixed_precision": "no" if smoke else "bf16", "optimizer": "paged_adamw_8bit" if qlora else "adamw_torch"},
        "kernels": "auto",
        "output": {"dir": str(work / "runs" / name.replace(" ", "-").replace(":", "-")), "overwrite": True, "report_to": [], "keep_last": 1},
    }
    for key, value in overrides.items():
        *parents, last = key.split(".")
        node = raw
        for part in parents:
            node = node.setdefault(part, {})
        node[last] = value
    if smoke and raw["model"]["dtype"] == "float16":  # CPU: fp16 autocast on fp32 weights still runs the GradScaler path
        raw["model"]["dtype"] = "float32"
    return raw


def run_variant(args: argparse.Namespace, part: str, name: str) -> None:
    """One ftl training run in this process: throughput, MFU, peak memory against the plan."""
    import torch

    from ftl.checkpoints.rundir import read_metrics
    from ftl.planning.memory import estimate, model_shape
    from ftl.recipe.load import validate_recipe
    from ftl.train import train
    from ftl.training.flops import peak_memory_gib

    method, overrides, needs = VARIANTS[name]
    if missing(needs):
        return emit(part, name, "skipped", reason=f"not installed: {', '.join(missing(needs))}")
    if args.smoke and name in SMOKE_SKIPS:
        return emit(part, name, "skipped", reason=SMOKE_SKIPS[name])
    try:
        cfg = validate_recipe(recipe(Path(args.work), name, method, args.steps, args.smoke, overrides)).resolved()
        cfg = cfg.for_device("cuda" if torch.cuda.is_available() else "cpu")  # as ftl train decides auto
        if torch.cuda.is_available():
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats()
        train(cfg)
        records = [r for r in read_metrics(Path(cfg.output.dir) / "metrics.jsonl") if "loss" in r]
        timed = records[1:] or records
        plan = estimate(cfg, model_shape(cfg.model.path))
        peak = peak_memory_gib()
        emit(part, name, "ok", tokens_per_s=statistics.mean(r["tokens_per_s"] for r in timed),
             mfu=statistics.mean(r.get("mfu", 0.0) for r in timed), peak_gib=peak, plan_gib=plan.allocated,
             peak_vs_plan=peak / plan.allocated if plan.allocated else None, plan_phases=plan.phases,
             mixed_precision=cfg.train.mixed_precision, first_loss=records[0]["loss"], last_loss=records[-1]["loss"])
    except Exception as err:  # noqa: BLE001
        emit(part, name, "fail", error=f"{type(err).__name__}: {err}"[:500])


def part_nccl(args: argparse.Namespace) -> None:
    """Two DDP processes on one device: NCCL on a GPU (gloo in smoke)."""
    raw = recipe(Path(args.work), "ddp 2 processes", "lora", args.steps, args.smoke, {})
    raw["distributed"] = {"strategy": "ddp", "num_processes": 2}
    path = Path(args.work) / "ddp.yaml"
    path.write_text(json.dumps(raw))  # JSON is YAML
    started = time.perf_counter()
    out = subprocess.run([sys.executable, "-m", "ftl", "train", str(path)], capture_output=True, text=True, timeout=args.part_timeout)
    lines = [line for line in (out.stdout + out.stderr).splitlines() if line.strip()]
    if out.returncode == 0:
        emit("nccl", "ddp 2 processes, 1 device", "ok", seconds=time.perf_counter() - started)
    else:
        errors = [line for line in lines if "Error" in line or "error" in line] or lines
        emit("nccl", "ddp 2 processes, 1 device", "fail", error=errors[-1][:400] if errors else f"exit {out.returncode}")


def part_hf(args: argparse.Namespace) -> None:
    """HF Trainer (+ peft, + bitsandbytes for QLoRA) on ftl's tokenized rows, padded per micro-batch as its examples do."""
    import torch
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig, TrainingArguments

    from ftl.data.sources import build_dataset
    from ftl.models.tokenizer import load_tokenizer
    from ftl.recipe.load import validate_recipe
    from ftl.training.flops import flops_counter, peak_flops, peak_memory_gib

    for method in ("lora", "full", "qlora"):
        name = f"hf {method}"
        if method == "qlora" and missing(["bitsandbytes"]):
            emit("hf", name, "skipped", reason="not installed: bitsandbytes")
            continue
        try:
            work = Path(args.work)
            raw = recipe(work, name, method, args.steps, args.smoke, {})
            raw["data"].pop("packing")
            cfg = validate_recipe(raw).resolved()
            tokenizer = load_tokenizer(cfg.model)
            rows = build_dataset(cfg.data.train, tokenizer, cfg.data, seed=0).select_columns(["input_ids", "labels"])
            dtype = torch.float32 if args.smoke else torch.bfloat16
            extra = {}
            if method == "qlora":
                extra["quantization_config"] = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4",
                                                                  bnb_4bit_use_double_quant=True, bnb_4bit_compute_dtype=dtype)
            if torch.cuda.is_available():
                torch.cuda.empty_cache()
                torch.cuda.reset_peak_memory_stats()
            model = AutoModelForCausalLM.from_pretrained(cfg.model.path, dtype=dtype, **extra)
            if method != "full":
                from peft import LoraConfig, get_peft_model, prepare_model_for_kbit_training

                if method == "qlora":
                    model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=True)
                model = get_peft_model(model, LoraConfig(r=16, lora_alpha=32, lora_dropout=0.0, target_modules="all-linear", task_type="CAUSAL_LM"))
            targs = TrainingArguments(
                output_dir=str(work / "runs" / name.replace(" ", "-")), per_device_train_batch_size=MICRO, gradient_accumulation_steps=ACCUM,
                max_steps=args.steps, learning_rate=cfg.train.learning_rate, lr_scheduler_type="cosine", logging_steps=1,
                save_strategy="no", report_to=[], bf16=not args.smoke, gradient_checkpointing=True, use_cpu=args.smoke,
                remove_unused_columns=False, seed=0, optim="paged_adamw_8bit" if method == "qlora" else "adamw_torch_fused",
                disable_tqdm=True)
            timed = timed_hf_trainer(model, tokenizer, rows, targs)
            base = model.get_base_model() if method != "full" else model
            peak = peak_flops()
            emit("hf", name, "ok", tokens_per_s=timed["tokens_per_s"], peak_gib=peak_memory_gib(), real_fraction=timed["real_fraction"],
                 mfu=flops_counter(base)(timed["tokens_per_row"]) * timed["tokens_per_s"] / peak if peak else 0.0)
            del model
        except Exception as err:  # noqa: BLE001
            emit("hf", name, "fail", error=f"{type(err).__name__}: {err}"[:500])


# ----------------------------------------------------------------------------- the driver


def worker(args: argparse.Namespace) -> None:
    if args.part == "env":
        part_env(args)
    elif args.part == "kernels":
        part_kernels(args)
    elif args.part == "bnb":
        part_bnb(args)
    elif args.part == "nccl":
        part_nccl(args)
    elif args.part == "hf":
        part_hf(args)
    else:
        for name in args.variants.split(","):
            run_variant(args, args.part, name)


def install_wheels(log: list[str]) -> None:
    """On the GPU machine: what ``make gpu-wheels`` put in .whl/ and ftl itself, without a registry."""
    wheels = sorted((ROOT / ".whl").glob("*.whl"))
    if not wheels:
        log.append("install: no .whl/ folder travelled (make gpu-wheels, then carry .whl)")
    pip = [sys.executable, "-m", "pip", "install", "--quiet", "--disable-pip-version-check", "--no-index", "--find-links", str(ROOT / ".whl")]
    for cmd in ([*pip, "--no-deps", *map(str, wheels)] if wheels else None, [*pip, "--no-deps", "-e", str(ROOT)]):
        if cmd:
            out = subprocess.run(cmd, capture_output=True, text=True)
            if out.returncode != 0:
                log.append(f"install failed: {' '.join(cmd[-2:])}\n{out.stderr[-2000:]}")
    importlib.invalidate_caches()  # so that find_spec sees what was just installed


def spawn(args: argparse.Namespace, part: str, timeout: float, variants: list[str] | None = None) -> tuple[list[dict], str]:
    cmd = [sys.executable, __file__, "--worker", "--part", part, "--work", args.work, "--steps", str(args.steps),
           "--part-timeout", str(int(timeout))] + (["--smoke"] if args.smoke else []) + (["--variants", ",".join(variants)] if variants else [])
    env = {**os.environ, "PYTHONUNBUFFERED": "1", **({"TRITON_INTERPRET": "1"} if args.smoke and part == "kernels" else {})}
    try:
        out = subprocess.run(cmd, capture_output=True, text=True, timeout=max(timeout, 1), env=env)
        stdout, stderr, note = out.stdout, out.stderr, "" if out.returncode == 0 else f"exit {out.returncode}"
    except subprocess.TimeoutExpired as err:
        decode = lambda b: b.decode(errors="replace") if isinstance(b, bytes) else (b or "")  # noqa: E731
        stdout, stderr, note = decode(err.stdout), decode(err.stderr), f"stopped at its budget ({timeout:.0f} s)"
    items = [json.loads(line[7:]) for line in stdout.splitlines() if line.startswith("RESULT ")]
    if note:
        items.append({"part": part, "name": ",".join(variants or [part]), "status": "fail", "error": note})
    return items, "" if not note and all(i["status"] != "fail" for i in items) else f"== {part} {variants or ''}\n{stderr[-4000:]}"


def markdown(items: list[dict], seconds: float, by_part: dict[str, float], smoke: bool) -> str:
    env = next((i for i in items if i["part"] == "env"), {})
    lines = [f"# ftl GPU check ({time.strftime('%Y-%m-%d')}{', smoke run on CPU: the numbers mean nothing' if smoke else ''})", "",
             f"{env.get('device')} · torch {env.get('torch')} (CUDA {env.get('cuda')}, NCCL {env.get('nccl')}) · triton "
             f"{env.get('triton')} · bitsandbytes {env.get('bitsandbytes', 'absent')} · missing: {', '.join(env.get('missing', [])) or 'nothing'}"
             f" · {seconds:.0f} s in all ({', '.join(f'{p} {t:.0f} s' for p, t in by_part.items())})", ""]
    columns = {"kernels": ["max_rel_error", "speedup", "triton_ms", "torch_ms", "peak_memory_vs_torch"],
               "bnb": ["quantization_rel_error", "forward_rel_error", "input_grad_rel_error"],
               "train": ["tokens_per_s", "mfu", "peak_gib", "plan_gib", "peak_vs_plan", "last_loss"],
               "precision": ["mixed_precision", "tokens_per_s", "peak_gib", "peak_vs_plan", "first_loss", "last_loss"],
               "nccl": ["seconds"], "hf": ["tokens_per_s", "mfu", "peak_gib", "ftl_vs_hf"]}
    ftl = {i["name"]: i for i in items if i["part"] == "train" and i["status"] == "ok"}
    for item in items:
        if item["part"] == "hf" and item["status"] == "ok" and item["name"].removeprefix("hf ") in ftl:
            item["ftl_vs_hf"] = ftl[item["name"].removeprefix("hf ")]["tokens_per_s"] / item["tokens_per_s"]
    for part, cols in columns.items():
        rows = [i for i in items if i["part"] == part]
        if not rows:
            continue
        lines += [f"## {part}", "", "| item | status | " + " | ".join(cols) + " |", "|---" * (len(cols) + 2) + "|"]
        for i in rows:
            cells = [_cell(i.get(c)) for c in cols]
            status = i["status"] + (f": {i.get('error') or i.get('reason')}" if i["status"] != "ok" else "")
            lines.append(f"| {i['name']} | {status} | " + " | ".join(cells) + " |")
        lines.append("")
    return "\n".join(lines)


def _cell(value: Any) -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        return f"{value:.3g}" if abs(value) < 1000 else f"{value:.0f}"
    return str(value)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out", default="gpu-check", help="folder for report.json and report.md")
    parser.add_argument("--work", default="/tmp/ftl-gpu-check", help="model, data and runs")
    parser.add_argument("--budget", type=float, default=540, help="seconds for all parts together")
    parser.add_argument("--steps", type=int, default=None, help="optimizer steps per training run (default 8; smoke 2)")
    parser.add_argument("--parts", default=",".join(PARTS), help=f"a subset of {','.join(PARTS)}")
    parser.add_argument("--smoke", action="store_true", help="every part on CPU with a tiny model: checks the script, measures nothing")
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--part", help=argparse.SUPPRESS)
    parser.add_argument("--variants", help=argparse.SUPPRESS)
    parser.add_argument("--part-timeout", type=float, default=600, help=argparse.SUPPRESS)
    args = parser.parse_args()
    args.steps = args.steps or (2 if args.smoke else 8)
    if args.worker:
        return worker(args)

    started = time.perf_counter()
    log: list[str] = []
    if not args.smoke:
        install_wheels(log)
    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    items: list[dict] = []
    seconds_by_part: dict[str, float] = {}
    for part in [p for p in PARTS if p in args.parts.split(",")]:
        # What is left of the budget, shared among the parts still to run (an early finish leaves its time to later parts).
        later = [p for p in PARTS if p in args.parts.split(",") and list(PARTS).index(p) >= list(PARTS).index(part)]
        budget = (args.budget - (time.perf_counter() - started)) * PARTS[part] / sum(PARTS[p] for p in later)
        trainer_missing = missing(TRAINER_NEEDS)
        if part in ("train", "precision", "nccl", "hf") and trainer_missing:
            items.append({"part": part, "name": part, "status": "skipped", "reason": f"ftl's trainer needs {', '.join(trainer_missing)}"})
            continue
        if part == "bnb" and missing(["bitsandbytes"]):
            items.append({"part": part, "name": part, "status": "skipped", "reason": "not installed: bitsandbytes"})
            continue
        if part in ("train", "precision", "nccl", "hf") and not (work / "model" / "config.json").exists():
            make_data(work / "data.jsonl", rows=400 if args.smoke else 4000)
            write_model(work, args.smoke)
        part_started = time.perf_counter()
        seconds_by_part[part] = 0.0
        # On a GPU each training run gets a process of its own (its peak memory alone); in smoke one process runs them all.
        groups = [[v] for v in PART_VARIANTS[part]] if part in PART_VARIANTS and not args.smoke else [PART_VARIANTS.get(part)]
        for variants in groups:
            left = budget - (time.perf_counter() - part_started)
            found, failure = spawn(args, part, left, variants)
            items += found
            if failure:
                log.append(failure)
        seconds_by_part[part] = time.perf_counter() - part_started
        (out / "report.json").write_text(json.dumps({"items": items}, indent=1, default=str))  # kept if the machine goes away
    seconds = time.perf_counter() - started
    (out / "report.json").write_text(json.dumps({"seconds": seconds, "seconds_by_part": seconds_by_part, "smoke": args.smoke, "items": items}, indent=1, default=str))
    (out / "report.md").write_text(markdown(items, seconds, seconds_by_part, args.smoke))
    if log:
        (out / "logs.txt").write_text("\n\n".join(log))
    print((out / "report.md").read_text())
    failed = [f"{i['part']}/{i['name']}" for i in items if i["status"] == "fail"]
    print(f"gpu_check: {len(items)} items, {len(failed)} failed{': ' + ', '.join(failed) if failed else ''} ({seconds:.0f} s); "
          f"report in {out}")
    sys.exit(1 if failed else 0)


if __name__ == "__main__":
    main()
