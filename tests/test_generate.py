"""`ftl generate` and `ftl chat`: the trained model's replies, with the template it was trained with."""

from __future__ import annotations

import io
import json

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from ftl.recipe.schema import ExportSection
from ftl.recipe.load import validate_recipe
from ftl.export.write import export
from ftl.generate import chat, load
from ftl.train import train
from conftest import cli_exit_code, make_recipe


def test_generate_and_chat_reply_as_transformers_does_on_the_export(tiny_llama, demo_data, tmp_path, capsys):
    """An alpaca-trained run: `ftl generate RUN` renders the prompt as trained (the template the export
    ships), and gives what plain transformers generates from the export; `ftl chat` keeps a
    conversation and starts over on /reset."""
    run = tmp_path / "run"
    train(validate_recipe(make_recipe(tiny_llama, demo_data[0], run, train={"max_steps": 2, "learning_rate": 1e-2})))
    export(run, tmp_path / "export", ExportSection(dtype="float32", verify=False))
    prompt = "Which word is a color?"

    tokenizer = AutoTokenizer.from_pretrained(tmp_path / "export")
    model = AutoModelForCausalLM.from_pretrained(tmp_path / "export", dtype=torch.float32).eval()
    ids = tokenizer.apply_chat_template([{"role": "user", "content": prompt}], add_generation_prompt=True, return_tensors="pt",
                                        return_dict=True)["input_ids"]
    out = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=6, do_sample=False,
                         pad_token_id=tokenizer.pad_token_id)
    expected = tokenizer.decode(out[0, ids.shape[1]:], skip_special_tokens=True).strip()
    assert "### Instruction:" in tokenizer.decode(ids[0])  # the training prompt, not a chat format it never saw

    for target in (run, tmp_path / "export"):
        capsys.readouterr()
        assert cli_exit_code(["generate", str(target), "--prompt", prompt, "--max-new-tokens", "6"]) == 0
        assert json.loads(capsys.readouterr().out.strip().splitlines()[-1]) == {"prompt": prompt, "generated": expected}

    model, tokenizer = load(run)
    said: list[str] = []
    assert chat(model, tokenizer, io.StringIO(f"{prompt}\n/reset\n\n{prompt}\n/exit\nignored\n"), said.append, max_new_tokens=6) == 2
    assert said == [expected, "(conversation reset)", expected]


def test_generate_needs_prompts_and_checks_data_before_loading(tiny_llama, tmp_path, capsys):
    capsys.readouterr()
    assert cli_exit_code(["generate", str(tiny_llama)]) == 2
    assert "give --prompt TEXT (repeatable) or --data FILE" in capsys.readouterr().err
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"messages": [{"role": "user", "content": "no reply"}]}\n')
    assert cli_exit_code(["generate", str(tiny_llama), "--data", str(bad)]) == 2
    assert "bad.jsonl: row 0" in capsys.readouterr().err
