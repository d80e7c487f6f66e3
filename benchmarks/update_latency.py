"""Weight-update latency: batches between `publish(new budgets)` and the first batch drawn under them.

Measured the way training consumes the stream: a torchdata StatefulDataLoader over
GripIterableDataset (num_workers 0/1/2, prefetch_factor 1/2). After `warmup` batches the loader
is left idle for `--settle` seconds (every worker's prefetch queue full: the worst case), then
the new budgets are published and batches are drawn until every worker has delivered a batch
whose `weights_version` is the new one. With workers the loader returns batches round-robin in
worker order, so batch j came from worker j mod num_workers.

Per worker we report `stale`: batches it delivered after the publication still entirely under
the old version, and `queued`: how many of them were already made or being made when the
publication happened (at most prefetch_factor per worker, a property of the DataLoader, not of
the sampler). `stale - queued` are batches *started* after the publication under old budgets;
the dataset reads the table before every block, so it must be 0.
"""

from __future__ import annotations

import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import numpy as np  # noqa: E402
from common import DATA, emit, median, parser  # noqa: E402
from corpus import build_corpus  # noqa: E402


def one_run(root: Path, *, workers: int, prefetch: int, batch: int, seq_len: int, warmup: int, settle: float):
    from torchdata.stateful_dataloader import StatefulDataLoader

    from grip_loop.collate import collate_blocks
    from grip_loop.dataset import GripIterableDataset
    from grip_loop.manifest import load_manifest

    sizes = np.array(load_manifest(root).sizes)
    ds = GripIterableDataset(root, sizes, seq_len=seq_len, seed=0)
    kw = {"batch_size": batch, "num_workers": workers, "collate_fn": collate_blocks}
    if workers:
        kw["prefetch_factor"] = prefetch
    loader = StatefulDataLoader(ds, **kw)
    it = iter(loader)
    j = 0
    for _ in range(warmup):
        next(it)
        j += 1
    time.sleep(settle)  # let every worker fill its prefetch queue
    new = sizes[::-1].copy()
    version = ds.publish(new)
    nw = max(workers, 1)
    stale = [0] * nw
    stale_blocks = [0] * nw
    done = [False] * nw
    mixed = [False] * nw
    while not all(done):
        b = next(it)
        w = j % nw
        j += 1
        if done[w]:
            continue
        v = b["weights_version"]
        if bool((v == version).any()):
            done[w] = True
            mixed[w] = not bool((v == version).all())
            stale_blocks[w] += int((v != version).sum())
        else:
            stale[w] += 1
            stale_blocks[w] += int(v.numel())
        if j > warmup + 100 * nw:
            raise RuntimeError("new budgets never reached a worker within 100 batches")
    del it, loader
    return stale, stale_blocks, mixed


def main(argv=None) -> int:
    p = parser(__doc__.split("\n")[0])
    p.add_argument("--workers", type=int, nargs="+", default=[0, 1, 2], help="DataLoader num_workers values")
    p.add_argument(
        "--prefetch", type=int, nargs="+", default=[1, 2], help="prefetch_factor values (workers > 0)"
    )
    p.add_argument("--batch", type=int, default=8, help="blocks per batch")
    p.add_argument("--seq-len", type=int, default=256, help="tokens per block")
    p.add_argument("--warmup", type=int, default=6, help="batches drawn before the publication")
    p.add_argument("--settle", type=float, default=0.5, help="idle seconds before publishing (queues fill)")
    p.add_argument("--data", type=Path, default=DATA / "latency", help="corpus directory (cached)")
    args = p.parse_args(argv)
    if args.quick:
        args.workers, args.prefetch, args.repeats, args.settle = [0, 1], [2], 1, 0.3
    root = build_corpus(args.data, 8, 200, min_len=20, max_len=400, shard_docs=100)
    rows = []
    for workers in args.workers:
        for pf in args.prefetch if workers else [None]:
            runs = [
                one_run(
                    root,
                    workers=workers,
                    prefetch=pf or 0,
                    batch=args.batch,
                    seq_len=args.seq_len,
                    warmup=args.warmup,
                    settle=args.settle,
                )
                for _ in range(args.repeats)
            ]
            queued = pf or 0
            stale = [max(r[0]) for r in runs]
            rows.append(
                {
                    "workers": workers,
                    "prefetch_factor": pf,
                    "stale_batches_per_worker_median": median(stale),
                    "stale_batches_per_worker_max": max(stale),
                    "queued_at_publish_per_worker": queued,
                    "started_after_publish_stale_max": max(s - queued for s in stale),
                    "stale_blocks_total_median": median([sum(r[1]) for r in runs]),
                    "mixed_first_batch": any(any(r[2]) for r in runs),
                    "per_worker_stale_each_run": [r[0] for r in runs],
                }
            )
    target_ok = all(r["stale_batches_per_worker_max"] <= 1 for r in rows if (r["prefetch_factor"] or 1) <= 1)
    emit(
        "update_latency",
        rows,
        args,
        columns=[
            "workers",
            "prefetch_factor",
            "stale_batches_per_worker_median",
            "stale_batches_per_worker_max",
            "queued_at_publish_per_worker",
            "started_after_publish_stale_max",
            "stale_blocks_total_median",
        ],
        batch=args.batch,
        seq_len=args.seq_len,
        target={"stale_batches_per_worker_le_1_at_prefetch_1": target_ok},
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
