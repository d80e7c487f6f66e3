#!/usr/bin/env bash
# Single node, N processes: launch/torchrun.sh N [LightningCLI args...]
#   launch/torchrun.sh 8 --config configs/train/h800x8-8b-grip.yaml
#   launch/torchrun.sh 2 --config configs/train/cpu-tiny.yaml   # CPU: DDP with gloo
# Run from the repository root (or give absolute --config paths). Lightning picks up the torchrun environment (RANK, WORLD_SIZE, MASTER_ADDR); devices and
# num_nodes are set here to match, so the YAML needs no edit. On CPU, DDP uses gloo.
set -euo pipefail
if [[ $# -lt 1 || ! "$1" =~ ^[0-9]+$ ]]; then
  echo "usage: $0 NPROC [LightningCLI args...]" >&2
  exit 2
fi
NPROC=$1; shift
# Run from the caller's directory (relative run folders land there); the repo goes on PYTHONPATH.
REPO=$(cd "$(dirname "$0")/.." && pwd)
export PYTHONPATH="$REPO${PYTHONPATH:+:$PYTHONPATH}"
export WANDB_MODE=${WANDB_MODE:-offline} HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false
# One CPU thread per process unless told otherwise (N processes share the cores).
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-1}
exec torchrun --standalone --nnodes 1 --nproc_per_node "$NPROC" -m train.main \
  "$@" --trainer.devices "$NPROC" --trainer.num_nodes 1
