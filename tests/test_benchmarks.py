"""The GPU benchmark cannot run in CI; its --smoke mode runs the same code paths on CPU so it does not rot."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


@pytest.mark.slow
def test_gpu_benchmark_smoke_runs_every_tool_and_method(tmp_path):
    out = subprocess.run([sys.executable, str(ROOT / "benchmarks/gpu.py"), "--smoke", "--workdir", str(tmp_path)],
                         capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stderr[-2000:]
    rows = [line for line in out.stdout.splitlines() if line.startswith("| full") or line.startswith("| qlora")]
    assert [tuple(r.split("|")[1:3]) for r in rows] == [(" full ", " hf "), (" full ", " ftl "), (" qlora ", " hf "), (" qlora ", " ftl ")]
