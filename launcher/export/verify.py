"""Is an export the trained model? Two questions, answered separately.

- **The merge**: the float32 merge (base + adapter, computed as the export computes it) against the
  model as trained (base + adapter as peft runs it, quantized as in training), on the same token
  sequences. This is what a merge can get wrong (a scale, a key, a transposed or missing tensor, the
  4-bit round trip), so it must agree to float32 accuracy.
- **The rounding**: the export loaded as a serving engine loads it (``from_pretrained`` in its
  dtype) must hold exactly the float32 merge rounded to that dtype, bit for bit; its logits against
  the float32 merge are the cost of serving in bf16/fp16, reported, not judged. (On SmolLM2-135M
  bf16 alone moves logits by more than any tolerance that would still catch a merge bug.)
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from transformers import AutoConfig

from ftl.recipe.schema import ExportSection, Recipe
from ftl.export.merge import Merge
from ftl.models.build import HEADS
from ftl.distributed.strategies.zero import zero_fp32_state_dict
from ftl.precision import DTYPES

# Largest max |logit difference| of the float32 merge, relative to the trained model's logit std:
# float32 only reorders sums.
TOLERANCE = 1e-4
ORIGINAL_TOLERANCE = 1.0  # qlora_merge: original moves logits by design; only gross errors fail


@torch.no_grad()
def verify_export(out: Path, checkpoint: Path, recipe: Recipe, options: ExportSection, mode: str, merge: Merge,
                  sequences: list[list[int]], head: str = "causal_lm") -> dict[str, Any]:
    """``head``: causal_lm compares next-token logits at every position; score (a reward model) the one
    score of each sequence, against the spread of those scores."""
    auto_class = HEADS[head][0]
    trained = _trained_model(out, checkpoint, recipe, mode, head)
    reference = [trained(input_ids=torch.tensor([ids])).logits.float()[0] for ids in sequences]
    del trained
    if head == "score":
        scale = torch.cat(reference).std().item() if len(reference) > 1 else reference[0].abs().item()
    else:
        scale = max(r.std().item() for r in reference)

    merged = auto_class.from_config(AutoConfig.from_pretrained(out), dtype=torch.float32).eval()
    merged.load_state_dict(merge.float32_state_dict(), strict=False)
    merged.tie_weights()
    merged_logits = [merged(input_ids=torch.tensor([ids])).logits.float()[0] for ids in sequences]
    merge_diff = _compare(reference, merged_logits)

    dtype = DTYPES[options.dtype]
    served = auto_class.from_pretrained(out, dtype=dtype).eval()
    expected = merged.state_dict()
    mismatched = sorted(name for name, tensor in served.state_dict().items()
                        if name not in expected or not torch.equal(tensor, expected[name].to(tensor.dtype)))
    rounding = _compare(merged_logits, [served(input_ids=torch.tensor([ids])).logits.float()[0] for ids in sequences])

    tolerance = (ORIGINAL_TOLERANCE if mode.endswith("original") else TOLERANCE) * scale
    return {
        "verified": True,
        "sequences": len(sequences),
        "positions": sum(len(ids) for ids in sequences),
        "reference_logit_std": scale,
        "merge_max_abs_logit_diff": merge_diff["max"],
        "merge_mean_abs_logit_diff": merge_diff["mean"],
        "merge_greedy_agreement": merge_diff["greedy"],
        "merge_tolerance": tolerance,
        "weights_equal_rounded_merge": not mismatched,
        "mismatched_tensors": mismatched[:10],
        "rounding_max_abs_logit_diff": rounding["max"],
        "rounding_mean_abs_logit_diff": rounding["mean"],
        "rounding_greedy_agreement": rounding["greedy"],
        "passed": merge_diff["max"] <= tolerance and not mismatched,
    }


def _trained_model(out: Path, checkpoint: Path, recipe: Recipe, mode: str, head: str) -> torch.nn.Module:
    """The model as trained (base loaded in ``model.dtype``, 4-bit for QLoRA, + adapter through peft),
    computing in float32."""
    from ftl.models.build import compute_in_float32, load_for_inference

    auto_class, _, head_kwargs = HEADS[head]
    if mode == "full-zero3":
        model = auto_class.from_config(AutoConfig.from_pretrained(out), dtype=torch.float32).eval()
        model.load_state_dict(zero_fp32_state_dict(checkpoint), strict=False)
        return model
    from ftl.checkpoints.rundir import RunDir

    if mode.startswith("lora") and RunDir.of_checkpoint(checkpoint) is None:  # an adapter trained elsewhere: peft's own
        from peft import PeftModel

        base = auto_class.from_pretrained(recipe.model.path, dtype=torch.float32, **head_kwargs)
        return PeftModel.from_pretrained(base, checkpoint).eval()
    model, _ = load_for_inference(checkpoint, dtype=torch.float32, trust_remote_code=recipe.model.trust_remote_code)
    return compute_in_float32(model)


def _compare(reference: list[torch.Tensor], other: list[torch.Tensor]) -> dict[str, float]:
    diffs = [(r - o).abs() for r, o in zip(reference, other)]
    agree = sum((r.argmax(-1) == o.argmax(-1)).sum().item() for r, o in zip(reference, other))
    positions = sum(r.shape[0] for r in reference)
    return {"max": max(d.max().item() for d in diffs), "mean": sum(d.sum().item() for d in diffs) / sum(d.numel() for d in diffs),
            "greedy": agree / max(positions, 1)}


def verification_sequences(recipe: Recipe, tokenizer: Any, limit: int) -> list[list[int]]:
    """Token ids of the first rows of the eval split (else train), or fixed prompts without data."""
    from ftl.data.sources import build_dataset

    for sources in (next(iter(recipe.data.eval_sets().values()), None), recipe.data.train):
        if sources and all(Path(s.path).exists() for s in sources):
            dataset = build_dataset(sources, tokenizer, recipe.data)
            return [list(dataset[i]["input_ids"]) for i in range(min(limit, len(dataset)))]
    texts = ["The capital of France is", "def fibonacci(n):", "Write a haiku about the sea.", "1, 2, 3, 5, 8,"]
    return [tokenizer(t)["input_ids"] for t in texts[:limit]]
