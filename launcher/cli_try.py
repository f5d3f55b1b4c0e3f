"""The commands that try a trained model: ``ftl eval``, ``ftl generate`` and ``ftl chat``."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any

from rich.markup import escape

from ftl.console import console, console_err
from ftl.errors import UserError


def cmd_eval(args: argparse.Namespace) -> int:
    from ftl.evaluate import evaluate_path

    model, source = _eval_target(Path(args.model), args.data, args.format)
    console.print(f"evaluating {escape(str(model))} on {escape(args.data)} ({source.format} format)", markup=True,
                  highlight=False, soft_wrap=True)
    from ftl.data.formats import FORMATS

    if FORMATS[source.format].pairs:
        from ftl.evaluate import preference_accuracy

        result = preference_accuracy(model, source, limit=args.limit, trust_remote_code=args.trust_remote_code)
        for key, value in result.items():
            console.print(f"{key.replace('_', ' ')}: [bold]{value:.1%}[/]" if "accuracy" in key else f"{key}: {value:g}",
                          markup=True)
        return 0
    if args.scorers:
        from ftl import scorers
        from ftl.evaluate import scores_path

        specs = [s for s in args.scorers.split(",") if s]
        for spec in specs:
            if wrong := scorers.check(spec):
                raise UserError(f"--scorers: {wrong}")
        means, n = scores_path(model, source, specs, args.limit, args.max_new_tokens, trust_remote_code=args.trust_remote_code)
        for name, value in means.items():
            console.print(f"{name}: [bold]{value:.4g}[/] (mean of {n} rows)", markup=True)
        return 0
    accuracy, n, examples = evaluate_path(model, source, args.limit, trust_remote_code=args.trust_remote_code)
    for example in examples:
        console.print(f"  expected {example['expected']!r:<24} generated {example['generated']!r}")
    console.print(f"exact match: [bold]{accuracy:.1%}[/] of {n} rows", markup=True)
    return 0


def cmd_generate(args: argparse.Namespace) -> int:
    import json

    from ftl.evaluate import prompts_and_answers, questions
    from ftl.generate import continuation, load, reply

    rows, source = [], None
    if args.data:
        _, source = _eval_target(Path(args.model), args.data, None)  # the run's format, else the data's
        rows = questions(source, args.limit)  # checked before the model loads
    if not rows and not args.prompt:
        raise UserError("ftl generate: give --prompt TEXT (repeatable) or --data FILE")
    model, tokenizer = load(Path(args.model), args.trust_remote_code)
    for prompt in args.prompt or []:
        generated = reply(model, tokenizer, [{"role": "user", "content": prompt}], args.max_new_tokens, args.temperature)
        print(json.dumps({"prompt": prompt, "generated": generated}, ensure_ascii=False), flush=True)
    if rows:  # each row's prompt exactly as training rendered it
        for (ids, answer), (_, _, where) in zip(prompts_and_answers(source, tokenizer, rows=rows), rows):
            generated = continuation(model, tokenizer, ids, args.max_new_tokens, args.temperature)
            print(json.dumps({"row": where, "generated": generated, "reference": answer}, ensure_ascii=False), flush=True)
    return 0


def cmd_chat(args: argparse.Namespace) -> int:
    from ftl.generate import chat, load

    model, tokenizer = load(Path(args.model), args.trust_remote_code)
    if sys.stdin.isatty():
        console_err.print("chat with the model: one message per line; /reset starts over, /exit (or Ctrl-D) ends", highlight=False)
    chat(model, tokenizer, max_new_tokens=args.max_new_tokens, temperature=args.temperature, system=args.system,
         write=lambda text: console.print(text, highlight=False, markup=False, soft_wrap=True))
    return 0


def _eval_target(model: Path, data: str, fmt: str | None) -> tuple[Path, Any]:
    """What `ftl eval` evaluates: a run directory means its newest complete checkpoint; the data's
    format (unless --format) is the one the run trained with, else read from the data's first row."""
    from ftl.recipe.schema import DataSource
    from ftl.evaluate import detect_format
    from ftl.generate import resolve_target

    model, recipe = resolve_target(model)
    if recipe is not None:
        sources = recipe.data.train + recipe.data.eval_sources()
        same = [s for s in sources if Path(s.path).resolve() == Path(data).resolve()]
        if same and fmt in (None, same[0].format):
            return model, same[0]  # with its field mapping and chat settings
        fmt = fmt or sources[0].format
    return model, DataSource(path=data, format=fmt or detect_format(data))
