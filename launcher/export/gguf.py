"""``ftl export --gguf``: a GGUF file beside the safetensors export, for llama.cpp, Ollama and LM Studio.

The conversion is llama.cpp's own ``convert_hf_to_gguf.py`` (with its vendored ``gguf-py``), run on
the verified export in a process of its own: its checks (known architecture, every tensor mapped,
the tokenizer recognised) are the conversion's checks, and a failure is reported with its last
error line. The converter comes from ``$FTL_LLAMA_CPP`` (a llama.cpp checkout) or from the
artifacts ``make artifacts`` fetched (the llama.cpp that the ``llama-cpp-python`` sdist vendors).

The file is then read back by an independent reader, transformers' GGUF loader (on the ``gguf``
package), and its logits are compared with the export's on the verification sequences.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import torch

from ftl.artifacts import artifacts_dir
from ftl.errors import UserError

GGUF_TYPES = ("f32", "f16", "bf16", "q8_0")
CONVERTER, LORA_CONVERTER = "convert_hf_to_gguf.py", "convert_lora_to_gguf.py"


def converter(name: str = CONVERTER) -> Path:
    """One of llama.cpp's converter scripts, or a one-line error naming where it is looked for."""
    where = Path(os.environ["FTL_LLAMA_CPP"]) if os.environ.get("FTL_LLAMA_CPP") else artifacts_dir() / "llama.cpp"
    script = where.expanduser() / name
    if not script.is_file():
        raise UserError(f"--gguf: llama.cpp's {name} is not in {where}; run `make artifacts` (it fetches llama.cpp's "
                        "converters from PyPI) or set FTL_LLAMA_CPP to a llama.cpp checkout")
    return script


def convert(source: Path, outtype: str, out: Path, base: Path | None = None) -> Path:
    """Convert the Hugging Face model directory ``source`` (or, with ``base``, the PEFT adapter
    directory ``source`` of that base model) into the GGUF file ``out``."""
    if outtype not in GGUF_TYPES:
        raise UserError(f"--gguf: '{outtype}' is not a GGUF type ftl converts to; choose one of {', '.join(GGUF_TYPES)}")
    script = converter(CONVERTER if base is None else LORA_CONVERTER)
    command = [sys.executable, str(script), str(source), "--outfile", str(out), "--outtype", outtype]
    # The converter imports its own conversion/ package from its directory, which safe-path mode hides.
    env = {k: v for k, v in os.environ.items() if k != "PYTHONSAFEPATH"}
    done = subprocess.run(command + (["--base", str(base)] if base is not None else []), cwd=script.parent,
                          capture_output=True, text=True, env=env)
    if done.returncode:
        lines = [line.strip() for line in (done.stderr + done.stdout).splitlines() if line.strip()]
        last = next((line for line in reversed(lines) if "rror" in line), lines[-1] if lines else "no output")
        raise UserError(f"--gguf: llama.cpp's {script.name} failed on the export: {last}")
    # A converter that exits 0 without writing (or writes something else) must not be reported as done.
    if not out.is_file() or _magic(out) != b"GGUF":
        raise UserError(f"--gguf: llama.cpp's {script.name} exited without error but wrote no GGUF file at {out.name}")
    return out


def _magic(path: Path) -> bytes:
    with open(path, "rb") as f:
        return f.read(4)


@torch.no_grad()
def compare(export_dir: Path, gguf: Path, sequences: list[list[int]]) -> dict[str, Any]:
    """Logits of the GGUF (read by transformers) against the safetensors export, both in float32."""
    from transformers import AutoModelForCausalLM

    exported = AutoModelForCausalLM.from_pretrained(export_dir, dtype=torch.float32).eval()
    converted = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32).eval()
    max_diff, agree, positions = 0.0, 0, 0
    for ids in sequences:
        a = exported(input_ids=torch.tensor([ids])).logits[0]
        b = converted(input_ids=torch.tensor([ids])).logits[0]
        max_diff = max(max_diff, (a - b).abs().max().item())
        agree += (a.argmax(-1) == b.argmax(-1)).sum().item()
        positions += len(ids)
    return {"gguf": gguf.name, "gguf_bytes": gguf.stat().st_size, "gguf_max_abs_logit_diff": max_diff,
            "gguf_greedy_agreement": agree / max(positions, 1)}
