#!/usr/bin/env bash
# Sets everything up (scripts/setup.sh), then runs the main job on its embedded default:
# trains a small language model made of moeforge.MoE layers on synthetic data.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
PY=${PYTHON:-python3}
"$PY" examples/train_moe.py "$@"
