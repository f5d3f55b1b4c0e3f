"""Chat data as users have it, rendered by the tokenizer's own chat template, and what is trained.

Rows are OpenAI-style ``messages`` (system, user, assistant, tool; assistant ``tool_calls``; a row's
``tools`` list goes to the template) or ShareGPT ``conversations`` (``from``/``value``). The whole
conversation is rendered once, exactly as ``apply_chat_template`` renders it at inference time, and
tokenized once; a token is a target when its characters lie in a trained span. The span of an
assistant turn starts where the template's generation prompt ends (so a Qwen3 ``<think>`` block the
model would generate is trained, the role header is not) and ends with the template's end-of-turn
token (``<|eot_id|>``, ``<|im_end|>``, ``<turn|>``, ``</s>``...), found by rendering a probe turn.

Which messages are trained: ``data.roles_to_train`` (default assistant only), ``data.mask_history``
(only the last assistant turn), and a message's own ``train: true/false``, which wins over both.
"""

from __future__ import annotations

import json
import logging
from typing import TYPE_CHECKING, Any

from ftl.errors import DataError, first_line
from ftl.objectives.batch import IGNORE_INDEX
from ftl.data.text import truncated_row

if TYPE_CHECKING:  # (annotations only: the recipe schema imports the rules, which read the formats)
    from ftl.recipe.schema import DataSection, DataSource

ROLE_ALIASES = {"human": "user", "gpt": "assistant", "bot": "assistant", "model": "assistant", "function_call": "assistant",
                "observation": "tool"}
# Roles chat templates know; anything else is a typo that would silently never be trained.
ROLES = ("system", "user", "assistant", "tool", "developer", "ipython", "function")
log = logging.getLogger(__name__)
SHAREGPT = {"messages": "conversations", "role": "from", "content": "value"}
PROBE = "ftl-probe-7319"  # text no template adds by itself


class ChatError(DataError):
    """A conversation that cannot be rendered or masked: names the file, the row and the message."""


def field_names(source: DataSource) -> tuple[str, str, str]:
    """(messages, role, content) column names: the format's defaults, then the source's mapping."""
    defaults = SHAREGPT if source.format == "sharegpt" else {"messages": "messages", "role": "role", "content": "content"}
    names = {**defaults, **source.fields}
    return names["messages"], names["role"], names["content"]


def parse_conversation(row: dict, source: DataSource, where: str) -> tuple[list[dict[str, Any]], list[dict] | None]:
    """The row's messages (role aliases resolved, tool-call arguments as dicts) and its tools."""
    column, role_key, content_key = field_names(source)
    raw = row.get(column)
    if not isinstance(raw, list) or not raw:
        raise ChatError(f"{where}: field '{column}' must be a non-empty list of messages")
    messages = []
    for i, message in enumerate(raw):
        if not isinstance(message, dict) or not isinstance(message.get(role_key), str):
            raise ChatError(f"{where}: {column}[{i}] needs a string '{role_key}'")
        role = ROLE_ALIASES.get(message[role_key], message[role_key])
        if role not in ROLES:
            raise ChatError(f"{where}: {column}[{i}] has role '{message[role_key]}'; known roles: {', '.join(ROLES)} "
                            f"(and {', '.join(ROLE_ALIASES)})")
        content = message.get(content_key)
        calls = message.get("tool_calls")
        if calls is not None and not isinstance(calls, list):
            raise ChatError(f"{where}: {column}[{i}].tool_calls must be a list of tool calls, not {type(calls).__name__}")
        if not isinstance(content, str) and not (content is None and role == "assistant" and calls):
            raise ChatError(f"{where}: {column}[{i}] needs a string '{content_key}' (or, for an assistant turn, tool_calls)")
        parsed: dict[str, Any] = {"role": role, "content": content or ""}
        if calls:
            parsed["tool_calls"] = [_tool_call(call, f"{where}: {column}[{i}].tool_calls[{k}]") for k, call in enumerate(calls)]
        for key in ("tool_call_id", "name"):
            if message.get(key) is not None:
                parsed[key] = message[key]
        if message.get("train") is not None:
            if not isinstance(message["train"], bool):
                raise ChatError(f"{where}: {column}[{i}].train must be true or false")
            parsed["train"] = message["train"]
        messages.append(parsed)
    tools = row.get("tools")
    if isinstance(tools, str):  # often stored as a JSON string, which keeps datasets from merging schemas
        try:
            tools = json.loads(tools) if tools.strip() else None
        except ValueError:
            raise ChatError(f"{where}: field 'tools' is a string but not JSON") from None
    if tools is not None and not (isinstance(tools, list) and all(isinstance(t, dict) for t in tools)):
        raise ChatError(f"{where}: field 'tools' must be a list of tool schemas (objects)")
    return messages, tools or None


