"""The README's "Your first run on your own data", run as written (on a tiny model and 24 rows), so
the README cannot drift from the CLI."""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import write_jsonl

ROOT = Path(__file__).resolve().parent.parent


@pytest.mark.slow
def test_the_readmes_walkthrough_runs_as_written(tiny_llama, demo_data, tmp_path):
    block = re.search(r"<!-- walkthrough -->\n```bash\n(.*?)```\n<!-- /walkthrough -->", (ROOT / "README.md").read_text(), re.S)
    assert block, "the README's walkthrough block is missing"
    script = block.group(1).replace(". .venv/bin/activate\n", "")  # this interpreter's environment instead
    shutil.copytree(tiny_llama, tmp_path / "models" / "my-model")
    rows = [json.loads(line) for line in demo_data[0].read_text().splitlines()]
    (tmp_path / "data").mkdir()
    write_jsonl(tmp_path / "data" / "train.jsonl", rows[:16])
    write_jsonl(tmp_path / "data" / "held-out.jsonl", [json.loads(line) for line in demo_data[1].read_text().splitlines()][:8])
    env = {**os.environ, "PATH": f"{Path(sys.executable).parent}:{os.environ['PATH']}", "COLUMNS": "200"}
    done = subprocess.run(["bash", "-euo", "pipefail", "-c", script], cwd=tmp_path, capture_output=True, text=True, env=env,
                          timeout=900)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    run = tmp_path / "runs" / "my-model-lora"
    assert json.loads((run / "export" / "verify.json").read_text())["passed"]
    assert "trained tokens" in done.stdout and "exact match:" in done.stdout and "exported" in done.stdout
