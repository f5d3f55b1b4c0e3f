from pathlib import Path

import pytest
from transformers import AutoTokenizer

from ftl.recipe.schema import DataSection, DataSource
from ftl.data.sources import IGNORE_INDEX, DataError, batch_indices, build_dataset, tokenize_row
from ftl.objectives.batch import pad_rows
from conftest import write_jsonl


@pytest.fixture(scope="module")
def tokenizer(tiny_llama: Path):
    return AutoTokenizer.from_pretrained(tiny_llama)


def _cfg(**kw) -> DataSection:
    return DataSection(train=[{"path": "unused.jsonl"}], **kw)


def _trained_text(tokenizer, row: dict) -> str:
    """The tokens the loss predicts (position 0 is never a target: labels are shifted by one)."""
    pairs = zip(row["input_ids"][1:], row["labels"][1:])
    return tokenizer.decode([t for t, label in pairs if label != IGNORE_INDEX])


def test_alpaca_trains_only_on_the_response(tokenizer) -> None:
    row = {"instruction": "Which word is a color?", "input": "cat red sun", "output": "red"}
    out = tokenize_row(row, DataSource(path="x"), tokenizer, _cfg(), "x: row 0")
    assert len(out["input_ids"]) == len(out["labels"])
    assert out["input_ids"][0] == tokenizer.bos_token_id
    assert _trained_text(tokenizer, out) == "red" + tokenizer.eos_token
    n_response = len(tokenizer("red", add_special_tokens=False)["input_ids"]) + 1
    assert out["labels"][:-n_response] == [IGNORE_INDEX] * (len(out["labels"]) - n_response)
    prompt = tokenizer.decode(out["input_ids"][:-n_response], skip_special_tokens=True)
    assert prompt.endswith("### Input:\ncat red sun\n\n### Response:\n")


def test_mask_prompt_off_trains_on_everything(tokenizer) -> None:
    row = {"instruction": "Say hi.", "output": "hi"}
    out = tokenize_row(row, DataSource(path="x"), tokenizer, _cfg(mask_prompt=False), "x")
    assert out["labels"] == out["input_ids"]


def test_chat_renders_template_and_masks_all_but_assistant_turns(tokenizer) -> None:
    messages = [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "color of fire?"},
        {"role": "assistant", "content": "red"},
        {"role": "user", "content": "and ice?"},
        {"role": "assistant", "content": "white"},
    ]
    out = tokenize_row({"messages": messages}, DataSource(path="x", format="chat"), tokenizer, _cfg(), "x")
    rendered = tokenizer.apply_chat_template(messages, tokenize=False)
    assert tokenizer.decode(out["input_ids"]) == rendered
    assert out["input_ids"][0] == tokenizer.bos_token_id  # once, from the template
    assert out["input_ids"].count(tokenizer.bos_token_id) == 1
    trained = [i for i, label in enumerate(out["labels"]) if label != IGNORE_INDEX]
    spans = tokenizer.decode([out["input_ids"][i] for i in trained])
    assert spans == "red<|im_end|>white<|im_end|>"  # the newline after <|im_end|> is never generated
    assert "user" not in spans and "assistant" not in spans


def test_sharegpt_roles_and_field_mapping(tokenizer) -> None:
    row = {"conv": [{"from": "human", "value": "hi"}, {"from": "gpt", "value": "yo"}]}
    source = DataSource(path="x", format="chat", fields={"messages": "conv", "role": "from", "content": "value"})
    out = tokenize_row(row, source, tokenizer, _cfg(), "x")
    assert _trained_text(tokenizer, out) == "yo<|im_end|>"


def test_completion_trains_on_all_text(tokenizer) -> None:
    out = tokenize_row({"body": "the sun"}, DataSource(path="x", format="completion", fields={"text": "body"}), tokenizer, _cfg(), "x")
    assert _trained_text(tokenizer, out) == "the sun" + tokenizer.eos_token


def test_malformed_rows_name_file_row_and_field(tmp_path: Path, tokenizer) -> None:
    good = {"instruction": "a", "output": "b"}
    path = write_jsonl(tmp_path / "bad.jsonl", [good, good, {"instruction": "a", "answer": "b"}])
    with pytest.raises(DataError, match=r"bad.jsonl: row 2: missing field 'output'"):
        build_dataset([DataSource(path=str(path))], tokenizer, _cfg())
    path = write_jsonl(tmp_path / "bad2.jsonl", [good, {"instruction": "a", "output": 3}])
    with pytest.raises(DataError, match=r"bad2.jsonl: row 1: field 'output' must be a string, got int"):
        build_dataset([DataSource(path=str(path))], tokenizer, _cfg())
    path = write_jsonl(tmp_path / "chat.jsonl", [{"messages": [{"role": "user", "content": "hi"}]}])
    with pytest.raises(DataError, match=r"chat.jsonl: row 0: no trainable token"):
        build_dataset([DataSource(path=str(path), format="chat")], tokenizer, _cfg())


def test_missing_and_unparsable_files(tmp_path: Path, tokenizer) -> None:
    with pytest.raises(DataError, match=r"nope.jsonl: data file not found"):
        build_dataset([DataSource(path=str(tmp_path / "nope.jsonl"))], tokenizer, _cfg())
    (tmp_path / "broken.jsonl").write_text('{"instruction": "a", "output": \n')
    with pytest.raises(DataError, match=r"broken.jsonl: line 1: not valid JSON"):
        build_dataset([DataSource(path=str(tmp_path / "broken.jsonl"))], tokenizer, _cfg())


