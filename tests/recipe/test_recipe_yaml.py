"""The guarded recipe loader: every hostile or malformed YAML gives one line naming the place."""

from __future__ import annotations

import time
from pathlib import Path

import pytest

from ftl.recipe.schema import RecipeError
from ftl.recipe.load import load_recipe

BASE = """model:
  path: some/model
data:
  train: {path: data.jsonl}
output:
  dir: runs/x
"""


def _load(tmp_path: Path, text: str | bytes, overrides: list[str] | None = None):
    path = tmp_path / "r.yaml"
    path.write_bytes(text if isinstance(text, bytes) else text.encode())
    return load_recipe(path, overrides)


@pytest.mark.parametrize("text, message", [
    (BASE.encode() + b"train:\n  seed: \xff\n", r"r.yaml:8: not UTF-8 text \(byte 0xff\)"),
    (BASE + "? [a, b]\n: 1\n", r"r.yaml:7: keys must be plain names"),
    (BASE + "train: &t\n  x: *t\n", r"r.yaml:\d+: an alias refers to a value that contains it"),
    (BASE + "train:\n  epochs: 1\ntrain:\n  epochs: 2\n", r"r.yaml:9: duplicate key 'train' \(first at line 7\)"),
    (BASE + "model:\n  path: other\n", r"duplicate key 'model'"),
    (BASE + "train: [unclosed\n", r"r.yaml:\d+: invalid YAML"),
    ("- just\n- a list\n", r"a recipe is a YAML mapping"),
])
def test_hostile_yaml_is_one_clear_line(tmp_path, text, message):
    with pytest.raises(RecipeError, match=message) as err:
        _load(tmp_path, text)
    assert len(err.value.problems) == 1 and "\n" not in err.value.problems[0]


def test_an_alias_bomb_is_refused_quickly(tmp_path):
    levels = ["a0: &a0 [x, x, x, x, x, x, x, x, x, x]"]
    levels += [f"a{i}: &a{i} [{', '.join([f'*a{i - 1}'] * 10)}]" for i in range(1, 9)]  # 10**9 values, ~300 bytes
    start = time.perf_counter()
    with pytest.raises(RecipeError, match="expands to more than"):
        _load(tmp_path, BASE + "\n".join(levels) + "\n")
    assert time.perf_counter() - start < 5


def test_anchors_and_merge_keys_still_work(tmp_path):
    text = (BASE.replace("output:", "method:\n  lora: &lora {r: 4, alpha: 8}\nquantization: {skip_modules: [lm_head]}\noutput:")
            + "export:\n  <<: {dtype: float32}\n  verify: false\n")
    recipe = _load(tmp_path, text)
    assert recipe.method.lora.r == 4 and recipe.export.dtype == "float32" and recipe.export.verify is False


@pytest.mark.parametrize("override", [".learning_rate=1", "train..seed=1", "train.=3"])
def test_an_override_with_an_empty_key_part_names_the_override(tmp_path, override):
    with pytest.raises(RecipeError, match=f"override '{override.replace('.', '[.]')}': expected key.sub=value"):
        _load(tmp_path, BASE, [override])
