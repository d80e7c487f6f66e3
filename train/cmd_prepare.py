"""`grip prepare`: turn a corpus into tokenizer, clusters, probe set, quality and ordered shards.

Runs as one process, or data-parallel in the embed stage under
`torchrun --nproc_per_node N -m train prepare ...` (same output either way). Re-running the
same command resumes: finished stages and embedding blocks are skipped (each is checked
first; a damaged one is redone). Only one run at a time may write an output folder: a second
`grip prepare` on the same --out fails at once and names the running one.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

DEFAULT_CONFIG = Path(__file__).resolve().parent.parent / "configs" / "prepare" / "default.yaml"


def main(argv: list[str]) -> int:
    p = argparse.ArgumentParser(prog="grip prepare", description=__doc__)
    p.add_argument(
        "--corpus", required=True, help="directory of source files / .jsonl[.gz] / .tar shards, or one file"
    )
    p.add_argument("--out", required=True, help="output directory (the prepared corpus)")
    p.add_argument(
        "--config", default=str(DEFAULT_CONFIG), help="YAML of PrepareConfig fields (default: %(default)s)"
    )
    p.add_argument("--k", type=int, default=None, help="number of clusters (overrides the config)")
    p.add_argument(
        "--cluster-by",
        default=None,
        metavar="FIELD",
        help="one cluster per distinct value of this document field (JSONL/shard string fields, "
        "`lang` for directories) instead of k-means; documents without it are skipped and counted",
    )
    p.add_argument(
        "--cluster-method",
        choices=["kmeans", "gem"],
        default=None,
        help="kmeans (spherical k-means) or gem (balanced vMF mixture, MM, distilled to a linear "
        "student; docs/design.md); overrides the config's cluster.method (default there: kmeans)",
    )
    p.add_argument("--seed", type=int, default=None, help="random seed (overrides the config)")
    p.add_argument(
        "--follow-symlinks-outside",
        action="store_true",
        default=None,
        help="follow symlinks that lead out of the corpus directory (default: skip and count them)",
    )
    p.add_argument("--orders", default=None, help="comma-separated orders to write: grip,diversity,random")
    p.add_argument("--restart", action="store_true", help="discard cached stages in OUT/work and start over")
    p.add_argument("--no-progress", action="store_true", help="no progress bars (logs, CI)")
    a = p.parse_args(argv)

    from grip_loop.prepare import load_config, prepare
    from grip_loop.workdir import DiskSpaceError, OutputLocked

    cfg = load_config(
        a.config,
        corpus=a.corpus,
        out=a.out,
        k=a.k,
        cluster_by=a.cluster_by,
        cluster={"method": a.cluster_method},
        seed=a.seed,
        follow_symlinks_outside=a.follow_symlinks_outside,
        orders=a.orders.split(",") if a.orders else None,
        progress=False if a.no_progress else None,
    )
    try:
        m = prepare(cfg, restart=a.restart)  # --restart empties OUT/work only once the lock is held
    except (OutputLocked, DiskSpaceError) as exc:
        print(f"grip prepare: error: {exc}", file=sys.stderr)
        return 1
    if m is not None:
        print(
            f"wrote {Path(a.out) / 'manifest.json'}: {m.n_docs} documents in {m.k} clusters, orders {m.orders}"
        )
        for stage, t in m.stats["timings"].items():
            print(f"  {stage:<9} {t['seconds']:9.2f} s  {t['docs_per_s'] or 0:>10.1f} docs/s")
    return 0
