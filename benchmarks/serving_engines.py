"""Run inside a serving engine's own venv by ``benchmarks/serving.py`` (it imports nothing of ftl).

    python serving_engines.py JOB.json RESULT.json

JOB: {"engine": "vllm" | "llamacpp", "model": dir or .gguf, "lora": adapter dir or .gguf or null,
"dtype": "float32" | "bfloat16", "prompts": [[token ids]], "max_new_tokens": N}. RESULT: per prompt
the greedy tokens and the first generated position's scores: vLLM's top-20 log-probabilities
({token id: logprob}), llama.cpp's full logit row.
"""

from __future__ import annotations

import json
import sys


def run_vllm(job: dict) -> list[dict]:
    from vllm import LLM, SamplingParams
    from vllm.inputs import TokensPrompt
    from vllm.lora.request import LoRARequest

    llm = LLM(model=job["model"], dtype=job["dtype"], enable_lora=job["lora"] is not None, max_lora_rank=64,
              max_model_len=1024, seed=0, enforce_eager=True)
    params = SamplingParams(temperature=0.0, max_tokens=job["max_new_tokens"], logprobs=20)
    lora = LoRARequest("ftl", 1, job["lora"]) if job["lora"] else None
    outputs = llm.generate([TokensPrompt(prompt_token_ids=ids) for ids in job["prompts"]], params, lora_request=lora)
    return [{"tokens": list(o.outputs[0].token_ids),
             "first_logprobs": {str(t): lp.logprob for t, lp in o.outputs[0].logprobs[0].items()}} for o in outputs]


def run_llamacpp(job: dict) -> list[dict]:
    import numpy as np
    from llama_cpp import Llama

    # logits_all: without it llama-cpp-python keeps no logits (sampling happens in its sampler)
    llm = Llama(model_path=job["model"], lora_path=job["lora"], n_ctx=1024, n_threads=2, seed=0, verbose=False, logits_all=True)
    eos = llm.token_eos()
    results = []
    for ids in job["prompts"]:
        llm.reset()
        llm.eval(ids)
        first = np.array(llm.scores[llm.n_tokens - 1], dtype=np.float64)
        tokens: list[int] = []
        for _ in range(job["max_new_tokens"]):
            token = int(np.argmax(llm.scores[llm.n_tokens - 1]))
            tokens.append(token)
            if token == eos:
                break
            llm.eval([token])
        results.append({"tokens": tokens, "first_logits": first.tolist()})
    return results


def main() -> None:
    job = json.load(open(sys.argv[1]))
    results = {"vllm": run_vllm, "llamacpp": run_llamacpp}[job["engine"]](job)
    json.dump(results, open(sys.argv[2], "w"))


if __name__ == "__main__":
    main()
