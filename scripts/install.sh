#!/usr/bin/env bash
# Create the virtual environment and install ftl with its test extra.
# torch: the CUDA build where an NVIDIA GPU is present, else the 2.13.0 CPU wheel (on local disk
# on the project's CPU machines). Everything after is installed with torch held at that version,
# so no dependency can swap it for a multi-GB CUDA build.
set -euo pipefail
VENV=${1:-.venv}
PYTHON=${PYTHON:-python3}

[ -x "$VENV/bin/python" ] || "$PYTHON" -m venv "$VENV"
PIP=("$VENV/bin/python" -m pip install --quiet --disable-pip-version-check)

if ! "$VENV/bin/python" -c "import torch" 2>/dev/null; then
    if command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L >/dev/null 2>&1; then
        echo "install: NVIDIA GPU found, installing the CUDA build of torch"
        "${PIP[@]}" torch
    else
        echo "install: no NVIDIA GPU, installing the torch 2.13.0 CPU wheel"
        "${PIP[@]}" torch==2.13.0
    fi
fi

TORCH_VERSION=$("$VENV/bin/python" -c "import torch; print(torch.__version__.split('+')[0])")
CONSTRAINTS=$(mktemp)
echo "torch==$TORCH_VERSION" > "$CONSTRAINTS"
echo "install: ftl and its dependencies (torch held at $TORCH_VERSION)"
"${PIP[@]}" -c "$CONSTRAINTS" -e ".[test]"
rm -f "$CONSTRAINTS"
