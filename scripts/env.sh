#!/usr/bin/env bash
# Creates .venv (once) with glasslab and its dependencies; safe to run again.
# On a machine without an NVIDIA GPU, the CPU build of PyTorch is installed first, so pip does not pull
# several GB of CUDA packages for a plain `torch` requirement.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
if [ ! -x .venv/bin/python ]; then
  "$PY" -m venv .venv
fi
if ! .venv/bin/python -c "import torch" 2>/dev/null; then
  if command -v nvidia-smi >/dev/null 2>&1; then
    .venv/bin/pip install --quiet torch
  else
    .venv/bin/pip install --quiet "torch==2.13.0"
  fi
fi
stamp=.venv/.glasslab-installed
if [ ! -f "$stamp" ] || [ pyproject.toml -nt "$stamp" ]; then
  .venv/bin/pip install --quiet -e ".[test]"
  touch "$stamp"
fi
