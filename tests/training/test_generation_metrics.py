"""eval.generate: generation metrics logged at every evaluation equal what ``ftl eval --scorers``
computes on the same checkpoint; the rules that keep it from doing nothing."""

from __future__ import annotations

from pathlib import Path

import pytest

from ftl.checkpoints.rundir import read_metrics
from ftl.recipe.load import validate_recipe
from ftl.recipe.schema import RecipeError
from ftl.train import train
from conftest import cli_exit_code, make_recipe

SCORERS = ["exact_match", "contains", "regex:[a-z]", "gen_scores:length"]


@pytest.fixture
def user_scorer(tmp_path, monkeypatch):
    (tmp_path / "gen_scores.py").write_text("def length(prompts, completions, answers):\n"
                                            "    return [len(c) / 100 for c in completions]\n")
    monkeypatch.syspath_prepend(str(tmp_path))


def _recipe(tiny_llama, demo_data, run_dir: Path, named: bool, **changes) -> dict:
    raw = make_recipe(tiny_llama, demo_data[0], run_dir, method={"type": "full"},
                      train={"max_steps": 12, "micro_batch_size": 8, "learning_rate": 3e-3, "eval_steps": 6, "seed": 0},
                      eval={"generate": {"rows": 10, "max_new_tokens": 12, "scorers": SCORERS, **({"set": "task"} if named else {})}})
    raw["data"]["eval"] = {"task": {"path": str(demo_data[1])}} if named else {"path": str(demo_data[1])}
    for key, value in changes.items():
        section, field = key.split(".")
        raw.setdefault(section, {})[field] = value
    return raw


@pytest.mark.parametrize("named", [False, True])
def test_logged_generation_metrics_equal_ftl_eval_on_the_checkpoint(tiny_llama, demo_data, tmp_path, user_scorer, capsys, named):
    run_dir = tmp_path / "run"
    train(validate_recipe(_recipe(tiny_llama, demo_data, run_dir, named)))
    prefix = "eval_task_" if named else "eval_"
    evals = [r for r in read_metrics(run_dir / "metrics.jsonl") if "eval_loss" in r]
    assert [r["step"] for r in evals] == [0, 6, 12]
    assert all({prefix + m for m in ("exact_match", "contains", "regex", "length")} <= set(r) for r in evals)
    assert evals[-1][prefix + "length"] != evals[0][prefix + "length"]  # the model's answers changed with training
    capsys.readouterr()
    assert cli_exit_code(["eval", str(run_dir / "checkpoints" / "step-12"), "--data", str(demo_data[1]), "--limit", "10",
                          "--max-new-tokens", "12", "--scorers", ",".join(SCORERS)]) == 0
    out = capsys.readouterr().out
    for metric in ("exact_match", "contains", "regex", "length"):
        assert f"{metric}: {evals[-1][prefix + metric]:.4g} (mean of 10 rows)" in out, out


def test_a_scorer_that_fails_in_training_is_one_line_naming_it(tiny_llama, demo_data, tmp_path, user_scorer):
    raw = _recipe(tiny_llama, demo_data, tmp_path / "run", False)
    raw["eval"]["generate"]["scorers"] = ["gen_scores:absent"]
    with pytest.raises(Exception, match="scorer gen_scores:absent: cannot import it"):
        train(validate_recipe(raw))


@pytest.mark.parametrize("changes, message", [
    ({"eval": {"generate": {"set": "retain"}}}, "eval.generate.set: 'retain' is not an eval set of data.eval (sets: eval)"),
    ({"eval": {"generate": {"scorers": ["exactmatch"]}}}, "eval.generate.scorers.0: 'exactmatch': not a scorer"),
    ({"method": {"type": "full", "objective": "reward"}, "data": {"format": "preference"}}, "trains a score head"),
    ({"distributed": {"strategy": "zero3", "num_processes": 2}}, "generation needs each process's whole model; not under zero3"),
    ({"train": {"early_stopping": {"metric": "eval_contains", "mode": "max"}}}, None),  # a generation metric can be watched
])
def test_recipe_rules(tiny_llama, demo_data, tmp_path, changes, message):
    raw = _recipe(tiny_llama, demo_data, tmp_path / "run", False)
    raw["eval"]["generate"]["scorers"] = ["exact_match", "contains"]
    for section, values in changes.items():
        if section == "data":
            raw["data"]["train"]["format"] = raw["data"]["eval"]["format"] = values["format"]
            continue
        for key, value in values.items():
            target = raw.setdefault(section, {})
            target[key] = {**target.get(key, {}), **value} if isinstance(value, dict) else value
    if message is None:
        assert validate_recipe(raw).train.early_stopping.metric == "eval_contains"
        return
    with pytest.raises(RecipeError) as err:
        validate_recipe(raw)
    assert message in str(err.value), str(err.value)