def _tool_call(call: Any, where: str) -> dict[str, Any]:
    """OpenAI's ``{type, function: {name, arguments}}`` with arguments as a dict, as templates expect."""
    function = call.get("function", call) if isinstance(call, dict) else None
    if not isinstance(function, dict) or not isinstance(function.get("name"), str):
        raise ChatError(f"{where}: a tool call needs function.name")
    arguments = function.get("arguments") or {}
    if isinstance(arguments, str):
        try:
            arguments = json.loads(arguments)
        except ValueError:
            raise ChatError(f"{where}: function.arguments is a string but not JSON") from None
    result = {"type": "function", "function": {"name": function["name"], "arguments": arguments}}
    if isinstance(call, dict) and call.get("id") is not None:
        result["id"] = call["id"]
    return result


def render(tokenizer: Any, messages: list[dict], tools: list[dict] | None, generation_prompt: bool, where: str) -> str:
    plain = [{k: v for k, v in m.items() if k != "train"} for m in messages]
    try:
        return tokenizer.apply_chat_template(plain, tools=tools, tokenize=False, add_generation_prompt=generation_prompt)
    except Exception as err:  # jinja's own errors: raise_exception() in templates, undefined fields
        raise ChatError(f"{where}: the chat template failed to render this conversation: {first_line(err)}") from None


_PROBES: dict[tuple[int, str], tuple[str, str, list[str]]] = {}


def template_markers(tokenizer: Any) -> tuple[str, str, list[str]]:
    """(generation prompt, end of turn, special tokens) of the tokenizer's template, from probe conversations: the
    text between a user message and the reply (``[/INST]``, ``<|im_end|>\\n<|im_start|>assistant\\n``),
    and the first special token after a reply (``<|im_end|>``, ``<|eot_id|>``, ``<|end|>``, ``</s>``)."""
    key = (id(tokenizer), str(tokenizer.chat_template))
    if key not in _PROBES:
        asked = render(tokenizer, [{"role": "user", "content": PROBE}], None, True, "chat template probe")
        generation = asked[asked.index(PROBE) + len(PROBE):] if PROBE in asked else ""
        text = render(tokenizer, [{"role": "user", "content": "hi"}, {"role": "assistant", "content": PROBE}], None, False,
                      "chat template probe")
        after = text[text.index(PROBE) + len(PROBE):] if PROBE in text else ""
        specials = set(tokenizer.all_special_tokens) | {str(t) for t in tokenizer.added_tokens_decoder.values() if getattr(t, "special", False)}
        found = sorted((after.find(s), -len(s), s) for s in specials if s and after.find(s) >= 0)
        if not generation or not found:
            raise ChatError("the chat template has no generation prompt or closes an assistant turn with no special token; "
                            "ftl cannot tell where a reply starts and ends (use format: completion)")
        _PROBES[key] = (generation, found[0][2], sorted(s for s in specials if s))
    return _PROBES[key]


def _turn_continues(full: str, through: str, end: int, specials: list[str]) -> int | None:
    """Where ``full`` leaves the rendering that stops after this message (``through``), if that is
    after the message's text: the end of the last special token they share (Gemma's ``<tool_call|>``
    before a tool response in the same turn). None when they part earlier (Qwen3 renders a last
    reply's empty ``<think>`` block)."""
    n = min(len(full), len(through))
    same = next((k for k in range(end, n) if full[k] != through[k]), n)
    if full[:end] != through[:end]:
        return None
    if same == len(through):  # the whole rendering is a prefix: it stops exactly there
        return same
    ends = [full.rfind(s, end, same) + len(s) for s in specials if full.rfind(s, end, same) >= 0]
    ends = [e for e in ends if e <= same]
    return max(ends) if ends else None


def trained_messages(messages: list[dict], source: DataSource) -> list[bool]:
    """Per message: is it trained (role, mask_history, and the message's own ``train`` flag)."""
    last_assistant = max((i for i, m in enumerate(messages) if m["role"] == "assistant"), default=-1)
    flags = []
    for i, message in enumerate(messages):
        trained = message["role"] in source.roles_to_train
        if source.mask_history and message["role"] == "assistant" and i != last_assistant:
            trained = False
        flags.append(message.get("train", trained))
    return flags


