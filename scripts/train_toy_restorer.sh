#!/usr/bin/env bash
# Trains the shipped toy restorer on the CPU and copies it into the package. Two stages:
#   1. scripts/toy_restorer.yaml: cleaner and an eps-prediction stage 2 on SD's scaled-linear schedule;
#   2. scripts/toy_restorer_v.yaml: that stage 2 fine-tuned into v-prediction on DDPM's linear schedule.
# The shipped folder turns DiffBIR's wavelet colour fix on by default (README: the toy base).
# Arguments go to both train-base calls (e.g. --resume auto after an interruption).
set -euo pipefail
cd "$(dirname "$0")/.."
export HF_HUB_OFFLINE=1
start=$(date +%s)
facereward train-base --config scripts/toy_restorer.yaml "$@"
middle=$(date +%s)
facereward train-base --config scripts/toy_restorer_v.yaml "$@"
end=$(date +%s)
rm -rf src/facereward/weights/toy-restorer
python - <<'PY'
from facereward.models.restorer import Restorer

restorer = Restorer.from_pretrained("runs/toy-restorer-v/model")
restorer.config.colour_fix = True
restorer.save_pretrained("src/facereward/weights/toy-restorer")
PY
{ cat scripts/toy_restorer.yaml; echo '---'; cat scripts/toy_restorer_v.yaml; } > src/facereward/weights/toy-restorer/train_config.yaml  # two YAML documents
echo "trained in $((end - start)) s (stage 1 recipe $((middle - start)) s, v fine-tune $((end - middle)) s)" \
  | tee src/facereward/weights/toy-restorer/TRAINING_TIME.txt
