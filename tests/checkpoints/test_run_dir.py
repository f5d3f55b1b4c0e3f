"""The run directory loses nothing: a failed start changes no file of an earlier run, unusable
checkpoints are moved aside (never deleted), and a torn metrics line does not stop a resume."""

from __future__ import annotations

import hashlib
import re
from pathlib import Path

import pytest

from ftl.recipe.load import validate_recipe
from ftl.errors import UserError
from ftl.checkpoints.rundir import read_metrics
from ftl.train import TrainError, train
from conftest import copy_run, make_recipe


def _recipe(model: Path, data, run_dir: Path, **sections):
    return validate_recipe(make_recipe(model, data[0], run_dir, **sections))


def _snapshot(run_dir: Path) -> dict[str, str]:
    """Every file of the run directory and its sha256 (but the writer lock's note of who holds it)."""
    return {str(p.relative_to(run_dir)): hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(run_dir.rglob("*"))
            if p.is_file() and p.name != ".ftl-lock"}


@pytest.fixture(scope="module")
def finished(tiny_llama, demo_data, tmp_path_factory) -> Path:
    """A finished 2-step LoRA run (checkpoints at steps 1 and 2) to copy and damage."""
    run_dir = tmp_path_factory.mktemp("finished") / "run"
    train(_recipe(tiny_llama, demo_data, run_dir, train={"max_steps": 2, "save_steps": 1}))
    return run_dir


@pytest.fixture
def run(finished, tmp_path) -> Path:
    return copy_run(finished, tmp_path / "run")


@pytest.mark.parametrize("bad", [
    {"data": {"train": {"path": "/nonexistent/train.jsonl"}}},
    {"model": {"path": "/nonexistent/model"}},
    {"method": {"type": "lora", "lora": {"r": 8, "alpha": 16, "dropout": 0.0, "target_modules": ["no_such_module"]}}},
])
@pytest.mark.parametrize("mode", [{"resume": "auto"}, {"resume": "never", "overwrite": True}])
def test_a_failed_start_changes_no_file_of_the_earlier_run(tiny_llama, demo_data, run, bad, mode):
    before = _snapshot(run)
    sections = {"train": {"max_steps": 4, "resume": mode["resume"]}, "output": {"overwrite": mode.get("overwrite", False)}}
    for name, values in bad.items():
        sections.setdefault(name, {}).update(values)
    raw = make_recipe(tiny_llama, demo_data[0], run, **sections)
    with pytest.raises(UserError):
        train(validate_recipe(raw))
    after = {k: v for k, v in _snapshot(run).items() if not k.startswith("data/")}  # the data cache may grow
    assert after == {k: v for k, v in before.items() if not k.startswith("data/")}


def test_unverifiable_checkpoints_are_moved_aside_with_user_files(tiny_llama, demo_data, run, caplog):
    for step in (1, 2):
        (run / f"checkpoints/step-{step}/manifest.json").write_text("{not json")
    (run / "checkpoints/notes.txt").write_text("mine")
    old_metrics = (run / "metrics.jsonl").read_text()
    with caplog.at_level("WARNING"):
        summary = train(_recipe(tiny_llama, demo_data, run, train={"max_steps": 2}))
    assert summary.resumed_from is None and summary.steps == 2
    [aside] = list((run / "set-aside").iterdir())
    assert (aside / "checkpoints/notes.txt").read_text() == "mine"
    assert (aside / "checkpoints/step-1").is_dir() and (aside / "metrics.jsonl").read_text() == old_metrics
    [warning] = [r.getMessage() for r in caplog.records if "moved it and metrics.jsonl" in r.getMessage()]
    assert "step-1, step-2" in warning and str(aside) in warning


def test_a_broken_newer_checkpoint_is_moved_aside_not_overwritten(tiny_llama, demo_data, run):
    broken = run / "checkpoints/step-2/adapter_model.safetensors"
    broken.write_bytes(broken.read_bytes()[:-10])
    damaged = broken.read_bytes()
    summary = train(_recipe(tiny_llama, demo_data, run, train={"max_steps": 2, "save_steps": 1}))
    assert summary.resumed_from.endswith("step-1")
    [aside] = list((run / "set-aside").iterdir())
    assert (aside / "step-2/adapter_model.safetensors").read_bytes() == damaged
    assert (run / "checkpoints/step-2/manifest.json").is_file()  # saved again by the resumed run


