"""Checkpoints: exact resume after a graceful stop, fallback from broken checkpoints, kill -9."""

import os
import random
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Callable

import pytest
import torch
from safetensors.torch import load_file

from ftl.checkpoints.checkpoint import find_resumable, verify
from ftl.recipe.load import validate_recipe
from ftl.checkpoints.rundir import read_metrics
from ftl.training.signals import EXIT_STOPPED
from ftl.train import train
from conftest import make_recipe, write_jsonl, write_yaml

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def small_data(demo_data, tmp_path_factory) -> tuple[Path, Path]:
    """96 rows: 12 micro-batches of 8 per epoch, so 40 steps cross three epoch boundaries."""
    rows = [__import__("json").loads(line) for line in demo_data[0].read_text().splitlines()[:96]]
    return write_jsonl(tmp_path_factory.mktemp("small") / "train.jsonl", rows), demo_data[1]


VARIANTS = {
    "full": {"method": {"type": "full"}},
    "lora-dropout": {"method": {"type": "lora", "lora": {"r": 8, "alpha": 16, "dropout": 0.1}}},
}


def _recipe(model: Path, data, run_dir: Path, variant: str, **train_cfg):
    sections = {k: dict(v) for k, v in VARIANTS[variant].items()}
    cfg = {"max_steps": 40, "micro_batch_size": 8, "learning_rate": 1e-3, "logging_steps": 1, **train_cfg}
    return validate_recipe(make_recipe(model, data[0], run_dir, train=cfg, **sections))


def _losses(run_dir: Path) -> list[tuple[int, float]]:
    if not (run_dir / "metrics.jsonl").exists():
        return []
    return [(r["step"], r["loss"]) for r in read_metrics(run_dir / "metrics.jsonl") if "loss" in r]


def _sigterm_at(run_dir: Path, step: int) -> threading.Thread:
    """Send SIGTERM to this process once metrics.jsonl shows ``step`` (the loop then stops cleanly)."""

    def watch() -> None:
        metrics = run_dir / "metrics.jsonl"
        while True:
            if metrics.exists() and any(f'"step": {step},' in line for line in metrics.read_text().splitlines()):
                os.kill(os.getpid(), signal.SIGTERM)
                return
            time.sleep(0.001)

    thread = threading.Thread(target=watch, daemon=True)
    thread.start()
    return thread



def assert_resume_is_bitwise(run: Callable[[Path], Path], root: Path, stop_at: int = 3) -> None:
    """``run(run_dir)`` trains (in this process): stopped by SIGTERM at ``stop_at`` and run again,
    it logs exactly the losses of a run never stopped, and its last checkpoint's adapter (or full
    model) is bitwise that run's."""
    straight = run(root / "straight")
    watcher = _sigterm_at(root / "stopped", stop_at)
    run(root / "stopped")
    watcher.join(timeout=5)
    assert (root / "stopped" / "STOPPED").exists() and len(_losses(root / "stopped")) < len(_losses(straight))
    stopped = run(root / "stopped")
    assert _losses(stopped) == _losses(straight)
    last = sorted((straight / "checkpoints").glob("step-*"), key=lambda p: int(p.name[5:]))[-1].name
    weights = "adapter_model.safetensors" if (straight / "checkpoints" / last / "adapter_model.safetensors").exists() else "model.safetensors"
    a, b = (load_file(r / "checkpoints" / last / weights) for r in (straight, stopped))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)

def assert_accumulation_equals_one_batch(run: Callable[..., Path], root: Path, atol: float = 1e-5) -> list[dict]:
    """``run(run_dir, **train)`` trains a LoRA adapter in this process: micro-batch 2 x 4
    accumulation logs the losses of micro-batch 8 (1e-5 relative) and its last checkpoint's adapter
    is that run's (rtol 1e-5, ``atol``). Returns the big run's loss records."""
    big = run(root / "big")
    small = run(root / "small", micro_batch_size=2, gradient_accumulation_steps=4)
    a, b = ([r for r in read_metrics(r / "metrics.jsonl") if "loss" in r] for r in (big, small))
    for x, y in zip(a, b, strict=True):
        assert abs(x["loss"] - y["loss"]) <= 1e-5 * max(1.0, abs(x["loss"])), (a, b)
    last = sorted((big / "checkpoints").glob("step-*"), key=lambda p: int(p.name[5:]))[-1].name
    wa, wb = (load_file(r / "checkpoints" / last / "adapter_model.safetensors") for r in (big, small))
    assert wa.keys() == wb.keys()
    for key in wa:
        torch.testing.assert_close(wa[key], wb[key], rtol=1e-5, atol=atol)
    return a


