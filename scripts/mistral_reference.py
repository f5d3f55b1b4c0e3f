"""Mistral's own chat templates and tokenizations, from ``mistral-common`` (Mistral's reference
tokenizer, the one its models were trained with).

Run by ``fetch_artifacts.py`` inside a throwaway venv that holds ``mistral-common`` and its
dependencies (which pin numpy below the version ftl's venv has). Writes into OUT:

- ``mistral-v3-spm.jinja`` and ``mistral-v3-tekken.jinja``: the chat templates mistral-common
  generates for the v3 SentencePiece (Mistral 7B v0.3) and v3 Tekken (Mistral Nemo) tokenizers;
- ``mistral-reference.json``: for each tokenizer file, conversations with system prompts, tool calls
  and tool results, and the token ids mistral-common encodes them to in fine-tuning mode: the
  oracle ftl's chat tokenization is tested against. (No runs of spaces: Hugging Face's conversion of
  SentencePiece models merges them differently from the sentencepiece library, upstream of ftl.)

Usage: ``python mistral_reference.py DATA_DIR OUT_DIR`` (DATA_DIR: ``mistral_common/data``).
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

from mistral_common.integrations.chat_templates.chat_templates import generate_chat_template
from mistral_common.protocol.instruct.request import ChatCompletionRequest
from mistral_common.protocol.instruct.validator import ValidationMode
from mistral_common.tokens.tokenizers.base import TokenizerVersion
from mistral_common.tokens.tokenizers.mistral import MistralTokenizer

VOCABS = {"spm": "mistral_instruct_tokenizer_240323.model.v3", "tekken": "tekken_240718.json"}
TOOLS = [{"type": "function", "function": {"name": "get_weather", "description": "Weather in a city", "parameters": {
    "type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}}}]
CALL = {"id": "call12345", "type": "function", "function": {"name": "get_weather", "arguments": '{"city": "Paris"}'}}
CONVERSATIONS = [
    {"tools": TOOLS, "messages": [
        {"role": "system", "content": "Be brief."}, {"role": "user", "content": "Weather in Paris?"},
        {"role": "assistant", "content": None, "tool_calls": [CALL]},
        {"role": "tool", "content": "18 C, sunny", "tool_call_id": "call12345", "name": "get_weather"},
        {"role": "assistant", "content": "It is 18 C and sunny."},
        {"role": "user", "content": "Thanks! And Rome?"}, {"role": "assistant", "content": "I do not know Rome's weather."}]},
    {"tools": None, "messages": [
        {"role": "system", "content": "You answer in French.\nKeep it short."},
        {"role": "user", "content": "Hello there"}, {"role": "assistant", "content": "Bonjour !"},
        {"role": "user", "content": " A leading space, a\ttab and a newline\n"}, {"role": "assistant", "content": "Un espace."}]},
    {"tools": None, "messages": [{"role": "user", "content": "1+1?"}, {"role": "assistant", "content": "2"}]},
]


def main() -> None:
    data, out = Path(sys.argv[1]), Path(sys.argv[2])
    out.mkdir(parents=True, exist_ok=True)
    reference = {}
    for kind, vocab in VOCABS.items():
        template = generate_chat_template(
            spm=kind == "spm", tokenizer_version=TokenizerVersion.v3, image_support=False, audio_support=False,
            thinking_support=False, default_system_prompt=None, plain_thinking_support=False,
            use_special_token_variables=True, model_settings_fields=None, reasoning_effort_values=None,
            reasoning_effort_default=None)
        (out / f"mistral-v3-{kind}.jinja").write_text(template)
        tokenizer = MistralTokenizer.from_file(data / vocab, mode=ValidationMode.finetuning)
        reference[vocab] = [
            {**c, "ids": tokenizer.encode_chat_completion(ChatCompletionRequest(messages=c["messages"], tools=c["tools"])).tokens}
            for c in CONVERSATIONS]
    (out / "mistral-reference.json").write_text(json.dumps(reference))


if __name__ == "__main__":
    main()
