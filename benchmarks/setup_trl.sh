#!/usr/bin/env bash
# A separate venv, .venv-trl at the repo root, with trl 0.23.1 (the newest trl checked to still ship DDPOTrainer)
# beside facereward, for benchmarks/vs_trl_ddpo.py:
#
#     bash benchmarks/setup_trl.sh && .venv-trl/bin/python benchmarks/vs_trl_ddpo.py
#
# torch 2.13.0 (the machine's local CPU wheel) goes in first and every later pip call is constrained to it, so no
# package can swap in another torch. With benchmarks/requirements-trl.txt present the venv is installed from its
# exact pins; without it the packages are resolved (diffusers, accelerate and peft at the versions of the project's
# own venv, so both sides of the benchmark run the same UNet code) and the file is rewritten with `pip freeze`.
set -euo pipefail

root=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
venv="$root/.venv-trl"
pins="$root/benchmarks/requirements-trl.txt"
python=${PYTHON:-python3}

[ -x "$venv/bin/python" ] || "$python" -m venv "$venv"
constraint=$(mktemp)
trap 'rm -f "$constraint"' EXIT
echo "torch==2.13.0" >"$constraint"
pip() { "$venv/bin/python" -m pip "$@"; }

pip install "torch==2.13.0"
if [ -f "$pins" ]; then
    pip install -c "$constraint" -r "$pins"
else
    # trl itself (with its `datasets`, not needed for DDPO but imported by trl), its diffusers/peft extras, and the
    # runtime dependencies of facereward that `facereward.train.lrpo` and the wavelet/ssim rewards import
    # (pyproject.toml; the face, ONNX and report packages are left out: the benchmark does not touch them).
    pip install -c "$constraint" \
        "trl==0.23.1" "diffusers==0.42.1" "transformers==5.24.0" "accelerate==1.15.0" "peft==0.21.2" ftfy \
        "numpy>=1.24" "scipy>=1.10" "pillow>=10" "pyyaml>=6" "safetensors>=0.4.1" "tensorboard>=2.14" "tqdm>=4.66" \
        "opencv-python-headless>=4.8.0.76,<5"
fi
pip install -c "$constraint" --no-deps -e "$root"

"$venv/bin/python" - <<'EOF'
import torch, trl
from trl import DDPOConfig, DDPOTrainer, DefaultDDPOStableDiffusionPipeline  # noqa: F401
import facereward.train.lrpo  # noqa: F401
assert torch.__version__.split("+")[0] == "2.13.0", torch.__version__
print(f"ok: torch {torch.__version__}, trl {trl.__version__}, DDPOTrainer importable, facereward importable")
EOF
if [ ! -f "$pins" ]; then
    pip freeze --exclude-editable | grep -v '^-e ' >"$pins"
    echo "wrote $pins"
fi