def test_a_torn_metrics_line_does_not_stop_a_resume(tiny_llama, demo_data, run):
    with open(run / "metrics.jsonl", "a") as f:
        f.write('{"step": 3, "lo')
    summary = train(_recipe(tiny_llama, demo_data, run, train={"max_steps": 3}))
    assert summary.steps == 3 and summary.resumed_from.endswith("step-2")
    steps = [r["step"] for r in read_metrics(run / "metrics.jsonl") if "loss" in r]
    assert steps == [1, 2, 3]


@pytest.mark.parametrize("change, key", [
    ({"method": {"type": "full"}}, "method.type"),
    ({"method": {"type": "lora", "lora": {"r": 4, "alpha": 16, "dropout": 0.0}}}, "method.lora.r"),
])
def test_resuming_with_another_method_is_refused(tiny_llama, demo_data, run, change, key):
    before = _snapshot(run)
    with pytest.raises(TrainError, match=f"{key}: is .* but .*step-2 was trained with"):
        train(_recipe(tiny_llama, demo_data, run, train={"max_steps": 4}, **change))
    assert _snapshot(run) == before


@pytest.mark.parametrize("damage", [
    lambda c: (c / "manifest.json").write_text('{"files": [1, 2]}'),
    lambda c: (c / "manifest.json").write_text('{"files": {"x": {"size": 1}}}'),
    lambda c: (c / "trainer_state.json").write_text('{"epoch": 0}'),
    lambda c: (c.parent / "latest").unlink() or (c.parent / "latest").mkdir(),
    lambda c: (c.parent / "latest").write_bytes(b"\xff\xfe"),
])
def test_damaged_checkpoint_files_give_a_clear_fallback(tiny_llama, demo_data, run, damage):
    damage(run / "checkpoints/step-2")
    summary = train(_recipe(tiny_llama, demo_data, run, train={"max_steps": 2}))
    assert summary.steps == 2 and summary.resumed_from is not None


def test_a_users_own_files_in_the_run_directory_are_kept(tiny_llama, demo_data, tmp_path):
    """The common layout `ftl train runs/x/recipe.yaml` with `output.dir: runs/x`: the user's recipe
    (comments included) is never written over; their own files under ftl's other names are moved to
    set-aside/, byte for byte, not replaced or deleted."""
    from conftest import cli_exit_code, write_yaml

    run_dir = tmp_path / "x"
    run_dir.mkdir()
    recipe = make_recipe(tiny_llama, demo_data[0], run_dir, train={"max_steps": 2})
    recipe_file = write_yaml(run_dir / "recipe.yaml", recipe)
    recipe_file.write_text("# my notes on this run\n" + recipe_file.read_text())
    mine = {"loss.png": b"my plot", "data_stats.json": b'{"mine": true}', "STOPPED": b"my marker"}
    for name, content in mine.items():
        (run_dir / name).write_bytes(content)
    before = {name: (run_dir / name).read_bytes() for name in [*mine, "recipe.yaml"]}

    assert cli_exit_code(["train", str(recipe_file)]) == 0
    assert recipe_file.read_bytes() == before["recipe.yaml"]  # untouched, comments and all
    assert (run_dir / "run.yaml").is_file() and (run_dir / "checkpoints" / "step-2").is_dir()
    aside = {p.name: p.read_bytes() for p in (run_dir / "set-aside").rglob("*") if p.is_file()}
    assert aside == mine
    # a second run resumes (finished: nothing to do) and still leaves the user's recipe alone
    assert cli_exit_code(["train", str(recipe_file)]) == 0
    assert recipe_file.read_bytes() == before["recipe.yaml"]


