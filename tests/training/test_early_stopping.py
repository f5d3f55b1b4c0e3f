"""train.early_stopping: the judge, its rules, and a tiny run that overfits, stops early, keeps its
best checkpoint through keep_last, resumes exactly and exports that checkpoint with ``--best``."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from ftl.checkpoints.rundir import read_metrics
from ftl.recipe.load import validate_recipe
from ftl.recipe.schema import EarlyStoppingSection, RecipeError
from ftl.train import train
from ftl.training.early_stopping import judge
from ftl.training.state import TrainState
from conftest import cli_exit_code, hf_eval_loss, make_recipe, write_jsonl


@pytest.mark.parametrize("mode, values, min_delta, expected", [
    # (improved, stop) after each evaluation; patience 2
    ("min", [3.0, 2.0, 2.5, 1.9, 2.0, 2.1], 0.0, [(1, 0), (1, 0), (0, 0), (1, 0), (0, 0), (0, 1)]),
    ("min", [3.0, 2.95, 2.9], 0.1, [(1, 0), (0, 0), (0, 1)]),  # better, but not by min_delta
    ("max", [0.5, 0.7, 0.7, 0.6], 0.0, [(1, 0), (1, 0), (0, 0), (0, 1)]),  # a tie is no improvement
])
def test_the_judge_counts_evaluations_since_the_best(mode, values, min_delta, expected):
    section, state = EarlyStoppingSection(mode=mode, patience=2, min_delta=min_delta), TrainState()
    verdicts = []
    for step, value in enumerate(values, start=1):
        state.step = step
        verdict = judge(section, state, {"eval_loss": value})
        verdicts.append((int(verdict.improved), int(verdict.stop)))
    assert verdicts == expected
    assert state.early_stopped == bool(expected[-1][1])
    assert state.best_step == [s for s, (improved, _) in enumerate(expected, start=1) if improved][-1]
    assert state.best_metric == values[state.best_step - 1]


def _rows(n: int, offset: int) -> list[dict]:
    words = "red green blue amber violet cyan olive coral ivory slate".split()
    return [{"instruction": f"Name colour number {i}.", "output": f"{words[(i * 7 + offset) % 10]} {words[(i * 3) % 10]}"}
            for i in range(n)]


def _recipe(model: Path, data: tuple[Path, Path], run_dir: Path, **train_cfg) -> dict:
    """Full fine-tuning of 8 rows, many epochs, a high learning rate, and held-out rows that ask the
    same questions with other answers: the eval loss falls while the format is learned, then climbs
    as the train answers are memorised."""
    cfg = {"max_steps": 60, "micro_batch_size": 4, "learning_rate": 1e-2, "eval_steps": 2, "save_steps": 100, "seed": 0,
           "lr_scheduler": "constant", "early_stopping": {"patience": 3}, **train_cfg}
    return make_recipe(model, data[0], run_dir, eval_path=data[1], method={"type": "full"}, train=cfg, output={"keep_last": 1})


@pytest.fixture(scope="module")
def overfit_data(tmp_path_factory) -> tuple[Path, Path]:
    root = tmp_path_factory.mktemp("overfit")
    return write_jsonl(root / "train.jsonl", _rows(8, 0)), write_jsonl(root / "eval.jsonl", _rows(8, 5))


@pytest.fixture(scope="module")
def stopped_run(tiny_llama, overfit_data, tmp_path_factory) -> tuple[Path, object]:
    run_dir = tmp_path_factory.mktemp("early") / "run"
    return run_dir, train(validate_recipe(_recipe(tiny_llama, overfit_data, run_dir)))


def _evals(run_dir: Path) -> dict[int, float]:
    return {r["step"]: r["eval_loss"] for r in read_metrics(run_dir / "metrics.jsonl") if "eval_loss" in r and r["step"] > 0}


def test_an_overfitting_run_stops_early_at_patience_and_keeps_its_best_checkpoint(stopped_run):
    run_dir, summary = stopped_run
    evals = _evals(run_dir)
    best_step = min(evals, key=lambda s: (evals[s], s))
    assert summary.early_stopped and summary.steps < 60, evals
    assert summary.steps == max(evals) == best_step + 3 * 2  # three evaluations (2 steps apart) without a new best
    assert evals[best_step] < min(v for s, v in evals.items() if s != best_step) and evals[best_step] < evals[max(evals)]
    assert (run_dir / "checkpoints" / "best").read_text().strip() == f"step-{best_step}"
    assert summary.best_checkpoint == str(run_dir / "checkpoints" / f"step-{best_step}") and summary.best_metric == evals[best_step]
    # keep_last: 1 keeps the newest (the final checkpoint of the stop) and the best besides it
    assert sorted(p.name for p in (run_dir / "checkpoints").glob("step-*")) == sorted({f"step-{best_step}", f"step-{summary.steps}"})
    state = json.loads((run_dir / "checkpoints" / f"step-{summary.steps}" / "trainer_state.json").read_text())
    assert state["early_stopped"] and state["best_step"] == best_step


def test_a_run_that_stopped_early_is_complete_when_run_again(stopped_run, tiny_llama, overfit_data, capsys):
    run_dir, summary = stopped_run
    records = (run_dir / "metrics.jsonl").read_text()
    again = train(validate_recipe(_recipe(tiny_llama, overfit_data, run_dir)))
    assert again.steps == summary.steps and again.early_stopped and again.best_checkpoint == summary.best_checkpoint
    assert (run_dir / "metrics.jsonl").read_text() == records
    assert "already complete" in capsys.readouterr().out


def test_export_best_exports_the_best_step_whose_eval_loss_is_the_logged_one(stopped_run, overfit_data, tmp_path):
    """``ftl export RUN --best`` exports checkpoints/best; the exported model's eval loss, computed by
    transformers' own loss row by row, is the one the run logged at that step."""
    from ftl.recipe.load import load_recipe

    run_dir, summary = stopped_run
    out = tmp_path / "export"
    assert cli_exit_code(["export", str(run_dir), "--best", "--out", str(out), "--dtype", "float32"]) == 0
    assert json.loads((out / "verify.json").read_text())["passed"]
    recipe = load_recipe(run_dir / "run.yaml")
    loss = hf_eval_loss(out, recipe, recipe.data.eval)
    assert loss == pytest.approx(summary.best_metric, rel=1e-5)
    assert loss != pytest.approx(_evals(run_dir)[summary.steps], rel=1e-3)  # not the last step's model


