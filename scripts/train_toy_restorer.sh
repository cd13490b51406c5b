#!/usr/bin/env bash
# Trains the shipped toy restorer on the CPU and copies it into the package.
set -euo pipefail
cd "$(dirname "$0")/.."
export HF_HUB_OFFLINE=1
start=$(date +%s)
facereward train-base --config scripts/toy_restorer.yaml "$@"
end=$(date +%s)
rm -rf src/facereward/weights/toy-restorer
cp -r runs/toy-restorer/model src/facereward/weights/toy-restorer
cp scripts/toy_restorer.yaml src/facereward/weights/toy-restorer/train_config.yaml
echo "trained in $((end - start)) s" | tee src/facereward/weights/toy-restorer/TRAINING_TIME.txt
