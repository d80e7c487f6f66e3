"""Sampler memory: resident memory of one rank's GripIterableDataset vs documents N and clusters K.

Each (N, K) runs in a fresh subprocess (num_workers = 0, i.e. the rank's own process): build the
dataset, draw enough blocks to touch every shard of every cluster (so every shard index is
loaded), and report RSS after the imports, after iteration, the peak, and the growth per
document. The only per-document state by design is the shard index (16 bytes a document:
offset + size as int64); the schedule, cursors and budgets are O(K).

`--workers W` (W >= 1) measures DataLoader workers instead: the parent reads each worker's
`/proc/PID/smaps_rollup` after the first blocks and after every shard was read, and reports
per worker the growth of its *anonymous* (private) memory and of its file-backed resident pages
(page cache mapped into it, shared by every worker and reclaimable), per document. Each corpus
runs twice side by side: `index` (the memory-mapped `<shard>.idx.npy` files `grip prepare`
writes) and `scan` (the same shards with the index files ignored: headers scanned into the
worker's memory, as before they existed).
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


def _smaps(pid: int) -> dict:
    out = {}
    with open(f"/proc/{pid}/smaps_rollup") as fh:
        for line in fh:
            parts = line.split()
            if len(parts) == 3 and parts[2] == "kB":
                out[parts[0].rstrip(":")] = int(parts[1]) * 1024
    out["File"] = out.get("Rss", 0) - out.get("Anonymous", 0)
    return out


def run_workers(root: Path, blocks: int, workers: int, scan: bool) -> dict:
    import numpy as np
    from torch.utils.data import DataLoader

    import grip_loop.shards as gs
    from grip_loop.dataset import GripIterableDataset

    if scan:  # as before the index files: every worker scans the tar headers into its memory
        gs.load_index = lambda path, n: None
    ds = GripIterableDataset(root, None, seq_len=512, seed=0)
    loader = DataLoader(ds, batch_size=None, num_workers=workers, prefetch_factor=1, persistent_workers=True)
    it = iter(loader)
    for _ in range(2 * workers):
        next(it)
    pids = [w.pid for w in it._workers]
    before = [_smaps(p) for p in pids]
    for _ in range(blocks):
        next(it)
    after = [_smaps(p) for p in pids]
    docs = int(np.sum(ds.sizes))
    return {
        "docs": docs,
        "anon_growth_per_worker": [
            a["Anonymous"] - b["Anonymous"] for a, b in zip(after, before, strict=True)
        ],
        "file_growth_per_worker": [a["File"] - b["File"] for a, b in zip(after, before, strict=True)],
        "anon_after_mb": [a["Anonymous"] / 2**20 for a in after],
    }


def corpora(args):
    """(K, N, corpus root, blocks to draw) for every K x N of the run: the same synthetic corpora
    (documents of 4-12 tokens) and enough blocks of 512 tokens to read every shard."""
    from corpus import build_corpus

    if args.quick:
        args.docs, args.clusters = [200, 1000], [4]
    for k in args.clusters:
        for n in args.docs:
            per = max(1, n // k)
            root = build_corpus(
                DATA / f"memory-{n}-{k}",
                k,
                per,
                min_len=4,
                max_len=12,
                shard_docs=max(1, min(5000, per // 2)),
            )
            yield k, n, root, n * 10 // 512 + 64  # blocks: ~ docs x 9 tokens / 512, plus slack


def measure(root: Path, blocks: int, *flags: str) -> dict:
    """Run `--one ROOT BLOCKS [flags]` in a fresh interpreter; its JSON line."""
    cmd = [sys.executable, __file__, "--one", str(root), str(blocks), *flags]
    out = subprocess.run(cmd, capture_output=True, text=True)
    if out.returncode != 0:
        raise RuntimeError(f"{root.name} {' '.join(flags)} failed:\n{out.stderr[-3000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def main(argv=None) -> int:
    p = parser(__doc__.split("\n")[0])
    p.add_argument("--one", nargs=2, metavar=("ROOT", "BLOCKS"), help="internal: measure one corpus")
    p.add_argument(
        "--docs", type=int, nargs="+", default=[10_000, 100_000, 200_000], help="total documents N"
    )
    p.add_argument("--clusters", type=int, nargs="+", default=[4, 64], help="cluster counts K")
    p.add_argument("--workers", type=int, default=0, help="measure W DataLoader workers (see above)")
    p.add_argument("--scan", action="store_true", help="internal: ignore the index files")
    args = p.parse_args(argv)
    if args.one:
        root, blocks = Path(args.one[0]), int(args.one[1])
        if args.workers:
            print(json.dumps(run_workers(root, blocks, args.workers, args.scan)))
        else:
            print(json.dumps(run_one(root, blocks)))
        return 0
    if args.workers:
        return _main_workers(args)
    rows = []
    for k, n, root, blocks in corpora(args):
        r = measure(root, blocks)
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


def _main_workers(args) -> int:
    rows = []
    for k, n, root, blocks in corpora(args):
        for mode in ("index", "scan"):
            r = measure(root, blocks, "--workers", str(args.workers), *(["--scan"] if mode == "scan" else []))
            rows.append(
                {
                    "N": r["docs"],
                    "K": k,
                    "workers": args.workers,
                    "index": mode,
                    "anon_bytes_per_doc_per_worker": max(r["anon_growth_per_worker"]) / r["docs"],
                    "file_bytes_per_doc_per_worker": max(r["file_growth_per_worker"]) / r["docs"],
                    "anon_after_mb": max(r["anon_after_mb"]),
                }
            )
            print(f"  N={n} K={k} {mode}: {rows[-1]}", file=sys.stderr, flush=True)
    emit(
        "sampler_memory_workers",
        rows,
        args,
        columns=[
            "N",
            "K",
            "workers",
            "index",
            "anon_bytes_per_doc_per_worker",
            "file_bytes_per_doc_per_worker",
            "anon_after_mb",
        ],
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
