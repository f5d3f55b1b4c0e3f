"""The commands that write starting points: ``ftl init`` (a recipe), ``ftl tiny-model``,
``ftl demo-data`` and ``ftl demo``; each refuses to write over what a user keeps."""

from __future__ import annotations

import argparse
from pathlib import Path

from ftl.console import console
from ftl.errors import UserError


def cmd_init(args: argparse.Namespace) -> int:
    from ftl.starter import starter_recipe

    out = Path(args.out)
    if out.exists() and not args.force:
        raise UserError(f"--out: {out} exists; choose another file, or pass --force to replace it")
    text = starter_recipe(Path(args.model), Path(args.data), args.method)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(text)
    console.print(f"wrote {out}; next: ftl validate {out} && ftl preprocess {out} --show 3", highlight=False, soft_wrap=True)
    return 0


def cmd_tiny_model(args: argparse.Namespace) -> int:
    from ftl.tiny import ARCHS, write_tiny_model

    if args.arch not in ARCHS:
        raise UserError(f"--arch: unknown architecture '{args.arch}'; choose one of {', '.join(ARCHS)}")
    if args.hidden_size % 8:
        raise UserError(f"--hidden-size: {args.hidden_size} is not a multiple of 8 (4 attention heads of even size)")
    corpus = None
    if args.corpus:
        corpus_path = Path(args.corpus)
        if not corpus_path.is_file():
            raise UserError(f"--corpus: {corpus_path} is not a file")
        try:
            corpus = corpus_path.read_text(encoding="utf-8").splitlines()
        except UnicodeDecodeError as err:
            raise UserError(f"--corpus: {corpus_path} is not UTF-8 text (byte {err.start}); save it as UTF-8") from None
    _empty_target(Path(args.out_dir), "out_dir", args.force)
    out = write_tiny_model(args.out_dir, args.arch, args.hidden_size, args.layers, args.vocab_size, args.seed, corpus)
    console.print(f"wrote tiny {args.arch} model and tokenizer to {out}")
    return 0


def cmd_demo_data(args: argparse.Namespace) -> int:
    from ftl.data.demo import write_demo_data

    _empty_target(Path(args.out_dir), "out_dir", args.force)
    train_path, eval_path = write_demo_data(args.out_dir, args.train_rows, args.eval_rows, args.seed)
    console.print(f"wrote {train_path} and {eval_path}")
    return 0


def _empty_target(path: Path, what: str, force: bool) -> None:
    """Helper commands write into a directory of their own: never over what a user keeps there."""
    if path.exists() and not path.is_dir():
        raise UserError(f"{what}: {path} is a file; choose a directory")
    if path.is_dir() and any(path.iterdir()) and not force:
        raise UserError(f"{what}: {path} is not empty and its files would be overwritten; choose a new directory, "
                        "or pass --force to write into it anyway")


def cmd_demo(args: argparse.Namespace) -> int:
    from ftl.demo import run

    result = run(args.objective, args.recipe, args.workdir, tiny=args.tiny, force=args.force)
    return 0 if result["accuracy_after"] > result["accuracy_before"] else 1
