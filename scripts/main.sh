#!/usr/bin/env bash
# Sets everything up (scripts/setup.sh), then runs the main job on its embedded default:
# LoRA fine-tuning (attention + experts, PEFT target_parameters) of a tiny random Qwen3-MoE on
# synthetic byte-level data through moeforge, after the same run without moeforge for the speedup.
# Extra arguments go to examples/finetune_qwen3_moe_lora.py (e.g. --model PATH_OR_ID --device cuda).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
PY=${PYTHON:-python3}
"$PY" examples/finetune_qwen3_moe_lora.py --compare "$@"
