#!/usr/bin/env bash
# The six sampler rows of the paper's Table 1 Panel B at small scale (tiny MoE, CPU), on one of
# two corpora:
#   ./launch/ablation.sh [flags]           the quick start's code corpus (runs/quickstart/data; prepared
#                                          here, or its finished stages reused), rows configs/ablation -> runs/ablation
#   ./launch/ablation.sh testbed [flags]   the controlled learnability testbed (grip testbed: clusters of
#                                          known learnability; built and prepared here if missing), rows
#                                          configs/ablation-testbed -> runs/ablation-testbed
# Every row trains the same 300 steps and seed(s), is evaluated (held-out loss per language, per
# cluster and overall, HumanEval loss) and tabulated in OUT/results.{md,csv,png}.
# Flags go to `grip ablate`, e.g. --seeds 0 1 2. Re-running resumes: finished rows are skipped.
# Summary over seeds, learnable vs noise clusters: python benchmarks/ablation_report.py --runs OUT
set -euo pipefail
cd "$(dirname "$0")/.."
export WANDB_MODE=${WANDB_MODE:-offline} HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false
if [ "${1:-}" = "testbed" ]; then
  shift
  [ -f runs/testbed/truth.json ] || grip testbed --out runs/testbed
  # always run: finished stages are cached, and a folder prepared by an older grip-loop is redone
  grip prepare --corpus runs/testbed/corpus.jsonl --out runs/testbed/data --config configs/prepare/testbed.yaml
  exec grip ablate --rows configs/ablation-testbed --out "${OUT:-runs/ablation-testbed}" \
    --max-tokens-per-lang 10000000 "$@"
fi
[ -d runs/quickstart/corpus ] || grip corpus --out runs/quickstart/corpus --max-files "${MAX_FILES:-2000}"
# always run: finished stages are cached, and a folder prepared by an older grip-loop is redone
grip prepare --corpus runs/quickstart/corpus --out runs/quickstart/data --config configs/prepare/quickstart.yaml
exec grip ablate --rows configs/ablation --out "${OUT:-runs/ablation}" --max-tokens-per-lang 10000000 "$@"
