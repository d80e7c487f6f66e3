"""Sampler memory: resident memory of one rank's GripIterableDataset vs documents N and clusters K.

Each (N, K) runs in a fresh subprocess (num_workers = 0, i.e. the rank's own process): build the
dataset, draw enough blocks to touch every shard of every cluster (so every shard index is
loaded), and report RSS after the imports, after iteration, the peak, and the growth per
document. The only per-document state by design is the shard index (16 bytes a document:
offset + size as int64); the schedule, cursors and budgets are O(K).
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import DATA, emit, parser, peak_rss_mb, rss_mb  # noqa: E402


def run_one(root: Path, blocks: int) -> dict:
    import numpy as np

    from grip_loop.dataset import GripIterableDataset

    ds = GripIterableDataset(root, None, seq_len=512, seed=0)
    it = iter(ds)
    next(it)
    base = rss_mb()
    for _ in range(blocks):
        next(it)
    index_bytes = sum(idx.nbytes for r in ds._readers for idx in r._index.values())
    shards_touched = sum(len(r._index) for r in ds._readers)
    return {
        "rss_before_mb": base,
        "rss_after_mb": rss_mb(),
        "peak_rss_mb": peak_rss_mb(),
        "index_bytes": int(index_bytes),
        "shards_touched": shards_touched,
        "shards_total": int(sum(len(c.shards["grip"]) for c in ds.manifest.clusters)),
        "docs": int(np.sum(ds.sizes)),
    }


def main(argv=None) -> int:
    p = parser(__doc__.split("\n")[0])
    p.add_argument("--one", nargs=2, metavar=("ROOT", "BLOCKS"), help="internal: measure one corpus")
    p.add_argument(
        "--docs", type=int, nargs="+", default=[10_000, 100_000, 200_000], help="total documents N"
    )
    p.add_argument("--clusters", type=int, nargs="+", default=[4, 64], help="cluster counts K")
    args = p.parse_args(argv)
    if args.one:
        print(json.dumps(run_one(Path(args.one[0]), int(args.one[1]))))
        return 0
    if args.quick:
        args.docs, args.clusters = [200, 1000], [4]
    from corpus import build_corpus

    rows = []
    for k in args.clusters:
        for n in args.docs:
            per = max(1, n // k)
            shard_docs = max(1, min(5000, per // 2))
            root = build_corpus(
                DATA / f"memory-{n}-{k}", k, per, min_len=4, max_len=12, shard_docs=shard_docs
            )
            # blocks so that every shard is read: ~ docs x 9 tokens / 512, plus slack
            blocks = n * 10 // 512 + 64
            out = subprocess.run(
                [sys.executable, __file__, "--one", str(root), str(blocks)], capture_output=True, text=True
            )
            if out.returncode != 0:
                raise RuntimeError(f"N={n} K={k} failed:\n{out.stderr[-3000:]}")
            r = json.loads(out.stdout.strip().splitlines()[-1])
            rows.append(
                {
                    "N": r["docs"],
                    "K": k,
                    "rss_before_mb": r["rss_before_mb"],
                    "rss_after_mb": r["rss_after_mb"],
                    "growth_mb": r["rss_after_mb"] - r["rss_before_mb"],
                    "growth_bytes_per_doc": (r["rss_after_mb"] - r["rss_before_mb"]) * 2**20 / r["docs"],
                    "index_bytes_per_doc": r["index_bytes"] / r["docs"],
                    "shards_touched": f"{r['shards_touched']}/{r['shards_total']}",
                    "peak_rss_mb": r["peak_rss_mb"],
                }
            )
            print(f"  N={n} K={k}: +{rows[-1]['growth_mb']:.1f} MiB", file=sys.stderr, flush=True)
    emit(
        "sampler_memory",
        rows,
        args,
        columns=[
            "N",
            "K",
            "rss_before_mb",
            "rss_after_mb",
            "growth_mb",
            "growth_bytes_per_doc",
            "index_bytes_per_doc",
            "shards_touched",
        ],
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
