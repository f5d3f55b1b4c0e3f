"""``ftl generate`` and ``ftl chat``: try a trained model without writing a script.

The target is a run directory (its newest complete checkpoint), a checkpoint or an export. Prompts
are rendered with the template the model was trained with: the tokenizer's chat template for chat
data, or for alpaca/completion runs the template ``ftl export`` ships (``ftl.export.template``),
which renders the training prompt around the user's message.
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any, Iterable, TextIO

import torch

from ftl.errors import UserError


def resolve_target(path: Path) -> tuple[Path, Any]:
    """(what to load, the run's recipe or None): a run directory means its newest complete checkpoint.
    (Loading verifies a checkpoint against its manifest; resolving does not.)"""
    from ftl.checkpoints.checkpoint import find_resumable
    from ftl.recipe.load import load_recipe
    from ftl.checkpoints.rundir import RunDir

    path = Path(path)
    run = RunDir(path) if RunDir(path).checkpoints.is_dir() else RunDir.of_checkpoint(path)
    if run is not None and path.resolve() == run.root.resolve():
        path = find_resumable(run.root)
        if path is None:
            raise UserError(f"{run.root}: a run directory with no complete checkpoint")
    recipe = load_recipe(run.recipe_to_read) if run is not None and run.recipe_to_read.is_file() else None
    return path, recipe


def load(path: Path, trust_remote_code: bool = False) -> tuple[Any, Any]:
    """Model and tokenizer, the tokenizer carrying the template the model was trained with."""
    from ftl.checkpoints.checkpoint import MANIFEST, STATE, verify
    from ftl.export.template import trained_chat_template
    from ftl.models.build import load_for_inference

    target, recipe = resolve_target(path)
    if (target / STATE).exists() or (target / MANIFEST).exists():
        verify(target)  # only an intact checkpoint
    model, tokenizer = load_for_inference(target, trust_remote_code=trust_remote_code)
    if recipe is not None:
        template, _ = trained_chat_template(tokenizer, recipe)
        if template is not None:
            tokenizer.chat_template = template
    if not tokenizer.chat_template:
        raise UserError(f"{path}: the tokenizer has no chat template, so a prompt cannot be rendered as the model was "
                        "trained; export the run (`ftl export` ships the template) or use a tokenizer that has one")
    return model.eval(), tokenizer


@torch.no_grad()
def reply(model: Any, tokenizer: Any, messages: list[dict[str, str]], max_new_tokens: int, temperature: float) -> str:
    """The model's next assistant message after ``messages``, greedy at temperature 0."""
    text = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    return continuation(model, tokenizer, tokenizer(text, add_special_tokens=False)["input_ids"], max_new_tokens, temperature)


@torch.no_grad()
def continuation(model: Any, tokenizer: Any, prompt_ids: list[int], max_new_tokens: int, temperature: float) -> str:
    """What the model generates after ``prompt_ids`` (until EOS), greedy at temperature 0."""
    ids = torch.tensor([prompt_ids], device=next(model.parameters()).device)
    sampling = {"do_sample": True, "temperature": temperature} if temperature > 0 else {"do_sample": False}
    out = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=max_new_tokens,
                         eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id, **sampling)
    return tokenizer.decode(out[0, ids.shape[1]:], skip_special_tokens=True).strip()


def chat(model: Any, tokenizer: Any, read: TextIO = sys.stdin, write: Any = print, max_new_tokens: int = 256,
         temperature: float = 0.0, system: str | None = None) -> int:
    """A conversation on ``read``, one user message per line; ``/reset`` starts over, ``/exit`` or the
    end of input ends it. Returns the number of replies."""
    history: list[dict[str, str]] = [{"role": "system", "content": system}] if system else []
    replies = 0
    for line in _lines(read):
        if line in ("/exit", "/quit"):
            break
        if line == "/reset":
            history = history[:1] if system else []
            write("(conversation reset)")
            continue
        history.append({"role": "user", "content": line})
        answer = reply(model, tokenizer, history, max_new_tokens, temperature)
        history.append({"role": "assistant", "content": answer})
        write(answer)
        replies += 1
    return replies


def _lines(read: TextIO) -> Iterable[str]:
    interactive = read.isatty()
    while True:
        if interactive:
            sys.stderr.write("you> ")
            sys.stderr.flush()
        line = read.readline()
        if not line:
            return
        if line.strip():
            yield line.strip()
