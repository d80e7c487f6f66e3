#!/usr/bin/env bash
# Multi node: run the same command on every node.
#   NNODES=2 NPROC=8 MASTER_ADDR=node0 MASTER_PORT=29500 launch/multinode.sh --config configs/train/h800x8-8b-grip.yaml
# Rendezvous: torchrun's c10d backend at MASTER_ADDR:MASTER_PORT with RUN_ID as the job id, so
# node ranks are assigned automatically (no NODE_RANK needed) and a restarted node rejoins.
# Works on one CPU machine too (NNODES=1 NPROC=2 MASTER_ADDR=127.0.0.1), with gloo.
set -euo pipefail
: "${NNODES:?set NNODES (number of nodes)}"
: "${NPROC:?set NPROC (processes per node, usually GPUs per node)}"
: "${MASTER_ADDR:?set MASTER_ADDR (host name of the rendezvous node)}"
MASTER_PORT=${MASTER_PORT:-29500}
RUN_ID=${RUN_ID:-grip-$(date +%Y%m%d)}
# Run from the caller's directory (relative run folders land there); the repo goes on PYTHONPATH.
REPO=$(cd "$(dirname "$0")/.." && pwd)
export PYTHONPATH="$REPO${PYTHONPATH:+:$PYTHONPATH}"
export WANDB_MODE=${WANDB_MODE:-offline} HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-1}
exec torchrun --nnodes "$NNODES" --nproc_per_node "$NPROC" \
  --rdzv_backend c10d --rdzv_endpoint "$MASTER_ADDR:$MASTER_PORT" --rdzv_id "$RUN_ID" \
  -m train.main "$@" --trainer.devices "$NPROC" --trainer.num_nodes "$NNODES"