def test_truncation_drops_rows_without_trainable_tokens(tmp_path: Path, tokenizer) -> None:
    short = {"instruction": "a", "output": "b"}
    limit = len(tokenize_row(short, DataSource(path="x"), tokenizer, _cfg(), "x")["input_ids"])
    path = write_jsonl(tmp_path / "long.jsonl", [{"instruction": "a " * 40, "output": "b"}, short])
    dataset = build_dataset([DataSource(path=str(path))], tokenizer, _cfg(max_length=limit))
    assert len(dataset) == 1
    assert all(len(ids) <= limit for ids in dataset["input_ids"])


def test_collate_pads_right_and_masks_padding() -> None:
    batch = pad_rows([{"input_ids": [5, 6, 7], "labels": [-100, 6, 7]}, {"input_ids": [8], "labels": [8]}], pad_token_id=0)
    assert batch.input_ids.tolist() == [[5, 6, 7], [8, 0, 0]]
    assert batch.labels.tolist() == [[-100, 6, 7], [8, -100, -100]]
    assert batch.attention_mask.tolist() == [[1, 1, 1], [1, 0, 0]]


def test_batch_order_does_not_depend_on_batch_or_world_size() -> None:
    flat = lambda batches: [i for b in batches for i in b]  # noqa: E731
    eight = flat(batch_indices(64, 8, seed=1, epoch=0, rank=0, world=1))
    two = flat(batch_indices(64, 2, seed=1, epoch=0, rank=0, world=1))
    assert eight == two and sorted(eight) == list(range(64))
    ranks = [batch_indices(64, 4, seed=1, epoch=0, rank=r, world=2) for r in range(2)]
    interleaved = flat(b for pair in zip(*ranks) for b in pair)
    assert interleaved == eight
    assert flat(batch_indices(64, 8, seed=1, epoch=1, rank=0, world=1)) != eight
    uneven = [batch_indices(10, 4, seed=1, epoch=0, rank=r, world=2) for r in range(2)]
    assert len(uneven[0]) == len(uneven[1]) == 1  # the third batch would leave rank 1 waiting


def test_add_eos_off_trains_without_eos(tokenizer) -> None:
    row = {"instruction": "Which word is a color?", "input": "cat red sun", "output": "red"}
    out = tokenize_row(row, DataSource(path="x"), tokenizer, _cfg(add_eos=False), "x")
    assert _trained_text(tokenizer, out) == "red"
    assert tokenizer.eos_token_id not in out["input_ids"]


@pytest.mark.parametrize("name, content, message", [
    ("empty.jsonl", b"", r"empty.jsonl: no rows \(the file is empty\)"),
    ("blank.jsonl", b"\n\n", r"blank.jsonl: no rows"),
    ("latin1.jsonl", b'{"instruction": "a", "output": "b"}\n{"instruction": "caf\xe9", "output": "b"}\n', r"latin1.jsonl: line 2: not UTF-8 text"),
    ("torn.jsonl", b'{"instruction": "a", "output": "b"}\n{"instruction": "a", "outp', r"torn.jsonl: line 2: not valid JSON"),
    ("list.jsonl", b'[1, 2]\n', r"list.jsonl: line 1: a row must be a JSON object, got list"),
    ("scalar.json", b'3', r"scalar.json: a .json data file holds a list of rows"),
    ("rows.json", b'[{"instruction": "a", "output": "b"}, 7]', r"rows.json: row 1: a row must be a JSON object, got int"),
    ("empty.json", b'[]', r"empty.json: no rows"),
])
def test_malformed_data_files_name_the_file_and_line(tmp_path, tokenizer, name, content, message) -> None:
    (tmp_path / name).write_bytes(content)
    with pytest.raises(DataError, match=message):
        build_dataset([DataSource(path=str(tmp_path / name))], tokenizer, _cfg())


def test_chat_options_apply_to_chat_formats_only(tmp_path) -> None:
    from ftl.recipe.schema import RecipeError
    from ftl.recipe.load import validate_recipe
    from conftest import make_recipe

    raw = make_recipe(tmp_path / "m", tmp_path / "d.jsonl", tmp_path / "run")
    raw["data"]["train"] = [{"path": "d.jsonl", "mask_history": True}]
    with pytest.raises(RecipeError, match="data.train.0.mask_history: applies to format chat or sharegpt, not alpaca"):
        validate_recipe(raw)
    raw["data"]["train"][0]["format"] = "sharegpt"
    assert validate_recipe(raw).data.train[0].mask_history


def test_an_unknown_chat_role_is_an_error_not_silently_untrained(tmp_path, tokenizer) -> None:
    rows = [{"messages": [{"role": "user", "content": "hi"}, {"role": "asistant", "content": "yo"}]}]
    path = write_jsonl(tmp_path / "chat.jsonl", rows)
    with pytest.raises(DataError, match=r"chat.jsonl: row 0: messages\[1\] has role 'asistant'; known roles: system, user, assistant"):
        build_dataset([DataSource(path=str(path), format="chat")], tokenizer, _cfg())


def test_the_recipe_schema_names_exactly_the_registered_formats() -> None:
    """One registry owns the data formats (ftl.data.formats); the schema's choices are its names, and every
    objective trains on registered formats."""
    from typing import get_args

    from ftl.recipe.schema import DataSource
    from ftl.data.formats import FORMATS
    from ftl.objectives import OBJECTIVES

    assert set(get_args(DataSource.model_fields["format"].annotation)) == set(FORMATS)
    assert {f for cls in OBJECTIVES.values() for f in cls.formats} == set(FORMATS)