@pytest.mark.slow
@pytest.mark.parametrize("variant", list(VARIANTS))
def test_stopped_and_resumed_run_is_bitwise_identical(tiny_llama: Path, small_data, tmp_path: Path, variant: str) -> None:
    straight = train(_recipe(tiny_llama, small_data, tmp_path / "straight", variant))
    assert straight.steps == 40

    watcher = _sigterm_at(tmp_path / "stopped", 17)
    first = train(_recipe(tiny_llama, small_data, tmp_path / "stopped", variant))
    watcher.join(timeout=5)
    assert first.stopped == "SIGTERM"
    assert 17 <= first.steps < 40
    assert (tmp_path / "stopped/STOPPED").exists()
    second = train(_recipe(tiny_llama, small_data, tmp_path / "stopped", variant))
    assert second.resumed_from.endswith(f"step-{first.steps}")
    assert second.steps == 40 and second.stopped is None
    assert not (tmp_path / "stopped/STOPPED").exists()

    assert _losses(tmp_path / "stopped") == _losses(tmp_path / "straight")  # exact, not approximate
    name = "model.safetensors" if variant == "full" else "adapter_model.safetensors"
    a = load_file(tmp_path / "straight/checkpoints/step-40" / name)
    b = load_file(tmp_path / "stopped/checkpoints/step-40" / name)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_rerunning_a_finished_run_does_nothing(tiny_llama: Path, small_data, tmp_path: Path) -> None:
    train(_recipe(tiny_llama, small_data, tmp_path, "full", max_steps=3))
    before = (tmp_path / "metrics.jsonl").read_text()
    again = train(_recipe(tiny_llama, small_data, tmp_path, "full", max_steps=3))
    assert again.steps == 3 and again.resumed_from.endswith("step-3")
    assert (tmp_path / "metrics.jsonl").read_text() == before


