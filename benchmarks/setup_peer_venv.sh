#!/usr/bin/env bash
# Build .venv-bench/: the peer samplers (torchdata.nodes, mosaicml-streaming, litdata) next to
# torch==2.13.0 CPU and this project. Kept out of CI and out of the main .venv because
# mosaicml-streaming pins numpy<2.2 and transformers 4.x, which the main environment does not
# accept. Usage: benchmarks/setup_peer_venv.sh [VENV_DIR]   (default .venv-bench)
set -euo pipefail
cd "$(dirname "$0")/.."
VENV="${1:-.venv-bench}"
python3 -m venv "$VENV"
. "$VENV/bin/activate"
pip install -q --upgrade pip
# torch first, from the CPU wheel; the constraint keeps every later install from moving it
# (unconstrained, mosaicml-streaming and litdata would pull torch 2.14 + CUDA via torchvision).
pip install -q torch==2.13.0
CONSTRAINTS="$(mktemp)"
echo "torch==2.13.0" > "$CONSTRAINTS"
pip install -q -c "$CONSTRAINTS" webdataset torchdata mosaicml-streaming litdata psutil
# Under the constraint pip resolves torchvision 0.28.0, the only build for torch 2.13 on PyPI, and
# it is a CUDA build: importing it next to torch 2.13.0+cpu fails with
#   RuntimeError: operator torchvision::nms does not exist
# mosaicml-streaming imports it only from `streaming.vision` (image datasets, unused here), so it
# is removed; benchmarks/sampler_throughput.py stubs `streaming.vision` before `import streaming`.
pip uninstall -y -q torchvision
# The project without its heavy deps (lightning, transformers 5, wandb): the benchmarks only
# import grip_loop.dataset / manifest / shards / schedule, which need numpy + torch.
pip install -q -c "$CONSTRAINTS" -e . --no-deps
pip install -q -c "$CONSTRAINTS" pyyaml tqdm
python - <<'PY'
import importlib
import sys, types
sys.modules.setdefault("streaming.vision", types.ModuleType("streaming.vision"))
for m in ("torch", "numpy", "webdataset", "torchdata", "streaming", "litdata", "grip_loop.dataset"):
    mod = importlib.import_module(m)
    print(f"{m:20s} {getattr(mod, '__version__', 'ok')}")
PY
rm -f "$CONSTRAINTS"
