"""Named eval sets (``data.eval: {name: source(s)}``): each evaluated and logged on its own, a
retain set's loss relative to the base model's (forgetting), and the recipe forms and errors."""

from __future__ import annotations

from pathlib import Path

import pytest

from ftl.checkpoints.rundir import read_metrics
from ftl.recipe.load import load_recipe, validate_recipe
from ftl.recipe.schema import RecipeError
from ftl.train import train
from test_early_stopping import _rows
from conftest import hf_eval_loss, make_recipe, write_jsonl, write_yaml


@pytest.fixture(scope="module")
def sets(tmp_path_factory, demo_data) -> dict[str, Path]:
    """A narrow task (8 rows, asked again as its eval set) and a retain set of other text."""
    root = tmp_path_factory.mktemp("sets")
    return {"train": write_jsonl(root / "task.jsonl", _rows(8, 0)), "task": write_jsonl(root / "task-eval.jsonl", _rows(8, 0)),
            "retain": demo_data[1]}


def _run(model: Path, sets: dict[str, Path], run_dir: Path, learning_rate: float, **train_cfg) -> Path:
    raw = make_recipe(model, sets["train"], run_dir, method={"type": "full"},
                      train={"max_steps": 20, "micro_batch_size": 4, "learning_rate": learning_rate, "eval_steps": 10,
                             "seed": 0, "lr_scheduler": "constant", **train_cfg})
    raw["data"]["eval"] = {"task": {"path": str(sets["task"])}, "retain": [{"path": str(sets["retain"])}]}
    train(validate_recipe(raw))
    return run_dir


def _evals(run_dir: Path) -> list[dict]:
    return [r for r in read_metrics(run_dir / "metrics.jsonl") if "eval_loss" in r]


def test_each_set_is_logged_on_its_own_and_equals_transformers_loss(tiny_llama, sets, tmp_path):
    run_dir = _run(tiny_llama, sets, tmp_path / "run", 1e-3)
    evals = _evals(run_dir)
    assert [r["step"] for r in evals] == [0, 10, 20]
    assert all(r["eval_loss"] == r["eval_task_loss"] for r in evals)  # the first set is the primary one
    assert "eval_retain_vs_base" not in evals[0]
    for r in evals[1:]:
        assert r["eval_retain_vs_base"] == pytest.approx(r["eval_retain_loss"] / evals[0]["eval_retain_loss"], rel=1e-12)
        assert r["eval_task_vs_base"] == pytest.approx(r["eval_task_loss"] / evals[0]["eval_task_loss"], rel=1e-12)
    recipe = load_recipe(run_dir / "run.yaml")
    for name, sources in recipe.data.eval_sets().items():
        assert hf_eval_loss(run_dir / "checkpoints" / "step-20", recipe, sources) == pytest.approx(evals[-1][f"eval_{name}_loss"], rel=1e-5)
    assert {p.name for p in (run_dir / "data").glob("*/eval*")} == {"eval-task", "eval-retain"}


def test_the_retain_set_shows_forgetting_at_a_learning_rate_too_high(tiny_llama, sets, tmp_path):
    """Both runs learn the narrow task; at 3e-2 the retain set's loss climbs far above the base
    model's, at 1e-4 it does not."""
    low, high = (_evals(_run(tiny_llama, sets, tmp_path / name, lr))[-1] for name, lr in (("low", 1e-4), ("high", 3e-2)))
    assert low["eval_task_vs_base"] < 1 and high["eval_task_vs_base"] < low["eval_task_vs_base"]
    assert low["eval_retain_vs_base"] < 1.0 < 1.2 < high["eval_retain_vs_base"], (low, high)


def test_a_resumed_run_keeps_the_base_losses(tiny_llama, sets, tmp_path):
    """The base model's losses are part of the checkpoint: a stopped and resumed run logs the same
    ratios as one never stopped."""
    from test_checkpoint import assert_resume_is_bitwise

    assert_resume_is_bitwise(lambda run_dir: _run(tiny_llama, sets, run_dir, 1e-3, save_steps=5, eval_steps=5), tmp_path, stop_at=6)
    assert _evals(tmp_path / "straight") == _evals(tmp_path / "stopped")
    assert "eval_retain_vs_base" in _evals(tmp_path / "stopped")[-1]


def test_early_stopping_can_watch_a_named_set(tiny_llama, sets, tmp_path):
    raw = make_recipe(tiny_llama, sets["train"], tmp_path / "run", train={"eval_steps": 2, "early_stopping": {"metric": "eval_retain_vs_base"}})
    raw["data"]["eval"] = {"task": {"path": str(sets["task"])}, "retain": {"path": str(sets["retain"])}}
    assert validate_recipe(raw).train.early_stopping.metric == "eval_retain_vs_base"
    raw["train"]["early_stopping"]["metric"] = "eval_other_loss"
    with pytest.raises(RecipeError, match="'eval_other_loss' is not logged by evaluation; use one of: eval_loss, eval_task_loss, "
                                          "eval_task_vs_base, eval_retain_loss, eval_retain_vs_base"):
        validate_recipe(raw)


def test_the_forms_of_data_eval(tiny_llama, sets, tmp_path):
    base = make_recipe(tiny_llama, sets["train"], tmp_path / "run")
    one = validate_recipe({**base, "data": {**base["data"], "eval": {"path": str(sets["task"])}}}).data
    listed = validate_recipe({**base, "data": {**base["data"], "eval": [{"path": str(sets["task"])}, {"path": str(sets["retain"])}]}}).data
    named = validate_recipe({**base, "data": {**base["data"], "eval": {"task": {"path": str(sets["task"])},
                                                                      "retain": [{"path": str(sets["retain"])}]}}}).data
    assert list(one.eval_sets()) == ["eval"] and not one.named_eval and len(listed.eval_sets()["eval"]) == 2
    assert named.named_eval and list(named.eval_sets()) == ["task", "retain"] and len(named.eval_sources()) == 2
    again = load_recipe(write_yaml(tmp_path / "again.yaml", validate_recipe(
        {**base, "data": {**base["data"], "eval": {"task": {"path": str(sets["task"])}}}}).model_dump(mode="json")))
    assert again.data.eval_sets()["task"][0].path == str(sets["task"])  # the resolved recipe reads back as it was


@pytest.mark.parametrize("text, line, message", [
    ("    Task: {path: TASK}\n", 4, "eval set name 'Task': use lowercase letters, digits and _ (e.g. task, retain)"),
    ("    task: {path: TASK, formt: alpaca}\n", 5, "unknown key 'formt' at data.eval.task.0.formt; did you mean 'format'?"),
    ("    task: {path: TASK}\n    retain: {path: TASK, format: preference}\n", 6,
     "data.eval.retain.0.format: preference rows need method.objective"),
])
def test_bad_named_sets_are_one_line_at_their_line(tiny_llama, sets, tmp_path, text, line, message):
    recipe = (f"model: {{path: {tiny_llama}, dtype: float32}}\ndata:\n  train: {{path: {sets['train']}}}\n  eval:\n"
              + text.replace("TASK", str(sets["task"])) + f"output: {{dir: {tmp_path / 'run'}}}\n")
    path = tmp_path / "r.yaml"
    path.write_text(recipe)
    with pytest.raises(RecipeError) as err:
        load_recipe(path)
    assert len(str(err.value).splitlines()) == 1 and message in str(err.value), str(err.value)
    assert str(err.value).startswith(f"{path}:{line}:") or (line == 4 and str(err.value).startswith(f"{path}:5:")), str(err.value)
