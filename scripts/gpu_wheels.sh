#!/usr/bin/env bash
# `make gpu-wheels`: fill .whl/ (ignored by git) with what benchmarks/gpu_check.py installs on a lent
# GPU machine. That machine (see NOTES) has Python 3.12, torch 2.11 (CUDA), transformers,
# accelerate, peft, triton and safetensors, and no package registry; the working tree travels
# whole and must stay under 64 MiB, so the folder holds at most 50 MiB: bitsandbytes (its CUDA
# 4-bit path, 43 MB) and ftl's small pure dependencies, at the versions CI tested
# (scripts/constraints.txt). datasets' own needs pyarrow (55 MB) and pandas (12 MB) do not fit:
# the check reports which of ftl's imports the machine lacks and runs what it can without them.
set -euo pipefail
cd "$(dirname "$0")/.."
OUT=.whl
PACKAGES=(bitsandbytes datasets dill multiprocess xxhash fsspec pydantic pydantic_core annotated-types
          typing-inspection rich markdown-it-py mdurl Pygments Jinja2 MarkupSafe setuptools)
pins=()
for name in "${PACKAGES[@]}"; do
    pin=$(grep -i "^${name}==" scripts/constraints.txt || true)
    pins+=("${pin:-$name}")
done
rm -rf "$OUT"
mkdir -p "$OUT"
python3 -m pip download --quiet --no-deps --only-binary=:all: --python-version 3.12 --implementation cp --abi cp312 \
    --platform manylinux_2_28_x86_64 --platform manylinux_2_24_x86_64 --platform manylinux_2_17_x86_64 \
    --platform manylinux2014_x86_64 -d "$OUT" "${pins[@]}"
size=$(du -sm "$OUT" | cut -f1)
ls -1 "$OUT"
echo "gpu-wheels: ${size} MiB in $OUT"
[ "$size" -le 50 ] || { echo "gpu-wheels: over 50 MiB; the tree would not travel" >&2; exit 1; }
