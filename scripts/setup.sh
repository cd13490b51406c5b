#!/usr/bin/env bash
# Creates .venv with the pinned CPU torch first (so pip never pulls a newer CUDA build), then facereward.
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
[ -x .venv/bin/python ] || "$PYTHON" -m venv .venv
. .venv/bin/activate
python -m pip install -q --upgrade pip 2>&1 | grep -v "is ignored" || true
python -c "import torch, sys; sys.exit(torch.__version__.split('+')[0] != '2.13.0')" 2>/dev/null \
  || python -m pip install -q torch==2.13.0 2>&1 | grep -v "is ignored" || true
python -c "import torch; assert torch.__version__.split('+')[0] == '2.13.0', torch.__version__"
python -m pip install -q -e ".[test]" 2>&1 | grep -v "is ignored" || true
python -c "import facereward, diffusers, accelerate" 
