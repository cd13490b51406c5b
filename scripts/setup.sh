#!/usr/bin/env bash
# Creates .venv from the lock (requirements/lock-py3.X.txt): the pinned CPU torch first, then every package at
# its locked version, then facereward itself (editable); last, checks that `pip freeze --all` equals the lock.
#   PYTHON=python3.X        the interpreter for a new venv (default python3); the lock must be for its version
#   VENV=DIR                the venv folder (default .venv)
#   FACEREWARD_LOCK=FILE    another lock (scripts/update-lock.sh --lowest installs the lower-bounds lock this way)
#   FACEREWARD_UNLOCKED=1   the newest releases pyproject.toml's ranges allow instead (no lock; not what CI tests)
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
VENV=${VENV:-.venv}
[ -x "$VENV/bin/python" ] || "$PYTHON" -m venv "$VENV"
py=$VENV/bin/python
pyver=$("$py" -c 'import sys; print("%d.%d" % sys.version_info[:2])')
# pip's output without the machine's warnings about missing local index folders; pip's exit status is kept
pip_install() { "$py" -m pip install -q "$@" 2>&1 | { grep -v "is ignored" || true; }; }

if [ "${FACEREWARD_UNLOCKED:-0}" = 1 ]; then
  echo "setup: FACEREWARD_UNLOCKED=1: newest releases within pyproject.toml's ranges, not the tested lock" >&2
  pip_install torch==2.13.0  # first, so that nothing else resolves torch to a newer (CUDA) build
  pip_install -e ".[test,docs]"
else
  lock=${FACEREWARD_LOCK:-requirements/lock-py$pyver.txt}
  if [ ! -f "$lock" ]; then
    echo "setup: $lock: no lock for Python $pyver (locks: $(ls requirements/lock-py*.txt 2>/dev/null | tr '\n' ' '));" \
         "use PYTHON=python3.11, or make one with PYTHON=$PYTHON bash scripts/update-lock.sh" >&2
    exit 1
  fi
  pinned() { sed -n "s/^$1==\([^ ;]*\).*/\1/p" "$lock"; }
  [ "$("$py" -m pip --version | cut -d' ' -f2)" = "$(pinned pip)" ] || pip_install "pip==$(pinned pip)"
  torch=$(pinned torch)
  if [ "$("$py" -c 'import torch; print(torch.__version__)' 2>/dev/null)" != "$torch" ]; then
    # alone and first: the CPU wheel from PIP_FIND_LINKS; PyPI only has CUDA builds of this version
    pip_install --no-deps "torch==$torch" || {
      echo "setup: $lock pins torch==$torch: put that wheel in a folder and set PIP_FIND_LINKS to it" >&2; exit 1; }
  fi
  pip_install -r "$lock"
  # the lock's setuptools builds the editable install, so nothing outside the lock is downloaded
  pip_install --no-deps --no-build-isolation -e .
  "$py" scripts/check_lock.py "$lock"
fi
"$py" -c "import facereward, diffusers, accelerate"
