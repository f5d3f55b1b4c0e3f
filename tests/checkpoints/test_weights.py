"""The base model's identity: recorded in every checkpoint, so an adapter is never merged into,
resumed on, or given reference log-probabilities of, another model put at the same path."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from ftl.recipe.load import validate_recipe
from ftl.tiny import write_tiny_model
from ftl.train import train
from ftl.checkpoints.weights import weights_identity
from conftest import cli_exit_code, make_recipe, write_jsonl

LORA = {"type": "lora", "lora": {"r": 8, "alpha": 16, "dropout": 0.0}}


@pytest.fixture(scope="module")
def other_llama(tmp_path_factory) -> Path:
    """The same architecture, shapes and tokenizer as the tiny Llama, other weights."""
    return write_tiny_model(tmp_path_factory.mktemp("other") / "llama", "llama", hidden_size=64, seed=1)


def _replace(path: Path, source: Path) -> None:
    shutil.rmtree(path)
    shutil.copytree(source, path)


def test_identity_follows_the_weights_not_the_path(tiny_llama, other_llama, tmp_path):
    copy = tmp_path / "copy"
    shutil.copytree(tiny_llama, copy)  # (new mtimes)
    assert weights_identity(copy) == weights_identity(tiny_llama) != weights_identity(other_llama)
    assert json.loads((tiny_llama / "config.json").read_text()) == json.loads((other_llama / "config.json").read_text())
    assert weights_identity("some-org/some-model") is None  # a hub id: immutable snapshots


def test_a_replaced_base_is_refused_by_export_and_resume(tiny_llama, other_llama, demo_data, tmp_path, capsys):
    base = tmp_path / "base"
    shutil.copytree(tiny_llama, base)
    recipe = make_recipe(base, demo_data[0], tmp_path / "run", method=LORA, train={"max_steps": 2})
    train(validate_recipe(recipe))
    state = json.loads((tmp_path / "run/checkpoints/step-2/trainer_state.json").read_text())
    assert state["base_identity"] == weights_identity(tiny_llama)

    _replace(base, other_llama)
    capsys.readouterr()
    assert cli_exit_code(["export", str(tmp_path / "run"), "--out", str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err
    assert "model.path: the model at" in err and "is not the one" in err and len(err.strip().splitlines()) == 1, err
    assert not (tmp_path / "out").exists() and not list(tmp_path.glob(".out*"))
    recipe["train"]["max_steps"] = 4
    with pytest.raises(Exception, match="is not the one .* was trained on"):
        train(validate_recipe(recipe))
    # the base it was trained on, back at its path (a copy: other mtimes), exports again
    _replace(base, tiny_llama)
    assert cli_exit_code(["export", str(tmp_path / "run"), "--out", str(tmp_path / "out"), "--dtype", "float32"]) == 0


def test_a_precomputed_reference_is_not_reused_for_a_replaced_model(tiny_llama, other_llama, tmp_path):
    """DPO's first step with a LoRA policy equal to its reference has loss ln 2 exactly; with the
    stored log-probabilities of the model that was at the path before, it would not."""
    from test_preference import _pairs

    base = tmp_path / "base"
    shutil.copytree(tiny_llama, base)
    pairs = write_jsonl(tmp_path / "pairs.jsonl", _pairs(16))

    def run() -> float:
        recipe = make_recipe(base, pairs, tmp_path / "run", data={"train": {"path": str(pairs), "format": "preference"}},
                             method={**LORA, "objective": "dpo"}, preference={"reference": "precomputed"},
                             train={"max_steps": 1, "micro_batch_size": 8, "resume": "never"}, output={"overwrite": True})
        train(validate_recipe(recipe))
        return json.loads((tmp_path / "run/metrics.jsonl").read_text().splitlines()[0])["loss"]

    assert run() == pytest.approx(0.693147, abs=1e-5)
    _replace(base, other_llama)
    assert run() == pytest.approx(0.693147, abs=1e-5)
    assert len(list((tmp_path / "run" / "data").rglob("reference-logps-*.pt"))) == 2
