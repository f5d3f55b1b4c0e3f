from pathlib import Path

from transformers import AutoModelForCausalLM, AutoTokenizer

from ftl.config import DataSource
from ftl.evaluate import exact_match, prompts_and_answers
from conftest import write_jsonl



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
