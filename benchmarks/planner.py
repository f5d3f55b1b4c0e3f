"""How right ``ftl plan`` is: estimate / measured peak memory.

- ``--recipe R ...``: each recipe's real peak over a few steps (``ftl plan --measure``: on a GPU
  ``torch.cuda.max_memory_allocated``, on CPU the bytes one step holds counted tensor by tensor),
  next to its estimate.
- default: on CPU, tiny Llama/Qwen2/Mistral models trained full, with LoRA, QLoRA and DoRA, with
  and without activation checkpointing (``ftl.planning.probe``), then the published peaks of
  tests/planning/test_memory_reference.py (torchtune, LitGPT).

Usage: python benchmarks/planner.py [--recipe recipes/x.yaml ...] [--archs llama qwen2 mistral]
"""

from __future__ import annotations

import argparse
import importlib.util
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
GIB = 2**30


def measure_recipes(paths: list[str]) -> None:
    from ftl.recipe.load import load_recipe
    from ftl.planning.measure import measure

    for path in paths:
        result = measure(load_recipe(Path(path)))
        ratio = result["estimate_gib"] / result["measured_gib"]
        print(f"{path}: estimate {result['estimate_gib']:.2f} GiB, measured {result['measured_gib']:.2f} GiB "
              f"({result['mode']}): estimate/measured {ratio:.3f}")


def cpu_grid(archs: list[str]) -> None:
    sys.path.insert(0, str(ROOT / "tests"))
    from test_memory_probe import MICRO, SEQ, _recipe

    from ftl.distributed import strategies
    from ftl.planning.memory import activation_terms, estimate, model_shape, precision
    from ftl.planning.probe import measure_step
    from ftl.tiny import write_tiny_model

    print("| model | method | checkpointing | activations est/measured | peak est/measured (phase) |\n|---|---|---|---|---|")
    with tempfile.TemporaryDirectory() as tmp:
        for arch in archs:
            model = write_tiny_model(Path(tmp) / arch, arch, hidden_size=256, layers=2)
            shape = model_shape(str(model))
            for method, dora in (("full", False), ("lora", False), ("qlora", False), ("lora", True), ("qlora", True)):
                for checkpointing in (False, True):
                    recipe = _recipe(model, method, checkpointing, Path(tmp), dora=dora)
                    measured = measure_step(recipe)
                    terms = activation_terms(recipe, shape, MICRO * SEQ, SEQ, precision(recipe, strategies.build("single", recipe)), False)
                    result = estimate(recipe, shape)
                    print(f"| {arch} | {method}{' (DoRA)' if dora else ''} | {checkpointing} | "
                          f"{(terms.blocks + terms.copies) / measured.blocks:.3f} | "
                          f"{result.allocated * GIB / measured.peak:.3f} ({result.peak_phase}) |", flush=True)


def reference_table() -> None:
    spec = importlib.util.spec_from_file_location("reference", ROOT / "tests/planning/test_memory_reference.py")
    reference = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(reference)
    from ftl.planning.memory import estimate, model_shape

    print("\n| case | published GiB | estimate GiB (phase) | estimate/published |\n|---|---|---|---|")
    with tempfile.TemporaryDirectory() as tmp:
        for case, (published, model, sections) in sorted(reference.CASES.items()):
            recipe = reference._recipe(sections, model, Path(tmp))
            result = estimate(recipe, model_shape(recipe.model.path))
            note = f" ({reference.NOT_EXPRESSIBLE[case]})" if case in reference.NOT_EXPRESSIBLE else ""
            print(f"| {case} | {published:.2f} | {result.allocated:.2f} ({result.peak_phase}) | {result.allocated / published:.2f}{note} |")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--recipe", nargs="*", default=[])
    parser.add_argument("--archs", nargs="*", default=["llama", "qwen2", "mistral"])
    args = parser.parse_args()
    if args.recipe:
        measure_recipes(args.recipe)
        return
    cpu_grid(args.archs)
    reference_table()


if __name__ == "__main__":
    main()