def conversation_spans(messages: list[dict], tools: list[dict] | None, tokenizer: Any, source: DataSource,
                       where: str) -> tuple[str, list[tuple[int, int]]]:
    """The training text of a conversation and the character spans that are trained.

    The text is what the template renders at inference time for the last reply: the conversation
    before it with ``add_generation_prompt``, then the reply. (Templates may render history and the
    turn being generated differently: Qwen3 and Gemma 4 think blocks, Mistral's system prompt.)

    A trained reply starts where the template's generation prompt for it ends: where the text
    rendered up to it with ``add_generation_prompt`` is a prefix of the training text, there;
    otherwise at its content, or for a reply with no content (a tool call) after the template's
    turn header. It ends with the end-of-turn token, or earlier where the template continues the
    turn with the next message (Gemma's tool responses).
    """
    generation, eot, specials = template_markers(tokenizer)
    _refuse_special_text(messages, specials, where)
    full = render(tokenizer, messages, tools, False, where)
    last = len(messages) - 1
    # What a message is located in by probing: the whole rendering, or, where the last reply is
    # rendered after the inference-time prompt instead, that prompt.
    probed: tuple[list[dict], bool] = (messages, False)
    if last > 0 and messages[last]["role"] == "assistant":
        prompt = render(tokenizer, messages[:last], tools, True, where)
        if not full.startswith(prompt):
            start = _reply_start(full, messages[last], generation, specials, 0, from_end=True)
            if start is None:
                raise ChatError(f"{where}: messages[{last}]: the chat template renders this reply so that ftl cannot "
                                "locate it; set train: false on it or fix the data")
            full = prompt + full[start:]
            probed = (messages[:last], True)
    spans: list[tuple[int, int]] = []
    cursor = 0
    for i, (message, trained) in enumerate(zip(messages, trained_messages(messages, source))):
        start, end = None, None
        content = message["content"]
        if message["role"] == "assistant" and i:
            prompt = render(tokenizer, messages[:i], tools, True, where)
            if full.startswith(prompt) and len(prompt) >= cursor:
                start = len(prompt)
        if start is None and trained and content and i < len(probed[0]):
            start = _probe_start(tokenizer, probed[0], i, tools, probed[1], full, where)
            end = None if start is None else start + len(content)
        if start is None:
            if message["role"] == "system" and not trained:
                continue  # templates move system prompts (Llama 3.1's header, Mistral's last user turn)
            # Only where no rendering locates it: an untrained message (for the cursor) or an empty reply.
            start = None if trained and content else _reply_start(full, message, generation, specials, cursor)
        if start is None:
            if trained:
                raise ChatError(f"{where}: messages[{i}]: the chat template changes this message's text, so its tokens "
                                "cannot be located; set train: false on it or fix the data")
            continue
        if end is None:
            end = full.find(content, start) + len(content) if content else start
        if trained:
            close = full.find(eot, end)
            if close < 0:
                raise ChatError(f"{where}: messages[{i}]: no end-of-turn token {eot!r} follows this message in the rendered "
                                "conversation; set train: false on it")
            stop = close + len(eot) if source.train_eot else close
            if i < last:  # the template may continue this turn with the next message
                parted = _turn_continues(full, render(tokenizer, messages[: i + 1], tools, False, where), end, specials)
                if parted is not None and end < parted < stop:
                    stop = parted
            text = full[start:stop]
            missing = [c["function"]["name"] for c in message.get("tool_calls", []) if c["function"]["name"] not in text]
            if missing:
                raise ChatError(f"{where}: messages[{i}]: the chat template does not render tool calls ({missing[0]}); this "
                                "model's template does not support tool calling, or set train: false on the message")
            spans.append((start, stop))
            end = max(end, stop)
        cursor = end
    return full, spans


def _probe_start(tokenizer: Any, messages: list[dict], i: int, tools: list[dict] | None, generation_prompt: bool,
                 full: str, where: str) -> int | None:
    """Where message ``i``'s content starts in ``full``, found by rendering: the conversation rendered
    with a probe in place of that content must equal ``full`` with the probe in place of the content
    at exactly one position. (Searching for the text instead finds a short content in a role header,
    a date line or a default system prompt first.)"""
    content = messages[i]["content"]
    swapped = [dict(m, content=PROBE) if k == i else m for k, m in enumerate(messages)]
    try:
        text = render(tokenizer, swapped, tools, generation_prompt, where)
    except ChatError:
        return None
    at = text.find(PROBE)
    if at < 0 or text.count(PROBE) != 1:
        return None
    rest = text[at + len(PROBE):]
    if full[:at] == text[:at] and full[at:at + len(content)] == content and full[at + len(content):].startswith(rest):
        return at
    return None


