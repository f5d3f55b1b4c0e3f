"""Every strategy computes what one process computes: loss traces of 20 steps, on 2 CPU processes.

Each run is a real launch (``ftl train`` -> ``accelerate launch`` -> 2 ranks over gloo): DDP and
FSDP2 through torch, ZeRO through a real DeepSpeed engine. The global batch is the same
everywhere (one process: micro-batch 4 x accumulation 4; two: 4 x 2 x 2 ranks), so only the
order of floating-point reductions differs. Tolerance: 1e-5 relative per step; measured on the
2-core CPU machine, the largest deviation over 20 steps was 1e-7 for DDP, ZeRO-1/2/3, FSDP2 and
2 machines (LoRA and full fine-tuning) and 1.7e-7 for ZeRO-3 with offload (DeepSpeed's CPU Adam).
"""

from __future__ import annotations

import json
import shutil
import signal
import socket
import subprocess
import sys
import time
from typing import Callable
from pathlib import Path

import pytest
import torch

from ftl.checkpoints.checkpoint import write_manifest
from ftl.recipe.schema import ExportSection
from ftl.recipe.load import validate_recipe
from ftl.export.write import export
from ftl.checkpoints.rundir import read_metrics
from ftl.training.signals import EXIT_STOPPED
from ftl.train import train
from conftest import ftl_train, make_recipe, write_yaml

pytestmark = pytest.mark.multiprocess

STEPS = 20
RTOL = 1e-5
METHODS = {
    "lora": {"type": "lora", "lora": {"r": 8, "alpha": 16, "dropout": 0.0}},
    "full": {"type": "full"},
    # 4-bit NF4 base packed into float32 storage, so that ZeRO-3 and FSDP2 can shard it.
    "qlora": {"type": "qlora", "lora": {"r": 8, "alpha": 16, "dropout": 0.0}},
}
QUANTIZATION = {"qlora": {"compute_dtype": "float32", "quant_storage": "float32"}}
RUNS = {
    "lora": ["ddp", "zero1", "zero2", "zero3", "zero3-offload", "fsdp2"],
    "full": ["ddp", "zero2", "zero3", "fsdp2", "2-machines"],
    "qlora": ["ddp", "zero3", "fsdp2"],
}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def recipe_dict(model: Path, data: tuple[Path, Path], run_dir: Path, method: str, processes: int, **dist) -> dict:
    accum = 4 // (processes * dist.get("num_machines", 1))
    train_cfg = {"max_steps": STEPS, "micro_batch_size": 4, "gradient_accumulation_steps": accum,
                 "learning_rate": 1e-3, "logging_steps": 1, "save_steps": 10, "seed": 0, "lr_scheduler": "linear"}
    return make_recipe(model, data[0], run_dir, data[1], method=METHODS[method], train=train_cfg,
                       quantization=QUANTIZATION.get(method, {}), distributed={"num_processes": processes, **dist})


def losses(run_dir: Path) -> dict[int, float]:
    return {r["step"]: r["loss"] for r in read_metrics(run_dir / "metrics.jsonl") if "loss" in r}