@pytest.mark.slow
def test_with_the_defaults_a_lora_run_keeps_its_best_and_exports_it_verified(tiny_llama, overfit_data, tmp_path):
    """The defaults a user keeps (bf16 weights, mixed_precision and export dtype as the schema has
    them, LoRA's defaults): the run records its best evaluation, and `export --best` writes that
    checkpoint (a bf16 export) and passes its own verification."""
    run_dir = tmp_path / "run"
    raw = _recipe(tiny_llama, overfit_data, run_dir, learning_rate=3e-3, max_steps=40)
    raw["model"].pop("dtype")
    raw["method"] = {"type": "lora"}
    recipe = validate_recipe(raw)
    assert recipe.model.dtype == "bfloat16"
    summary = train(recipe)
    evals = _evals(run_dir)
    best_step = min(evals, key=lambda s: (evals[s], s))
    assert summary.best_checkpoint == str(run_dir / "checkpoints" / f"step-{best_step}") and summary.best_metric == evals[best_step]
    out = tmp_path / "export"
    assert cli_exit_code(["export", str(run_dir), "--best", "--out", str(out)]) == 0
    report = json.loads((out / "verify.json").read_text())
    assert report["passed"] and report["dtype"] == "bfloat16" and report["checkpoint"] == f"checkpoints/step-{best_step}", report


def test_export_best_without_a_best_checkpoint_is_one_line(tiny_llama, demo_data, tmp_path, capsys):
    run_dir = tmp_path / "run"
    train(validate_recipe(make_recipe(tiny_llama, demo_data[0], run_dir, train={"max_steps": 1})))
    for source, message in ((run_dir, "records no best checkpoint (checkpoints/best); train.early_stopping records one"),
                            (run_dir / "checkpoints" / "step-1", "is not a run directory")):
        assert cli_exit_code(["export", str(source), "--best", "--out", str(tmp_path / "out")]) == 2
        err = " ".join(capsys.readouterr().err.split())
        assert message in err and "Traceback" not in err
    assert not (tmp_path / "out").exists()


def test_a_stopped_and_resumed_run_stops_early_at_the_same_step_with_the_same_best(stopped_run, tiny_llama, overfit_data, tmp_path):
    """SIGTERM one evaluation after the best, and a resume: the judge's memory (best value and step,
    evaluations since) comes back with the checkpoint, so the run stops at the same step, with the
    same losses, best step and final weights (a judge that forgot would call the next evaluation a
    new best and stop later)."""
    from test_checkpoint import assert_resume_is_bitwise

    def run(run_dir: Path) -> Path:
        train(validate_recipe(_recipe(tiny_llama, overfit_data, run_dir, save_steps=1)))
        return run_dir

    best_step = int(Path(stopped_run[1].best_checkpoint).name.removeprefix("step-"))
    assert_resume_is_bitwise(run, tmp_path, stop_at=best_step + 2)
    a, b = ((tmp_path / name / "checkpoints" / "best").read_text() for name in ("straight", "stopped"))
    assert a == b == f"step-{best_step}" and _evals(tmp_path / "straight") == _evals(tmp_path / "stopped")


@pytest.mark.parametrize("change, message", [
    ({"data": {"eval": None}}, "train.early_stopping: needs an eval set to judge: set data.eval or data.eval_fraction"),
    ({"train": {"eval_steps": None}}, "train.early_stopping: needs train.eval_steps"),
    ({"train": {"early_stopping": {"metric": "eval_accuracy"}}},
     "train.early_stopping.metric: 'eval_accuracy' is not logged by evaluation; use one of: eval_loss"),
    ({"train": {"early_stopping": {"patience": 0}}}, "train.early_stopping.patience"),
    ({"train": {"early_stopping": {"mode": "lowest"}}}, "train.early_stopping.mode"),
])
def test_recipe_rules(tiny_llama, overfit_data, tmp_path, change, message):
    raw = _recipe(tiny_llama, overfit_data, tmp_path / "run")
    for section, values in change.items():
        for key, value in values.items():
            if isinstance(value, dict):
                raw[section][key].update(value)
            else:
                raw[section][key] = value
    with pytest.raises(RecipeError) as err:
        validate_recipe(raw)
    assert message in str(err.value) and len(str(err.value).splitlines()) == 1