def test_corrupt_newest_checkpoint_falls_back_with_warning(tiny_llama: Path, small_data, tmp_path: Path, caplog) -> None:
    train(_recipe(tiny_llama, small_data, tmp_path / "run", "full", max_steps=8, save_steps=3))
    optimizer_file = tmp_path / "run/checkpoints/step-8/optimizer.pt"
    data = bytearray(optimizer_file.read_bytes())
    data[len(data) // 2] ^= 0xFF
    optimizer_file.write_bytes(bytes(data))
    with caplog.at_level("WARNING"):
        resumed = train(_recipe(tiny_llama, small_data, tmp_path / "run", "full", max_steps=8, save_steps=3))
    warnings = [r.getMessage() for r in caplog.records if "broken checkpoint" in r.getMessage()]
    assert len(warnings) == 1 and "step-8" in warnings[0] and "optimizer.pt" in warnings[0]
    assert "\n" not in warnings[0]
    assert resumed.resumed_from.endswith("step-6") and resumed.steps == 8
    straight = train(_recipe(tiny_llama, small_data, tmp_path / "straight", "full", max_steps=8, save_steps=3))
    assert straight.steps == 8
    assert _losses(tmp_path / "run") == _losses(tmp_path / "straight")


def test_keep_last_and_explicit_resume_path(tiny_llama: Path, small_data, tmp_path: Path) -> None:
    recipe = _recipe(tiny_llama, small_data, tmp_path / "run", "full", max_steps=8, save_steps=2)
    recipe = recipe.model_copy(update={"output": recipe.output.model_copy(update={"keep_last": 2})})
    train(recipe)
    names = sorted(p.name for p in (tmp_path / "run/checkpoints").iterdir())
    assert names == ["latest", "step-6", "step-8"]
    for name in ("step-6", "step-8"):
        verify(tmp_path / "run/checkpoints" / name)
    other = _recipe(tiny_llama, small_data, tmp_path / "other", "full", max_steps=10, resume=str(tmp_path / "run/checkpoints/step-6"))
    summary = train(other)
    assert summary.resumed_from.endswith("step-6") and summary.steps == 10


def test_resume_path_that_is_not_a_checkpoint(tiny_llama: Path, small_data, tmp_path: Path) -> None:
    with pytest.raises(Exception, match="train.resume: .* is not a checkpoint directory"):
        train(_recipe(tiny_llama, small_data, tmp_path, "full", resume=str(tmp_path / "nope")))


RUNNER = """
import os, sys, time
import ftl.checkpoints.checkpoint as checkpoint
_sha256 = checkpoint._sha256
def slow_sha256(path):  # makes each save last long enough to be killed in the middle
    time.sleep(0.01)
    return _sha256(path)
checkpoint._sha256 = slow_sha256
from ftl.train import main
# One training process per line read, forked from this one, which has imported the stack already
# (~7 s a kill otherwise): its pid, then its exit status once it has been killed (or finished).
for _ in sys.stdin:
    pid = os.fork()
    if pid == 0:
        os.dup2(os.open(os.devnull, os.O_WRONLY), 1)  # this stdout is the test's channel
        try:
            main(sys.argv[1:])
        finally:
            os._exit(0)
    print(pid, flush=True)
    print(os.waitstatus_to_exitcode(os.waitpid(pid, 0)[1]), flush=True)
"""


def _save_in_progress(run_dir: Path, since: float) -> bool:
    tmp_dirs = list((run_dir / "checkpoints").glob("*.tmp")) if (run_dir / "checkpoints").exists() else []
    for path in tmp_dirs:
        try:
            if path.stat().st_mtime > since:
                return True
        except FileNotFoundError:  # renamed to step-N just now: the save completed
            pass
    return False


KILLS = 12  # 12 random points of 12 saves


@pytest.mark.slow
@pytest.mark.multiprocess
def test_sigkill_during_saves_never_leaves_a_partial_checkpoint(tiny_llama: Path, small_data, tmp_path: Path) -> None:
    runner = tmp_path / "runner.py"
    runner.write_text(RUNNER)
    run_dir = tmp_path / "run"
    raw = make_recipe(
        tiny_llama, small_data[0], run_dir, method={"type": "full"},
        train={"max_steps": 80, "micro_batch_size": 8, "learning_rate": 1e-3, "logging_steps": 1, "save_steps": 1},
    )
    recipe_file = write_yaml(tmp_path / "r.yaml", raw)
    env = dict(os.environ)
    rng = random.Random(0)
    kills, steps_done = 0, []
    zygote = subprocess.Popen([sys.executable, str(runner), str(recipe_file)], env=env, stdin=subprocess.PIPE,
                              stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)

    def running(pid: int) -> bool:
        try:
            os.kill(pid, 0)  # the zygote reaps its child at once: a pid that is gone has exited
            return True
        except ProcessLookupError:
            return False

    while kills < KILLS:
        started = time.time()
        zygote.stdin.write("run\n")
        zygote.stdin.flush()
        pid = int(zygote.stdout.readline())
        deadline = started + 120
        while not _save_in_progress(run_dir, since=started):  # a save by this process has begun
            if not running(pid) or time.time() > deadline:
                break
            time.sleep(0.005)
        time.sleep(rng.uniform(0, 0.5))  # lands in one of the next few saves, at a random point (the kills stay well short of step 80)
        if not running(pid):
            break  # finished before we could kill it
        os.kill(pid, signal.SIGKILL)
        assert int(zygote.stdout.readline()) == -signal.SIGKILL
        kills += 1
        steps_done.append(len(_losses(run_dir)))
        latest = find_resumable(run_dir)
        if latest is not None:
            verify(latest)  # what a resume would load is complete
    zygote.stdin.close()
    zygote.wait(timeout=60)
    assert kills == KILLS, f"the run finished after {kills} kills, too early for the test to mean anything"
    assert steps_done[-1] > 0 and steps_done[-1] < 80
    final = subprocess.run([sys.executable, "-m", "ftl.train", str(recipe_file)], env=env, capture_output=True, text=True)
    assert final.returncode == 0, final.stderr[-2000:]
    straight = _recipe(tiny_llama, small_data, tmp_path / "straight", "full", max_steps=80, save_steps=1)
    train(straight)
    assert _losses(run_dir) == _losses(tmp_path / "straight")


@pytest.mark.slow
def test_sigterm_exit_code_and_marker(tiny_llama: Path, small_data, tmp_path: Path) -> None:
    raw = make_recipe(
        tiny_llama, small_data[0], tmp_path / "run", method={"type": "full"},
        train={"max_steps": 100000, "micro_batch_size": 8, "logging_steps": 1},
    )
    recipe_file = write_yaml(tmp_path / "r.yaml", raw)
    proc = subprocess.Popen([sys.executable, "-m", "ftl", "train", str(recipe_file)], cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    metrics = tmp_path / "run/metrics.jsonl"
    deadline = time.time() + 120
    while not (metrics.exists() and metrics.read_text().count("\n") >= 3) and time.time() < deadline:
        time.sleep(0.05)
    proc.send_signal(signal.SIGUSR1)
    _, stderr = proc.communicate(timeout=120)
    assert proc.returncode == EXIT_STOPPED, stderr[-2000:]
    marker = __import__("json").loads((tmp_path / "run/STOPPED").read_text())
    assert marker["reason"] == "SIGUSR1"
    verify(Path(marker["checkpoint"]))
