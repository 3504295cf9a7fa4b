#!/usr/bin/env bash
# Before a GPU session, on this machine: download the wheels the GPU machine
# lacks (it has PyTorch 2.11, Triton 3.6, networkx, sympy, jinja2 and numpy,
# but no lark, and no network) into .whl/, which git ignores. The device call
# then names .whl in `carry`, and benchmarks/run_gpu.sh installs them.
set -euo pipefail
cd "$(dirname "$0")/.."
mkdir -p .git/info
grep -qx '/.whl/' .git/info/exclude 2>/dev/null || echo '/.whl/' >> .git/info/exclude
python3 -m pip download --no-deps --only-binary=:all: --python-version 3.12 \
    --implementation cp --platform manylinux_2_28_x86_64 --platform manylinux2014_x86_64 \
    -d .whl "lark==1.3.1"
ls -l .whl
