#!/usr/bin/env bash
# Sets up .venv (scripts/setup.sh) and runs the whole test suite offline.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
export HF_HUB_OFFLINE=1
.venv/bin/python -m pytest "$@"
