"""ftl lr-find: the range test on the recipe's model and batches, in a directory of its own."""

from __future__ import annotations

import hashlib
import json
import math
from pathlib import Path

import numpy as np
import pytest

from ftl.training.lr_find import suggest
from conftest import cli_exit_code, make_recipe, write_yaml


def _tree(root: Path) -> dict[str, str]:
    return {str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(root.rglob("*")) if p.is_file()}


def test_the_sweep_suggests_the_steepest_fall_and_leaves_the_run_directory_alone(tiny_llama, demo_data, tmp_path, capsys):
    run_dir = tmp_path / "run"
    (run_dir / "checkpoints" / "step-3").mkdir(parents=True)  # an earlier run's, as far as lr-find knows
    (run_dir / "checkpoints" / "step-3" / "model.safetensors").write_bytes(b"weights")
    (run_dir / "metrics.jsonl").write_text('{"step": 3, "loss": 1.0}\n')
    before = _tree(run_dir)
    recipe = write_yaml(tmp_path / "r.yaml", make_recipe(tiny_llama, demo_data[0], run_dir, method={"type": "full"},
                                                         distributed={"num_processes": 2, "strategy": "zero2"}))
    assert cli_exit_code(["lr-find", str(recipe), "--start", "1e-5", "--end", "10", "--steps", "40"]) == 0
    out = capsys.readouterr().out
    assert _tree(run_dir) == before
    found = tmp_path / "run-lr-find"
    result = json.loads((found / "lr_find.json").read_text())
    lrs, losses, trend = result["lrs"], result["losses"], result["smoothed"]
    ratios = [b / a for a, b in zip(lrs, lrs[1:])]
    assert lrs[0] == pytest.approx(1e-5) and all(r == pytest.approx((1e6) ** (1 / 39)) for r in ratios)
    # The loss falls at small rates and blows up at large ones: the sweep stops before its 40 steps.
    assert min(trend) < trend[0] - 0.3 and result["stopped"] and len(lrs) < 40, result
    # The suggestion, recomputed with numpy: steepest descent of the smoothed loss against log(rate).
    begin = max(1, len(lrs) // 10)
    slopes = np.gradient(np.array(trend), np.log(np.array(lrs)))[begin:len(lrs) - 1]
    assert result["suggestion"] == pytest.approx(lrs[begin + int(np.argmin(slopes))])
    assert lrs[0] < result["suggestion"] < lrs[trend.index(min(trend))] * 10
    assert f"suggested train.learning_rate: {result['suggestion']:.3g}" in " ".join(out.split())
    assert "lr-find runs in this one process (the recipe trains on 2)" in out
    assert (found / "lr_find.png").stat().st_size > 1000 and not list(found.glob("checkpoints/step-*"))
    # A second sweep replaces the first in its own directory.
    assert cli_exit_code(["lr-find", str(recipe), "--start", "1e-4", "--end", "1", "--steps", "6"]) == 0
    assert json.loads((found / "lr_find.json").read_text())["lrs"][0] == pytest.approx(1e-4)


@pytest.mark.parametrize("argv, message", [
    (["--start", "1", "--end", "0.1"], "--start 1 --end 0.1: the sweep needs 0 < start < end"),
    (["--steps", "3"], "--steps 3: a sweep of fewer than 5 steps says nothing"),
    (["--out", "{mine}"], "exists and is not an earlier lr-find's directory; choose a new one"),
])
def test_bad_arguments_are_one_line_and_write_nothing(tiny_llama, demo_data, tmp_path, capsys, argv, message):
    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "notes.txt").write_text("mine")
    recipe = write_yaml(tmp_path / "r.yaml", make_recipe(tiny_llama, demo_data[0], tmp_path / "run"))
    assert cli_exit_code(["lr-find", str(recipe), *[a.format(mine=mine) for a in argv]]) == 2
    err = " ".join(capsys.readouterr().err.split())
    assert message in err and "Traceback" not in err
    assert not (tmp_path / "run-lr-find").exists() and not (tmp_path / "run").exists() and _tree(mine) == {"notes.txt": _tree(mine)["notes.txt"]}


def test_suggest_is_the_steepest_descent_after_the_first_tenth():
    lrs = [10 ** (k / 4 - 6) for k in range(21)]
    losses = [5 - 3 / (1 + math.exp(-(k - 12))) for k in range(21)]  # steepest at k = 12
    assert suggest(lrs, losses) == lrs[12]
    assert suggest(lrs[:3], losses[:3]) is None
