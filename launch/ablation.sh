#!/usr/bin/env bash
# The six sampler rows of the paper's Table 1 Panel B at small scale (tiny MoE, CPU):
# reuses the quick start's prepared corpus (runs/quickstart/data; run ./launch/quickstart.sh
# first, or this script prepares it), trains every row of configs/ablation for the same 200
# steps and seed, evaluates each, and writes runs/ablation/results.{md,csv,png}.
# Usage: ./launch/ablation.sh [extra `grip ablate` flags, e.g. --seeds 0 1 2]
# Re-running resumes: finished rows (eval.json present) are skipped.
set -euo pipefail
cd "$(dirname "$0")/.."
export WANDB_MODE=${WANDB_MODE:-offline} HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false
if [ ! -f runs/quickstart/data/manifest.json ]; then
  [ -d runs/quickstart/corpus ] || grip corpus --out runs/quickstart/corpus --max-files "${MAX_FILES:-2000}"
  grip prepare --corpus runs/quickstart/corpus --out runs/quickstart/data --config configs/prepare/quickstart.yaml
fi
grip ablate --rows configs/ablation --out "${OUT:-runs/ablation}" --max-tokens-per-lang 40000 "$@"