def run_strategy(model: Path, data, run_dir: Path, method: str, strategy: str) -> dict[int, float]:
    port = free_port()
    if strategy == "2-machines":
        # Two "machines" of one process each on 127.0.0.1, sharing the run directory.
        recipe = write_yaml(run_dir.with_suffix(".yaml"), recipe_dict(
            model, data, run_dir, method, 1, strategy="ddp", num_machines=2, main_process_port=port))
        procs = [
            subprocess.Popen([sys.executable, "-m", "ftl", "train", str(recipe), f"distributed.machine_rank={r}"],
                             stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
            for r in (0, 1)
        ]
        outputs = [p.communicate(timeout=600)[0] for p in procs]
        assert [p.returncode for p in procs] == [0, 0], outputs[0][-3000:] + outputs[1][-3000:]
        return losses(run_dir)
    dist = {"strategy": strategy, "main_process_port": port}
    if strategy == "zero3-offload":
        # Also without gathering the model at saves: the adapter alone is gathered.
        dist = {"strategy": "zero3", "main_process_port": port,
                "zero": {"offload_optimizer": True, "offload_params": True, "gather_16bit_weights_on_model_save": False}}
    recipe = write_yaml(run_dir.with_suffix(".yaml"), recipe_dict(model, data, run_dir, method, 2, **dist))
    assert ftl_train(str(recipe)) == 0
    return losses(run_dir)


@pytest.fixture(scope="module", params=list(METHODS))
def traces(request, tiny_llama, demo_data, tmp_path_factory) -> tuple[str, Path, dict[str, dict[int, float]]]:
    method = request.param
    root = tmp_path_factory.mktemp(f"parity-{method}")
    single = validate_recipe(recipe_dict(tiny_llama, demo_data, root / "single", method, 1))
    train(single)
    result = {"single": losses(root / "single")}
    for strategy in RUNS[method]:
        result[strategy] = run_strategy(tiny_llama, demo_data, root / strategy, method, strategy)
    return method, root, result


def assert_same_trace(reference: dict[int, float], trace: dict[int, float], what: str) -> None:
    assert sorted(trace) == sorted(reference), f"{what}: steps {sorted(trace)}"
    for step, loss in reference.items():
        assert abs(trace[step] - loss) <= RTOL * abs(loss), f"{what}: step {step} loss {trace[step]} vs {loss}"


def objective_recipe(model: Path, data: Path, data_format: str, objective: str, steps: int) -> Callable[[Path, int, str], dict]:
    """A LoRA run of ``objective`` on ``data`` for :func:`objective_matches_one_process`: 8 rows per step,
    as micro-batch 2 x 4 on one process or micro-batch 2 x 2 on each of two."""
    def recipe(run_dir: Path, processes: int, strategy: str) -> dict:
        return make_recipe(
            model, data, run_dir, data={"train": {"path": str(data), "format": data_format}},
            method={"objective": objective, "lora": {"r": 8, "alpha": 16, "dropout": 0.0}},
            train={"max_steps": steps, "micro_batch_size": 2, "gradient_accumulation_steps": 4 // processes,
                   "learning_rate": 5e-3, "logging_steps": 1, "seed": 0, "lr_scheduler": "linear"},
            distributed={"num_processes": processes, "strategy": strategy, "main_process_port": free_port()})

    return recipe


def objective_matches_one_process(recipe: Callable[[Path, int, str], dict], root: Path, strategies: tuple[str, ...],
                                  what: str) -> None:
    """An objective's run on 2 processes under each strategy has the loss trace of 1 process (in this
    process). ``recipe(run_dir, processes, strategy)`` gives the recipe; the trace must move."""
    train(validate_recipe(recipe(root / "single", 1, "single")))
    reference = losses(root / "single")
    assert len(reference) >= 10 and max(reference.values()) - min(reference.values()) > 1e-4, reference
    for strategy in strategies:
        config = write_yaml(root / f"{strategy}.yaml", recipe(root / strategy, 2, strategy))
        assert ftl_train(str(config)) == 0
        assert_same_trace(reference, losses(root / strategy), f"{what}/{strategy}")


def test_every_strategy_matches_one_process(traces):
    method, _, result = traces
    reference = result["single"]
    assert len(reference) == STEPS and reference[STEPS] < reference[1]  # it learned something
    for strategy, trace in result.items():
        assert_same_trace(reference, trace, f"{method}/{strategy}")


def test_checkpoints_of_sharded_runs_hold_a_loadable_model(traces):
    """ZeRO and FSDP2 checkpoints hold their sharded state and a consolidated model (or adapter)."""
    method, root, _ = traces
    weights = "model.safetensors" if method == "full" else "adapter_model.safetensors"
    strategies = [("zero3", "deepspeed"), ("fsdp2", "dcp"), ("ddp", None)]
    if "zero3-offload" in RUNS[method]:
        strategies.append(("zero3-offload", "deepspeed"))
    for strategy, shard_dir in strategies:
        ckpt = root / strategy / "checkpoints" / f"step-{STEPS}"
        assert (ckpt / weights).is_file()
        assert json.loads((ckpt / "trainer_state.json").read_text())["step"] == STEPS
        if shard_dir:
            assert (ckpt / shard_dir).is_dir() and not (ckpt / "optimizer.pt").exists()
    # Every rank of the DeepSpeed run wrote its partition of the optimizer states.
    assert len(list((root / "zero3" / "checkpoints" / "step-10" / "deepspeed").glob("*optim_states.pt"))) == 2


@pytest.mark.parametrize("traces", ["lora", "full"], indirect=True)
@pytest.mark.parametrize("strategy", ["zero3", "fsdp2"])
def test_resume_continues_the_trace(traces, strategy, tmp_path, capfd):
    """Resume from the step-10 checkpoint of a sharded run: steps 11-20 repeat the uninterrupted run."""
    method, root, result = traces
    run_dir = tmp_path / "run"
    shutil.copytree(root / strategy, run_dir)
    shutil.rmtree(run_dir / "checkpoints" / f"step-{STEPS}")
    (run_dir / "checkpoints" / "latest").write_text("step-10")
    original = (root / strategy / "launch" / "recipe.yaml").read_text()
    recipe_path = tmp_path / "resume.yaml"
    recipe_path.write_text(original.replace(str(root / strategy), str(run_dir)))
    assert ftl_train(str(recipe_path), f"distributed.main_process_port={free_port()}") == 0
    out = capfd.readouterr()
    assert "resuming from" in out.out + out.err
    resumed = losses(run_dir)
    assert_same_trace(result[strategy], resumed, f"{method}/{strategy} resumed")


@pytest.mark.parametrize("traces", ["lora"], indirect=True)
@pytest.mark.parametrize("strategy", ["ddp", "fsdp2"])
def test_compiled_layers_under_two_ranks_trace_the_eager_run(traces, strategy, tiny_llama, demo_data, tmp_path, monkeypatch):
    """train.compile on 2 ranks: the layers are compiled before DDP wraps or FSDP2 shards them, and
    20 steps follow the one-process eager trace to a relative 1e-4 (inductor reorders fp32 sums,
    as in the single-process compile test). A fresh inductor cache shows the ranks compiled."""
    _, _, result = traces
    cache = tmp_path / "inductor"
    monkeypatch.setenv("TORCHINDUCTOR_CACHE_DIR", str(cache))
    raw = recipe_dict(tiny_llama, demo_data, tmp_path / "run", "lora", 2, strategy=strategy, main_process_port=free_port())
    raw["train"]["compile"] = True
    assert ftl_train(str(write_yaml(tmp_path / "r.yaml", raw))) == 0
    assert any(cache.rglob("*.py")), "the ranks compiled nothing"
    trace, reference = losses(tmp_path / "run"), result["single"]
    assert sorted(trace) == sorted(reference)
    for step, loss in reference.items():
        assert abs(trace[step] - loss) <= 1e-4 * abs(loss), f"{strategy} compiled: step {step} loss {trace[step]} vs {loss}"


@pytest.mark.parametrize("traces", ["lora"], indirect=True)
def test_stop_signal_reaches_the_ranks_and_resume_finishes_the_trace(traces, tiny_llama, demo_data, tmp_path):
    """SIGUSR1 to `ftl train` (what Slurm sends): the ranks stop together with a checkpoint, exit 75;
    running the same command again finishes the run with the uninterrupted DDP trace."""
    method, _, result = traces
    run_dir = tmp_path / "run"
    recipe = write_yaml(tmp_path / "r.yaml", recipe_dict(tiny_llama, demo_data, run_dir, method, 2,
                                                         strategy="ddp", main_process_port=free_port()))
    proc = subprocess.Popen([sys.executable, "-m", "ftl", "train", str(recipe)],
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    metrics = run_dir / "metrics.jsonl"
    deadline = time.monotonic() + 300
    while not (metrics.exists() and '"step": 5,' in metrics.read_text()):
        assert proc.poll() is None and time.monotonic() < deadline, proc.communicate()[0][-3000:]
        time.sleep(0.05)
    proc.send_signal(signal.SIGUSR1)
    output = proc.communicate(timeout=300)[0]
    assert proc.returncode == EXIT_STOPPED, output[-3000:]
    assert "Traceback" not in output  # the agent saw a clean exit, not a failure
    stopped = json.loads((run_dir / "STOPPED").read_text())
    assert stopped["reason"] == "SIGUSR1" and 5 <= stopped["step"] < STEPS
    assert ftl_train(str(recipe), f"distributed.main_process_port={free_port()}") == 0
    assert_same_trace(result["ddp"], losses(run_dir), f"{method}/ddp stopped and resumed")


def test_guard_stops_a_launch_that_lost_its_processes(tiny_llama, demo_data, tmp_path):
    """`accelerate launch --cpu --num_processes 2` silently starts one process: the guard stops it."""
    run_dir = tmp_path / "run"
    recipe = write_yaml(tmp_path / "r.yaml", recipe_dict(tiny_llama, demo_data, run_dir, "lora", 2, strategy="ddp"))
    out = subprocess.run([sys.executable, "-m", "accelerate.commands.launch", "--cpu", "--num_processes", "2",
                          "-m", "ftl.train", str(recipe)], capture_output=True, text=True, timeout=300)
    assert out.returncode != 0
    assert "error: distributed: the recipe plans 2 process(es) (ddp: 1 machine(s) x 2), but this process is rank 0 of 1" in out.stderr
    assert not (run_dir / "checkpoints").exists()


def exported_tensors(directory: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    return {k: v for f in sorted(directory.glob("model*.safetensors")) for k, v in load_file(f).items()}


@pytest.mark.parametrize("traces", ["lora", "full"], indirect=True)
def test_exports_of_sharded_runs_equal_the_single_process_export(traces, tmp_path):
    """Exports from ZeRO-3 and FSDP2 checkpoints hold the weights of the one-process run's export.

    LoRA under ZeRO-3 comes from the run that gathered only the adapter at saves; full fine-tuning
    under ZeRO-3 from DeepSpeed's partitioned fp32 states (zero_to_fp32), as a checkpoint saved with
    distributed.zero.gather_16bit_weights_on_model_save: false holds no model files."""
    method, root, _ = traces
    options = ExportSection(dtype="float32")
    reference = exported_tensors(Path(export(root / "single", tmp_path / "single", options)["out"]))
    for strategy in ("zero3-offload" if method == "lora" else "zero3", "fsdp2"):
        run_dir = tmp_path / strategy
        shutil.copytree(root / strategy, run_dir, ignore=shutil.ignore_patterns("export*"))
        checkpoint = run_dir / "checkpoints" / f"step-{STEPS}"
        if strategy == "zero3":
            for f in checkpoint.glob("model*.safetensors*"):
                f.unlink()
            write_manifest(checkpoint)
        report = export(run_dir, tmp_path / f"out-{strategy}", options)
        assert report["passed"] and report["merge_max_abs_logit_diff"] < 1e-5, report
        assert report["mode"] == ("full-zero3" if strategy == "zero3" else method)
        tensors = exported_tensors(tmp_path / f"out-{strategy}")
        assert set(tensors) == set(reference)
        for name, value in reference.items():
            assert torch.allclose(tensors[name], value, rtol=1e-4, atol=1e-6), f"{method}/{strategy}: {name}"
