#!/usr/bin/env bash
# Create the benchmark venv from a fresh clone:  bash benchmarks/setup_venv.sh
#
# An isolated venv (no --system-site-packages) at $BENCH_VENV (default: .bench-venv in the
# repository root) with torch 2.13.0 (CPU), laplace-torch, curvlinops, BackPACK and this
# package (editable, with its `bench` extra). Every pip call is constrained by
# benchmarks/constraints.txt so that torch is never re-resolved.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
VENV="${BENCH_VENV:-$ROOT/.bench-venv}"
PYTHON="${PYTHON:-python3}"
CONSTRAINTS="$ROOT/benchmarks/constraints.txt"

if [ ! -x "$VENV/bin/python" ]; then
    "$PYTHON" -m venv "$VENV"
fi
PIP=("$VENV/bin/python" -m pip install -q -c "$CONSTRAINTS")

# 1. torch first, pinned.
"${PIP[@]}" torch==2.13.0
# 2. this package with the references (pyproject extra `bench`).
"${PIP[@]}" -e "$ROOT[bench]"
# 3. torchvision comes in as a dependency of laplace-torch and BackPACK, but the PyPI wheel
#    is built against CUDA torch: with CPU torch, importing it fails with "operator
#    torchvision::nms does not exist", and torchmetrics (used by laplace-torch) imports it
#    whenever it is installed. Nothing benchmarked uses torchvision, so remove it.
"$VENV/bin/python" -m pip uninstall -q -y torchvision 2>/dev/null || true

"$VENV/bin/python" - <<'PY'
import torch, laplace, curvlinops, backpack, laplace_ggn
from importlib import metadata as m
assert torch.__version__.startswith("2.13.0"), torch.__version__
print("bench venv ok:", ", ".join(f"{d} {m.version(d)}" for d in (
    "torch", "laplace-torch", "curvlinops-for-pytorch", "backpack-for-pytorch", "laplace-ggn")))
PY
echo "run: $VENV/bin/python benchmarks/run_all.py [--quick]"
