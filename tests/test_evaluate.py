import json
from pathlib import Path

import pytest
from transformers import AutoModelForCausalLM, AutoTokenizer

from ftl.recipe.schema import DataSource
from ftl.evaluate import exact_match, prompts_and_answers
from ftl.checkpoints.checkpoint import write_manifest
from ftl.recipe.load import validate_recipe
from conftest import make_recipe, write_jsonl



def test_prompts_match_training_rendering(tiny_llama: Path, tmp_path: Path) -> None:
    tokenizer = AutoTokenizer.from_pretrained(tiny_llama)
    path = write_jsonl(tmp_path / "chat.jsonl", [{"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "yo"}]}])
    [(ids, answer)] = prompts_and_answers(DataSource(path=str(path), format="chat"), tokenizer)
    assert answer == "yo"
    assert tokenizer.decode(ids).endswith("<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n")


def test_exact_match_scores_greedy_generations(tiny_llama: Path, tmp_path: Path) -> None:
    tokenizer = AutoTokenizer.from_pretrained(tiny_llama)
    model = AutoModelForCausalLM.from_pretrained(tiny_llama)
    rows = [{"instruction": "Which word is a color?", "input": "cat red sun", "output": "red"}] * 3
    pairs = prompts_and_answers(DataSource(path=str(write_jsonl(tmp_path / "d.jsonl", rows))), tokenizer)
    accuracy, examples = exact_match(model, tokenizer, pairs, max_new_tokens=4)
    # The random model generates something; score it against its own output to check the scoring.
    generated = examples[0]["generated"]
    again, _ = exact_match(model, tokenizer, [(pairs[0][0], generated)] * 2 + [(pairs[0][0], generated + "x")], max_new_tokens=4)
    assert accuracy == (1.0 if generated == "red" else 0.0)
    assert again == 2 / 3


def test_a_run_that_trusts_remote_code_needs_the_flag(tiny_llama, demo_data, tmp_path, capsys):
    """Evaluating or exporting someone else's run must not import its model's Python files unasked."""
    from ftl.cli import main as cli_main

    run_dir = tmp_path / "run"
    recipe = validate_recipe(make_recipe(tiny_llama, demo_data[0], run_dir, model={"trust_remote_code": True}))
    checkpoint = run_dir / "checkpoints" / "step-1"
    checkpoint.mkdir(parents=True)
    (run_dir / "run.yaml").write_text(recipe.resolved().to_yaml())
    (checkpoint / "adapter_config.json").write_text("{}")
    (checkpoint / "trainer_state.json").write_text(json.dumps({"step": 1}))
    write_manifest(checkpoint)
    for argv in (["eval", str(checkpoint), "--data", str(demo_data[1])], ["export", str(checkpoint)]):
        with pytest.raises(SystemExit) as exit_info:
            cli_main(argv)
        assert exit_info.value.code == 2
        err = capsys.readouterr().err
        assert "model.trust_remote_code" in err and "--trust-remote-code" in err, err


def test_eval_of_a_corrupt_checkpoint_is_refused(tiny_llama, demo_data, tmp_path, capsys):
    from ftl.cli import main as cli_main
    from ftl.train import train

    train(validate_recipe(make_recipe(tiny_llama, demo_data[0], tmp_path / "run", train={"max_steps": 1})))
    weights = tmp_path / "run/checkpoints/step-1/adapter_model.safetensors"
    weights.write_bytes(weights.read_bytes()[:-4])
    with pytest.raises(SystemExit) as exit_info:
        cli_main(["eval", str(weights.parent), "--data", str(demo_data[1]), "--limit", "2"])
    assert exit_info.value.code == 2
    assert "adapter_model.safetensors has" in capsys.readouterr().err


def test_eval_of_a_chat_run_reads_its_format_and_checks_the_data_first(tiny_llama, tmp_path, capsys, monkeypatch):
    """`ftl eval RUN --data chat.jsonl` (no --format): the run directory means its newest checkpoint,
    the format is the one it trained with; a row that cannot be evaluated fails before any model loads."""
    from ftl.models import build as ftl_model
    from ftl.train import train
    from conftest import cli_exit_code

    chat = [{"messages": [{"role": "user", "content": f"say {w}"}, {"role": "assistant", "content": w}]} for w in ("red", "blue")] * 4
    data = write_jsonl(tmp_path / "chat.jsonl", chat)
    train(validate_recipe(make_recipe(tiny_llama, data, tmp_path / "run", data={"train": {"path": str(data), "format": "chat"}},
                                      train={"max_steps": 1})))
    capsys.readouterr()
    assert cli_exit_code(["eval", str(tmp_path / "run"), "--data", str(data), "--limit", "2"]) == 0
    out = capsys.readouterr().out
    assert "step-1" in out and "(chat format)" in out and "exact match:" in out
    # an exported model has no recipe: the format is read from the data
    bad = write_jsonl(tmp_path / "bad.jsonl", [{"messages": [{"role": "user", "content": "no reply"}]}])
    monkeypatch.setattr(ftl_model, "load_for_inference", lambda *a, **k: pytest.fail("loaded a model for bad data"))
    assert cli_exit_code(["eval", str(tiny_llama), "--data", str(bad)]) == 2
    assert "bad.jsonl: row 0: for exact match, the conversation must end with an assistant turn" in capsys.readouterr().err


def test_eval_of_an_adapter_only_export_names_its_base(tiny_llama, demo_data, tmp_path, capsys, monkeypatch):
    """An --adapter-only export names its base without a path: away from that base, one line that says
    what to load instead; beside it (a relative name), it evaluates with the base's tokenizer."""
    from ftl.export.write import export
    from ftl.train import train
    from conftest import cli_exit_code

    train(validate_recipe(make_recipe(tiny_llama, demo_data[0], tmp_path / "run", train={"max_steps": 1})))
    export(tmp_path / "run", tmp_path / "adapter", adapter_only=True)
    capsys.readouterr()
    assert cli_exit_code(["eval", str(tmp_path / "adapter"), "--data", str(demo_data[1]), "--limit", "2"]) == 2
    err = capsys.readouterr().err
    assert f"an adapter of '{tiny_llama.name}', which is neither a local directory nor in the Hugging Face cache" in err
    monkeypatch.chdir(tiny_llama.parent)
    assert cli_exit_code(["eval", str(tmp_path / "adapter"), "--data", str(demo_data[1]), "--limit", "2"]) == 0
