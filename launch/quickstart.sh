#!/usr/bin/env bash
# The main job, end to end on a fresh machine, CPU only:
#   install -> default code corpus (installed sources) -> grip prepare -> GRIP training of the
#   tiny MoE with Rapid Adaptation Probe refreshes -> held-out evaluation (per-language loss,
#   HumanEval loss, pass@1 on a few problems) -> summary of where everything is.
# Usage: ./launch/quickstart.sh            (from anywhere; runs in the repository root)
# Re-running resumes: prepare skips finished stages; delete runs/quickstart to start over.
set -euo pipefail
cd "$(dirname "$0")/.."
OUT=runs/quickstart
if [ -z "${VIRTUAL_ENV:-}" ]; then
  [ -d .venv ] || python3 -m venv .venv
  . .venv/bin/activate
fi
echo "== install"
# SKIP_INSTALL=1 reuses an environment that already has the package (e.g. a second run)
[ -n "${SKIP_INSTALL:-}" ] || { pip install -q torch==2.13.0 && pip install -q -e .; }
export WANDB_MODE=${WANDB_MODE:-offline} HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false
start=$(date +%s)
echo "== corpus: installed Python/C/C++ sources -> $OUT/corpus"
[ -d "$OUT/corpus" ] || grip corpus --out "$OUT/corpus" --max-files "${MAX_FILES:-2000}"
echo "== prepare: tokenize, embed, cluster, probe, quality, ordered shards -> $OUT/data"
grip prepare --corpus "$OUT/corpus" --out "$OUT/data" --config configs/prepare/quickstart.yaml
grip inspect "$OUT/data" --png "$OUT/length_pathology.png" | head -30
echo "== train: tiny MoE, GRIP sampler, RAP at steps 100, 150, 200"
rm -rf "$OUT/csv" "$OUT/checkpoints" "$OUT/wandb"
grip train --config configs/train/cpu-tiny-grip.yaml
echo "== eval: held-out loss per language, HumanEval loss, pass@1 on ${PASS_LIMIT:-10} problems"
rm -rf "$OUT/eval"
grip eval --ckpt "$OUT/checkpoints/last.ckpt" --data "$OUT/data" --out "$OUT/eval" \
  --pass-at-1 --limit "${PASS_LIMIT:-10}" --max-new-tokens 64 --max-tokens-per-lang 40000
echo "== summary ($(( $(date +%s) - start )) s after install)"
python - "$OUT" <<'PY'
import json, sys
from pathlib import Path
out = Path(sys.argv[1])
hist = [json.loads(l) for l in (out / "csv" / "grip_history.jsonl").read_text().splitlines()]
names = [c.get("name") or f"cluster {c['id']}" for c in json.loads((out / "data" / "manifest.json").read_text())["clusters"]]
first, last = hist[0], hist[-1]
b = sum(first["n"])
probes = [h for h in hist if "delta" in h]
print(f"budget refreshes: {len(hist) - 1} (RAP probes at steps {[h['step'] for h in probes]}), B = {b} documents")
print("probe reliability per refresh (split-half Spearman; Eq. 7 is shrunk below 0.5):",
      " ".join("n/a" if h.get("reliability") is None else f"{h['reliability']:.2f}" for h in probes))
w = max(len(n) for n in names)
print(f"{'cluster':<{w}}  share@start  share@end   r_k   Delta L_k")
for k, (a, z) in enumerate(zip(first["n"], last["n"])):
    d = last.get("delta", [float('nan')] * len(last["n"]))[k]
    print(f"{names[k]:<{w}}  {a / b:11.3f}  {z / b:9.3f}  {last['r'][k]:5.2f}  {d:9.4f}")
runs = sorted((out / "wandb").glob("offline-run-*"))
print("W&B offline run:   ", runs[-1] if runs else "(none)", "(sync later with `wandb sync`)")
print("budget drift PNG:  ", out / "csv" / "grip_budget_share.png")
print("budget history:    ", out / "csv" / "grip_history.jsonl")
print("probe tables (CSV):", out / "csv" / "grip_probe.csv")
print("metrics (CSV):     ", out / "csv" / "metrics.csv")
print("checkpoint:        ", out / "checkpoints" / "last.ckpt")
print("length pathology:  ", out / "length_pathology.png")
print("evaluation:        ", out / "eval" / "eval.json", "(table: eval.md, HF model: eval/hf)")
print()
print((out / "eval" / "eval.md").read_text(), end="")
PY
