"""``ftl plan --measure``: peak memory of a few real training steps, next to the estimate.

Each measurement is a fresh process (a peak is per process) that trains the recipe for three
steps on packed rows, so every micro-batch is ``data.max_length`` long, as the estimate assumes.
When the model would not fit this machine, it measures proxies of the same architecture with one
and two layers (random weights) and extrapolates linearly in the number of layers.

On a GPU the figure is ``torch.cuda.max_memory_allocated``. On CPU, for SFT, it is the peak of one
step counted tensor by tensor (``ftl.planning.probe``: what CUDA's allocator would report for the
same step); for preference objectives, the growth of peak RSS over the process's RSS before the
model was loaded, which includes allocator slack that the estimate does not model.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

from ftl.recipe.schema import Recipe
from ftl.recipe.load import validate_recipe
from ftl.errors import UserError
from ftl.planning.memory import GIB, Shape, estimate, model_shape

STEPS = 3


def _available_gib() -> float:
    import torch

    if torch.cuda.is_available():
        return torch.cuda.mem_get_info()[0] / GIB
    for line in Path("/proc/meminfo").read_text().splitlines():
        if line.startswith("MemAvailable:"):
            return int(line.split()[1]) / 2**20
    return 0.0


def _proxy(recipe: Recipe, layers: int, out: Path) -> Path:
    """The model of ``recipe`` with ``layers`` decoder layers and random weights, with its tokenizer."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    from ftl.models.tokenizer import load_tokenizer
    from ftl.precision import torch_dtype

    config = AutoConfig.from_pretrained(recipe.model.path, local_files_only=True)
    config.num_hidden_layers = layers
    if getattr(config, "layer_types", None):
        config.layer_types = config.layer_types[:layers]
    dtype = torch_dtype(recipe.model.dtype)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32 if dtype == "auto" else dtype)
    model.save_pretrained(out)
    load_tokenizer(recipe.model).save_pretrained(out)
    return out


def _measure_once(recipe: Recipe, work: Path, model_path: str | None = None) -> float:
    raw = json.loads(recipe.model_dump_json())
    if model_path:
        raw["model"]["path"] = model_path
        raw["model"]["tokenizer"] = None
    raw["data"].update(packing=True, eval=None, eval_fraction=None, streaming=False, cache_dir=None)
    raw["train"].update(max_steps=STEPS, eval_steps=None, save_steps=None, logging_steps=1, resume="never")
    raw["output"].update(dir=str(work / "run"), overwrite=True, report_to=[], keep_last=1)
    spec = work / "measure.json"
    spec.write_text(json.dumps(raw))
    env = {**os.environ, "FTL_LOG_LEVEL": "WARNING"}
    done = subprocess.run([sys.executable, "-m", "ftl.planning.measure", str(spec)], capture_output=True, text=True, env=env)
    lines = [line for line in done.stdout.splitlines() if line.startswith("PEAK_GIB ")]
    if done.returncode != 0 or not lines:
        tail = (done.stderr.strip().splitlines() or ["no output"])[-1]
        raise UserError(f"ftl plan --measure: the measuring run failed: {tail}")
    return float(lines[0].split()[1])


def measure(recipe: Recipe) -> dict[str, Any]:
    """Measured vs estimated peak GiB for ``recipe`` (one process), directly or through proxies."""
    dist = recipe.distributed
    if dist.num_processes * dist.num_machines != 1:
        raise UserError("ftl plan --measure: measures single-process recipes; set distributed.num_processes=1 "
                        "(sharded strategies have the estimate only)")
    shape = model_shape(recipe.model.path)
    expected = estimate(recipe, shape).allocated
    with tempfile.TemporaryDirectory(prefix="ftl-measure-") as tmp:
        work = Path(tmp)
        if expected * 1.5 < _available_gib():
            return {"mode": "full model", "measured_gib": _measure_once(recipe, work), "estimate_gib": expected}
        peaks = {}
        for layers in (1, 2):
            proxy = _proxy(recipe, layers, work / f"proxy-{layers}")
            peaks[layers] = _measure_once(recipe, work, str(proxy))
        per_layer = peaks[2] - peaks[1]
        measured = peaks[1] + per_layer * (shape.layers - 1)
        proxy_estimates = [estimate(recipe, Shape(**{**shape.__dict__, "layers": n})).allocated for n in (1, 2)]
        return {"mode": f"proxies of 1 and 2 layers, extrapolated to {shape.layers}", "measured_gib": measured,
                "estimate_gib": expected, "proxy_measured_gib": [peaks[1], peaks[2]], "proxy_estimate_gib": proxy_estimates}


def _run(spec: Path) -> None:
    """The measuring process: train STEPS steps and print the peak memory training added."""
    import torch

    from ftl import objectives
    from ftl.training.flops import peak_memory_gib, proc_status_gib
    from ftl.objectives.sft import SFT
    from ftl.train import train

    recipe = validate_recipe(json.loads(spec.read_text()))
    if not torch.cuda.is_available() and objectives.for_recipe(recipe) is SFT:
        from ftl.planning.probe import measure_step

        print(f"PEAK_GIB {measure_step(recipe).peak / GIB}")  # counted tensor by tensor, as CUDA's allocator would
        return
    baseline = 0.0 if torch.cuda.is_available() else proc_status_gib("VmRSS")
    train(recipe)
    print(f"PEAK_GIB {peak_memory_gib() - baseline}")


if __name__ == "__main__":
    _run(Path(sys.argv[1]))