def _refuse_special_text(messages: list[dict], specials: list[str], where: str) -> None:
    """A message whose text holds a special token's text (``<|im_end|>``, ``<|start_header_id|>``)
    would be tokenized as that control token and forge a turn boundary inside the conversation:
    such a row is refused, naming the row, the message and the token."""
    for i, message in enumerate(messages):
        text = message["content"] + "".join(json.dumps(c, ensure_ascii=False) for c in message.get("tool_calls", []))
        found = next((s for s in specials if s in text), None)
        if found is not None:
            raise ChatError(f"{where}: messages[{i}] contains the text of the special token {found!r}, which would be "
                            "tokenized as that control token and forge a turn boundary; remove it from the data")


def _reply_start(text: str, message: dict, generation: str, specials: list[str], cursor: int, from_end: bool = False) -> int | None:
    """Where a message's text starts, without the prefix rendering: its content; for an empty one
    (a tool call), after the nearest match of the generation prompt or of a part of it that ends a
    line and holds a special token (``<turn|>\\n<|turn>model\\n`` of Gemma's
    ``...<|channel>thought\\n<channel|>``), the longest where several match there."""
    find = (lambda s: text.rfind(s, cursor)) if from_end else (lambda s: text.find(s, cursor))
    if message["content"]:
        found = find(message["content"])
        return found if found >= 0 else None
    headers = [generation[:k + 1] for k, c in enumerate(generation) if c == "\n"] + [generation]
    found = [(find(h), len(h)) for h in headers if any(s in h for s in specials) and find(h) >= 0]
    if not found:
        return None
    at, length = max(found, key=(lambda f: (f[0], f[1])) if from_end else (lambda f: (-f[0], f[1])))
    return at + length


def check_tokenizer(tokenizer: Any, source: DataSource) -> None:
    """Before any row: a chat source needs a chat template; a template that writes BOS while the
    tokenizer also adds one would double it in the usual ``tokenizer(apply_chat_template(...))``."""
    if not tokenizer.chat_template:
        raise ChatError(f"{source.path}: format {source.format} needs a tokenizer with a chat template, and "
                        f"{tokenizer.name_or_path} has none; set model.tokenizer to one that has (the instruct model's), "
                        "or use format: alpaca or completion")
    template_markers(tokenizer)  # a template ftl cannot read fails here, before any row
    bos = tokenizer.bos_token
    text = render(tokenizer, [{"role": "user", "content": PROBE}], None, True, "chat template probe")
    adds_bos = bos is not None and tokenizer(PROBE)["input_ids"][:1] == [tokenizer.bos_token_id]
    if bos and text.startswith(bos) and adds_bos and id(tokenizer) not in _WARNED:
        _WARNED.add(id(tokenizer))
        log.warning("the chat template writes BOS %r and the tokenizer adds it too: ftl tokenizes conversations "
                    "without the tokenizer's (one BOS); at inference use apply_chat_template(tokenize=True), which does the same", bos)


_WARNED: set[int] = set()


def tokenize_conversation(row: dict, source: DataSource, tokenizer: Any, where: str) -> tuple[list[int], list[bool]]:
    """Token ids of the rendered conversation (no special tokens added: the template writes its own,
    as ``apply_chat_template`` does at inference) and which of them are targets."""
    if not tokenizer.chat_template:
        raise ChatError(f"{where}: {source.format} format needs a tokenizer with a chat template (tokenizer_config.json)")
    messages, tools = parse_conversation(row, source, where)
    full, spans = conversation_spans(messages, tools, tokenizer, source, where)
    encoded = tokenizer(full, add_special_tokens=False, return_offsets_mapping=True)
    ids, offsets = encoded["input_ids"], encoded["offset_mapping"]
    targets = [any(_overlaps(token, span) for span in spans) for token in offsets]
    return ids, targets


def _overlaps(token: tuple[int, int], span: tuple[int, int]) -> bool:
    """A token that straddles the start of a reply is the reply's: SentencePiece writes the space
    before ``It`` into ``▁It``, and the model has to generate that token."""
    (a, b), (s, e) = token, span
    return a < e and (b > s if b > a else a >= s)


def tokenize_chat_row(row: dict, source: DataSource, tokenizer: Any, cfg: DataSection, where: str) -> dict[str, Any]:
    """A chat or sharegpt row for supervised training: the trained turns' tokens are targets (every
    token, with ``data.mask_prompt: false``), cut to ``data.max_length``."""
    input_ids, targets = tokenize_conversation(row, source, tokenizer, where)
    labels = [t if (on or not cfg.mask_prompt) else IGNORE_INDEX for t, on in zip(input_ids, targets)]
    return truncated_row(input_ids, labels, cfg, where)
