"""ftl.scorers: the built-in scorers of generated answers and the contract of a user's."""

from __future__ import annotations

import pytest

from ftl.scorers import ScorerError, check, metric_name, score


def test_built_in_scorers():
    completions = ['{"name": "Ivan", "city": "Oslo"}', '{"name": "Ivan", "city": "Rome"}', "Ivan from Oslo", "not json"]
    answers = ['{"name": "Ivan", "city": "Oslo"}'] * 3 + ["not json"]
    found = score(["exact_match", "contains", "json_valid", "json_fields", "regex:^\\{"], ["p"] * 4, completions, answers)
    assert found == {"exact_match": [1, 0, 0, 1], "contains": [1, 0, 0, 1], "json_valid": [1, 1, 0, 0],
                     "json_fields": [1, 0.5, 0, 0], "regex": [1, 1, 0, 0]}


def _lengths(prompts, completions, answers):
    return [len(c) / 10 for c in completions]


def test_a_user_scorer_gets_prompts_completions_and_answers_by_name(monkeypatch, tmp_path):
    (tmp_path / "my_scores.py").write_text(
        "def overlap(prompts, completions, answers):\n"
        "    return [len(set(c.split()) & set(a.split())) / max(len(set(a.split())), 1) for c, a in zip(completions, answers)]\n"
        "def short(prompts, completions, answers):\n    return [1.0]\n"
        "def nan(prompts, completions, answers):\n    return [float('nan')] * len(completions)\n"
        "def broken(prompts, completions, answers):\n    raise KeyError('answer')\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    assert score(["my_scores:overlap"], ["p", "q"], ["a b", "c"], ["a x", "c"]) == {"overlap": [0.5, 1.0]}
    assert metric_name("my_scores:overlap") == "overlap"
    for spec, message in (("my_scores:short", "scorer my_scores:short: returned 1 scores for 2 rows"),
                          ("my_scores:nan", "scorer my_scores:nan: row 0: nan is not a finite number"),
                          ("my_scores:broken", "scorer my_scores:broken: raised KeyError: 'answer'"),
                          ("my_scores:missing", "scorer my_scores:missing: cannot import it"),
                          ("no_such_module:f", "scorer no_such_module:f: cannot import it")):
        with pytest.raises(ScorerError, match=message.replace("(", r"\(")):
            score([spec], ["p", "q"], ["a", "b"], ["a", "b"])


def test_names_that_are_not_scorers():
    assert check("exact_match") is None and check("regex:a+") is None and check("pkg.mod:fn") is None
    assert "not a regular expression" in check("regex:(")
    assert "not a scorer; use one of exact_match, contains, json_valid, json_fields" in check("exactmatch")
