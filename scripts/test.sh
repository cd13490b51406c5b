#!/usr/bin/env bash
# Sets up .venv from the lock (scripts/setup.sh) and runs the whole test suite offline; arguments go to pytest.
set -euo pipefail
cd "$(dirname "$0")/.."
VENV=${VENV:-.venv}
VENV=$VENV bash scripts/setup.sh
# the annotation page's browser test drives Debian's Chromium (installed when missing and we are root)
if { [ ! -x /usr/bin/chromium ] || [ ! -x /usr/bin/chromedriver ]; } && [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null; then
  (apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium chromium-driver >/dev/null) \
    || echo "warning: could not install chromium; the browser test will be skipped" >&2
fi
# NIQE's standard pristine model (the MATLAB release's parameters, from BasicSR's archive on PyPI) for its acceptance test
"$VENV/bin/python" scripts/fetch_niqe_release.py >/dev/null \
  || echo "warning: could not fetch NIQE's release model; its acceptance test will be skipped" >&2
export HF_HUB_OFFLINE=1
"$VENV/bin/python" -m pytest "$@"