def test_a_second_writer_is_refused_and_a_dead_ones_lock_is_not_stale(tiny_llama, demo_data, run, capsys):
    """While another process holds the run directory, `ftl train` on it exits 2 in one line and
    changes nothing; once that process is gone (here: kill -9), the next run proceeds."""
    import os
    import signal
    import subprocess
    import sys

    from conftest import cli_exit_code, write_yaml

    holder = subprocess.Popen([sys.executable, "-c", "import sys, time\nfrom pathlib import Path\nfrom ftl.checkpoints.rundir import RunDir\n"
                               "with RunDir(Path(sys.argv[1])).lock():\n    print('held', flush=True)\n    time.sleep(600)\n", str(run)],
                              stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "held"
        recipe = write_yaml(run.parent / "r.yaml", make_recipe(tiny_llama, demo_data[0], run, train={"max_steps": 4}))
        before = _snapshot(run)
        capsys.readouterr()
        assert cli_exit_code(["train", str(recipe)]) == 2
        err = capsys.readouterr().err
        assert f"is in use by another ftl run (pid {holder.pid} on" in err and len(err.strip().splitlines()) == 1, err
        assert _snapshot(run) == before
    finally:
        os.kill(holder.pid, signal.SIGKILL)
        holder.wait()
    assert cli_exit_code(["train", str(recipe)]) == 0
    assert (run / "checkpoints" / "step-4").is_dir()


def _lrs(run_dir: Path) -> dict[int, float]:
    return {r["step"]: r["lr"] for r in read_metrics(run_dir / "metrics.jsonl") if "lr" in r}


def test_resuming_with_a_changed_recipe_refuses_or_honours_it_exactly(tiny_llama, demo_data, run, tmp_path, capsys):
    """A resumed run is the same run. The finished 2-step run continued to 4 steps: a new learning rate
    is refused in one line naming the field and the checkpoint; allowed, it holds from step 3 exactly
    as in an uninterrupted run with that rate; a raised max_steps says that the schedule is recomputed;
    fields a checkpoint cannot continue under are refused even when allowed; max_steps below the
    checkpoint's step is an error."""
    from conftest import cli_exit_code, write_yaml

    def recipe_file(name: str, directory: Path = run, **train_cfg) -> Path:
        sections = {k: v for k, v in train_cfg.items() if k in ("method",)}
        cfg = {"max_steps": 4, **{k: v for k, v in train_cfg.items() if k not in sections}}
        return write_yaml(tmp_path / name, make_recipe(tiny_llama, demo_data[0], directory, train=cfg, **sections))

    before = _snapshot(run)
    for argv, message in [
        (["train", str(recipe_file("lr.yaml", learning_rate=2e-3))],
         r"train.learning_rate: is 0.002 but .*step-2 was trained with 0.001; resume with the same value, or pass "
         r"--allow-changed train.learning_rate"),
        (["train", str(recipe_file("alpha.yaml", method={"type": "lora", "lora": {"r": 8, "alpha": 32, "dropout": 0.0}}))],
         r"method.lora.alpha: is 32.0 .*--allow-changed method.lora.alpha"),
        (["train", str(recipe_file("dora.yaml", method={"type": "lora", "lora": {"r": 8, "alpha": 16, "dropout": 0.0, "use_dora": True}})),
          "--allow-changed", "method.lora.use_dora"], r"method.lora.use_dora: is True .*which a resumed run cannot change"),
        (["train", str(recipe_file("short.yaml", max_steps=1))], r"train.max_steps: 1 is below the step of .*step-2 \(2\)"),
    ]:
        capsys.readouterr()
        assert cli_exit_code(argv) == 2, argv
        err = capsys.readouterr().err.strip()
        assert len(err.splitlines()) == 1 and re.search(message, err), err
        assert _snapshot(run) == before

    capsys.readouterr()
    assert cli_exit_code(["train", str(recipe_file("lr.yaml", learning_rate=2e-3)), "--allow-changed", "train.learning_rate"]) == 0
    warnings = " ".join(capsys.readouterr().err.split())
    assert "train.learning_rate: 0.002 where step-2 trained with 0.001" in warnings
    assert "step-2 was trained toward 2 steps and this run goes to 4: the cosine learning-rate schedule is recomputed" in warnings
    assert cli_exit_code(["train", str(recipe_file("fresh.yaml", tmp_path / "fresh", learning_rate=2e-3))]) == 0
    resumed, fresh = _lrs(run), _lrs(tmp_path / "fresh")
    assert [resumed[s] for s in (3, 4)] == [fresh[s] for s in (3, 4)], (resumed, fresh)
