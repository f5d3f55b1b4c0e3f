"""Where a one-line error is promised: failures users meet (a full disk, a wrong target, damaged or
foreign files, odd input, an interrupt) exit 2 (130 for an interrupt) with one line on stderr, no
traceback, and nothing of theirs changed."""

from __future__ import annotations

import errno
import hashlib
import json
import shutil
import socket
from pathlib import Path

import pytest
import torch

from ftl.recipe.load import validate_recipe
from ftl.train import train
from conftest import cli_exit_code, copy_run, make_recipe, write_yaml


def _tree(root: Path) -> dict[str, str]:
    return {str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(root.rglob("*"))
            if p.is_file() and p.name != ".ftl-lock"}


def _one_line(capsys, *expected: str) -> str:
    """The one error line (log lines above it are the run's own)."""
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if line.startswith("error:") or line.startswith("ftl export: interrupted")]
    assert len(lines) == 1 and "Traceback" not in err, err
    for text in expected:
        assert text in lines[0], lines[0]
    return lines[0]


@pytest.fixture(scope="module")
def finished(tiny_llama, demo_data, tmp_path_factory) -> Path:
    run = tmp_path_factory.mktemp("finished") / "run"
    train(validate_recipe(make_recipe(tiny_llama, demo_data[0], run, train={"max_steps": 1})))
    return run


@pytest.fixture
def run(finished, tmp_path) -> Path:
    return copy_run(finished, tmp_path / "run")


def test_a_full_disk_during_a_checkpoint_keeps_the_last_one(tiny_llama, demo_data, run, tmp_path, capsys, monkeypatch):
    recipe = write_yaml(tmp_path / "r.yaml", make_recipe(tiny_llama, demo_data[0], run, train={"max_steps": 2}))
    before = _tree(run / "checkpoints")
    real_save = torch.save

    def full(obj, f, *args, **kwargs):
        if str(f).endswith("optimizer.pt"):
            raise OSError(errno.ENOSPC, "No space left on device")
        return real_save(obj, f, *args, **kwargs)

    monkeypatch.setattr(torch, "save", full)
    capsys.readouterr()
    assert cli_exit_code(["train", str(recipe)]) == 2
    _one_line(capsys, "could not write checkpoint step-2: No space left on device", "step-1 is intact")
    assert _tree(run / "checkpoints") == before and not (run / "checkpoints" / "step-2.tmp").exists()


def test_export_failures_are_one_line_and_leave_nothing(run, tmp_path, capsys, monkeypatch):
    from ftl.export import merge

    (tmp_path / "a-file").write_text("mine")
    capsys.readouterr()
    assert cli_exit_code(["export", str(run), "--out", str(tmp_path / "a-file" / "out")]) == 2
    _one_line(capsys, "--out: cannot create")
    assert (tmp_path / "a-file").read_text() == "mine"

    # a temporary directory left by an export that was killed (its process is gone) is cleaned up
    dead = tmp_path / f".out.export-{socket.gethostname()}-999999999"
    dead.mkdir()
    # disk full while writing shards
    monkeypatch.setattr(merge, "save_file", lambda *a, **k: (_ for _ in ()).throw(OSError(errno.ENOSPC, "No space left on device")))
    assert cli_exit_code(["export", str(run), "--out", str(tmp_path / "out")]) == 2
    _one_line(capsys, "No space left on device", "nothing was written there")
    assert not (tmp_path / "out").exists() and not list(tmp_path.glob(".out.export-*"))
    # Ctrl-C (or SIGTERM, which the command turns into the same) in the middle
    monkeypatch.setattr(merge, "save_file", lambda *a, **k: (_ for _ in ()).throw(KeyboardInterrupt()))
    assert cli_exit_code(["export", str(run), "--out", str(tmp_path / "out")]) == 130
    _one_line(capsys, "interrupted; nothing was written")
    assert not (tmp_path / "out").exists() and not list(tmp_path.glob(".out.export-*"))


def test_an_empty_adapter_file_with_a_consistent_manifest_is_refused_by_export(run, tmp_path, capsys):
    from ftl.checkpoints.checkpoint import write_manifest

    checkpoint = run / "checkpoints" / "step-1"
    (checkpoint / "adapter_model.safetensors").write_bytes(b"")
    write_manifest(checkpoint)  # consistent: the manifest cannot tell
    capsys.readouterr()
    assert cli_exit_code(["export", str(run), "--out", str(tmp_path / "out")]) == 2
    _one_line(capsys, "adapter_model.safetensors: not a readable safetensors file")


def test_a_resume_on_another_number_of_processes_is_refused_before_any_starts(tiny_llama, demo_data, run, tmp_path, capsys):
    recipe = write_yaml(tmp_path / "r.yaml", make_recipe(tiny_llama, demo_data[0], run, train={"max_steps": 2},
                                                         distributed={"strategy": "ddp", "num_processes": 2}))
    before = _tree(run)
    capsys.readouterr()
    assert cli_exit_code(["train", str(recipe)]) == 2
    _one_line(capsys, "distributed: ", "was saved by 1 process(es) and this run has 2")
    assert _tree(run) == before


