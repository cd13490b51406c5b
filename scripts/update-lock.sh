#!/usr/bin/env bash
# Refreshes the lock to the newest releases pyproject.toml allows, rebuilds .venv from it and runs the suite.
#   bash scripts/update-lock.sh [--lowest] [--keep] [--no-test] [pytest args...]
#   --lowest   lock the lowest releases pyproject.toml allows for our direct dependencies instead
#              (requirements/lowest-py3.X.txt, installed in .venv-lowest): the lower bounds' test
#   --keep     keep the current pins wherever they still fit (after editing pyproject.toml); no upgrades
#   --no-test  only write the lock
#   PYTHON=python3.X picks the interpreter (one lock per Python version); TORCH_FIND_LINKS=DIR holds the
#   CPU torch wheel (default /opt/wheels). Review `git diff requirements/` and commit the lock if the suite passed.
set -euo pipefail
cd "$(dirname "$0")/.."
UV_VERSION=0.13.9  # the resolver itself is pinned: same inputs, same lock
PYTHON=${PYTHON:-python3}
mode=newest test=1 upgrade=(--upgrade)
while [ $# -gt 0 ]; do
  case "$1" in
    --lowest) mode=lowest; shift ;;
    --no-test) test=0; shift ;;
    --keep) upgrade=(); shift ;;
    *) break ;;
  esac
done
pyver=$("$PYTHON" -c 'import sys; print("%d.%d" % sys.version_info[:2])')
tools=.venv-tools  # uv lives apart from .venv, so it never shows up in .venv's freeze
if [ "$("$tools/bin/uv" --version 2>/dev/null | cut -d' ' -f2)" != "$UV_VERSION" ]; then
  "$PYTHON" -m venv "$tools"
  "$tools/bin/python" -m pip install -q "uv==$UV_VERSION" 2>&1 | { grep -v "is ignored" || true; }
fi
if [ $mode = lowest ]; then
  lock=requirements/lowest-py$pyver.txt venv=.venv-lowest resolution=(--resolution lowest-direct) flag=" --lowest"
else
  lock=requirements/lock-py$pyver.txt venv=.venv resolution=("${upgrade[@]}") flag=""
fi
echo "update-lock: resolving the $mode releases for Python $pyver into $lock"
rm -f "$lock.new"
if [ ${#upgrade[@]} = 0 ] && [ -f "$lock" ]; then grep -v '^#' "$lock" > "$lock.new"; fi  # --keep: uv prefers its output file's pins
"$tools/bin/uv" pip compile pyproject.toml requirements/lock.in --extra test --extra docs "${resolution[@]}" \
  --python "$PYTHON" --find-links "${TORCH_FIND_LINKS:-/opt/wheels}" --override requirements/overrides.txt \
  --no-header --quiet -o "$lock.new"
{ echo "# The exact versions the test suite passed with, for CPython $pyver ($mode releases of pyproject.toml's ranges)."
  echo "# Written by: bash scripts/update-lock.sh$flag; installed by scripts/setup.sh."
  cat "$lock.new"; } > "$lock"
rm -f "$lock.new"
if grep -nE '^(nvidia-|cuda-|triton|torchvision|torchaudio)' "$lock"; then
  echo "update-lock: $lock pulls a CUDA build or torchvision (above); is the CPU torch wheel in TORCH_FIND_LINKS?" >&2
  exit 1
fi
git --no-pager diff --stat -- "$lock" 2>/dev/null || true
[ $test = 1 ] || exit 0
rm -rf "$venv"  # a fresh venv: nothing left over from the previous lock
VENV=$venv FACEREWARD_LOCK=$lock PYTHON=$PYTHON bash scripts/test.sh "$@"
echo "update-lock: the suite passed with $lock; review it (git diff requirements/) and commit it"
