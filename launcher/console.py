"""The one place user-facing output goes through (rich); diagnostics go through ``logging``.

Markup is off by default: recipe values, paths and messages are printed as they are (a run name
like ``[/red]`` must neither crash nor vanish). A call that styles its text passes
``markup=True`` and escapes what it interpolates with :func:`rich.markup.escape`.
"""

from __future__ import annotations

import logging
import warnings

from rich.console import Console
from rich.logging import RichHandler

console = Console(highlight=False, markup=False)
console_err = Console(stderr=True, highlight=False, markup=False)


def setup_logging(level: str = "INFO", rank: int = 0) -> None:
    """Log to stderr through rich; ranks other than 0 only log warnings."""
    logging.basicConfig(
        level=level if rank == 0 else "WARNING",
        format="%(message)s",
        handlers=[RichHandler(console=console_err, show_path=False, show_time=False, markup=False)],
        force=True,
    )
    # Library warnings (e.g. bitsandbytes' paged-optimizer fallback) reach the user through the
    # same handler; Python's default filter already shows each one once.
    logging.captureWarnings(True)
    # What libraries say about themselves rather than the user's run stays off the console: their
    # info lines (DeepSpeed's accelerator detection), deprecation notices addressed to library
    # authors (transformers' FutureWarnings), and bitsandbytes' advice to install an optional CPU
    # kernel package (ftl keeps one 4-bit compute path on every CPU; see ftl.models.build).
    for noisy in ("httpx", "urllib3", "filelock", "datasets", "torch.distributed", "accelerate", "DeepSpeed", "peft",
                  "transformers"):
        logging.getLogger(noisy).setLevel("WARNING")
    logging.getLogger("bitsandbytes").setLevel("ERROR")
    warnings.filterwarnings("ignore", category=FutureWarning, module=r"(transformers|accelerate|peft|deepspeed)(\.|$)")
    # Per-file weight loading bars say nothing useful for a training run; datasets' bars stay.
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()