def test_overwrite_never_follows_a_linked_checkpoints_directory(tiny_llama, demo_data, run, tmp_path):
    elsewhere = tmp_path / "elsewhere"
    shutil.move(str(run / "checkpoints"), elsewhere)
    (run / "checkpoints").symlink_to(elsewhere)
    kept = _tree(elsewhere)
    recipe = write_yaml(tmp_path / "r.yaml", make_recipe(tiny_llama, demo_data[0], run, train={"max_steps": 1, "resume": "never"},
                                                         output={"overwrite": True}))
    assert cli_exit_code(["train", str(recipe)]) == 0
    assert _tree(elsewhere) == kept and (run / "checkpoints" / "step-1").is_dir() and not (run / "checkpoints").is_symlink()


def test_odd_input_is_one_line(tiny_llama, demo_data, tmp_path, capsys):
    deep = tmp_path / "deep.yaml"
    deep.write_text("a: " + "[" * 3000 + "1" + "]" * 3000 + "\n")
    recipe = write_yaml(tmp_path / "r.yaml", make_recipe(tiny_llama, demo_data[0], tmp_path / "run"))
    corpus = tmp_path / "corpus.txt"
    corpus.write_bytes(b"caf\xe9\n")
    for argv, expected in [
        (["validate", str(deep)], "nested too deeply"),
        (["validate", "-q", str(recipe), "train.seed=" + "9" * 5000], "Exceeds the limit (4300 digits)"),
        (["tiny-model", str(tmp_path / "t"), "--corpus", str(corpus)], "--corpus: "),
        (["train", str(write_yaml(tmp_path / "f.yaml", make_recipe(tiny_llama, demo_data[0], corpus)))], "output.dir: cannot use"),
    ]:
        capsys.readouterr()
        assert cli_exit_code(argv) == 2, argv
        assert len(_one_line(capsys, expected)) < 400
    assert corpus.read_bytes() == b"caf\xe9\n"


def test_a_tokenizer_without_pad_eos_or_unk_is_a_recipe_error(tiny_llama, demo_data, tmp_path, capsys):
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    words = Tokenizer(models.WordLevel({"hello": 0, "world": 1}, unk_token=None))
    words.pre_tokenizer = pre_tokenizers.Whitespace()
    PreTrainedTokenizerFast(tokenizer_object=words).save_pretrained(tmp_path / "tokenizer")
    recipe = write_yaml(tmp_path / "r.yaml", make_recipe(tiny_llama, demo_data[0], tmp_path / "run",
                                                         model={"tokenizer": str(tmp_path / "tokenizer")}))
    capsys.readouterr()
    assert cli_exit_code(["train", str(recipe)]) == 2
    _one_line(capsys, "model.tokenizer: ", "has no pad, EOS or unknown token")
    assert not (tmp_path / "run" / "run.yaml").exists()


@pytest.mark.parametrize("override, expected", [
    ("output.dir=/", "output.dir: is the filesystem root"),
    ("output.dir=' '", "output.dir: is blank"),
    ("train.seed=true", "train.seed: must be an integer, not bool"),
    ("train.max_steps='3'", "train.max_steps: must be an integer, not str"),
    ('output.dir="runs/a\\x85b"', "output.dir: "),  # U+0085, a C1 control character (YAML's escape)
])
def test_values_that_would_be_coerced_or_misused_are_refused(tiny_llama, demo_data, tmp_path, capsys, override, expected):
    recipe = write_yaml(tmp_path / "r.yaml", make_recipe(tiny_llama, demo_data[0], tmp_path / "run"))
    capsys.readouterr()
    assert cli_exit_code(["validate", "-q", str(recipe), override]) == 2
    _one_line(capsys, expected)


def test_plan_json_is_valid_json_or_an_error(tiny_llama, demo_data, tmp_path, capsys):
    recipe = write_yaml(tmp_path / "r.yaml", make_recipe(tiny_llama, demo_data[0], tmp_path / "run"))
    capsys.readouterr()
    assert cli_exit_code(["plan", str(recipe), "--json", "--gpu-mem", "9" * 400]) == 2
    _one_line(capsys, "--gpu-mem")


def test_a_tool_calls_dict_and_an_impossible_step_are_named(run, tiny_llama, tmp_path):
    from ftl.data.chat import ChatError, parse_conversation
    from ftl.checkpoints.checkpoint import CheckpointError, read_state
    from ftl.recipe.schema import DataSource

    row = {"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": None, "tool_calls": {"function": {}}}]}
    with pytest.raises(ChatError, match=r"x: messages\[1\].tool_calls must be a list of tool calls, not dict"):
        parse_conversation(row, DataSource(path="x", format="chat"), "x")
    state = run / "checkpoints" / "step-1" / "trainer_state.json"
    state.write_text(json.dumps({**json.loads(state.read_text()), "step": 10**30}))
    with pytest.raises(CheckpointError, match="says step 10000000000000000000 of 1, which no run reaches"):
        read_state(state.parent)
