"""Sampler throughput: GripIterableDataset vs raw webdataset and weighted-mixing peers.

Every tool delivers the same thing to the same consumer: blocks of `seq_len` token ids packed
from documents (document + EOS, cut into blocks, the remainder carried over), batched by a
torch DataLoader (`batch_size`, `num_workers` 0/1/2). Tokens/s = blocks x seq_len per second;
docs/s = EOS tokens delivered per second (EOS never occurs inside a synthetic document).

* `grip`: GripIterableDataset on the per-cluster shards, budgets proportional to the weights
  (it packs itself and also emits the cluster spans, majority cluster and weights version per block),
  batched with `collate_blocks` as the training loader does.
* `webdataset`: plain `wds.WebDataset` over every shard in order, no weights: the raw-read limit.
* `torchdata.nodes`: MultiNodeWeightedSampler over one webdataset reader per cluster.
* `streaming`: mosaicml StreamingDataset, one MDS Stream per cluster with `proportion` = weight.
* `litdata`: CombinedStreamingDataset of one optimized StreamingDataset per cluster with weights.

Peers other than webdataset / torchdata.nodes live in `.venv-bench` (benchmarks/setup_peer_venv.sh);
a tool whose package is missing is skipped and listed under `skipped` in the JSON.
"""

from __future__ import annotations

import functools
import sys
import time
import types
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import numpy as np  # noqa: E402
import torch  # noqa: E402
from common import DATA, emit, median, parser  # noqa: E402
from corpus import EOS, build_corpus, cluster_shards  # noqa: E402
from torch.utils.data import DataLoader, IterableDataset  # noqa: E402

# streaming/__init__ imports streaming.vision -> torchvision, which cannot be installed next to
# torch 2.13.0+cpu (see setup_peer_venv.sh); the vision datasets are not used here. Done at import
# so that spawned worker processes (which re-import this module) get the stub too.
sys.modules.setdefault("streaming.vision", types.ModuleType("streaming.vision"))

TOOLS = ("grip", "webdataset", "torchdata.nodes", "streaming", "litdata")
# Not in the default run, for attributions: GRIP batched by torch's default_collate (after
# `collate_blocks` pads the spans: one shared-memory storage per field instead of one per batch:
# what packing buys), and GRIP
# reduced to `input_ids` in the worker (what shipping the cluster attribution costs), and GRIP with
# every batch sent through shared memory, as before `PipedBatch` (what the pipe buys).
VARIANTS = ("grip-default-collate", "grip-ids-only", "grip-shm")


class IdsOnly(IterableDataset):
    """GRIP blocks with every field but `input_ids` dropped (in the worker, before batching)."""

    def __init__(self, dataset) -> None:
        self.dataset = dataset

    def __iter__(self):
        for block in self.dataset:
            yield {"input_ids": block["input_ids"]}


def cluster_weights(k: int) -> np.ndarray:
    """Deliberately uneven mixture: w_k proportional to k + 1."""
    w = np.arange(1, k + 1, dtype=np.float64)
    return w / w.sum()


class Packer(IterableDataset):
    """Packs the documents of `source()` (called in the worker) into seq_len blocks, like GRIP."""

    def __init__(self, source, seq_len: int) -> None:
        self.source, self.seq_len = source, seq_len

    def __iter__(self):
        need = self.seq_len
        pieces, have = [], 0
        for toks in self.source():
            doc = np.empty(len(toks) + 1, dtype=np.int64)
            doc[:-1] = toks
            doc[-1] = EOS
            pieces.append(doc)
            have += len(doc)
            while have >= need:
                flat = np.concatenate(pieces)
                yield {"input_ids": torch.from_numpy(flat[:need].copy())}
                rest = flat[need:]
                pieces, have = ([rest] if len(rest) else []), len(rest)


def _forever(make):
    while True:
        yield from make()


# ---------------------------------------------------------------- sources (run in the worker)
def _wds_docs(urls):
    import webdataset as wds

    # Split shards over DataLoader workers ourselves: with fewer shards than workers every
    # worker reads them all (webdataset's split_by_worker would leave a worker empty forever).
    info = torch.utils.data.get_worker_info()
    if info is not None and len(urls) >= info.num_workers:
        urls = urls[info.id :: info.num_workers]
    ds = wds.WebDataset(urls, shardshuffle=False, empty_check=False, workersplitter=None)
    for sample in ds:
        yield np.frombuffer(sample["ids"], dtype="<u2")


class WdsSource:
    def __init__(self, urls):
        self.urls = urls

    def __call__(self):
        return _forever(lambda: _wds_docs(self.urls))


class NodesSource:
    def __init__(self, per_cluster, weights):
        self.per_cluster, self.weights = per_cluster, weights

    def __call__(self):
        import torchdata.nodes as tn

        info = torch.utils.data.get_worker_info()
        seed = 0 if info is None else info.id
        nodes = {
            str(k): tn.IterableWrapper(_forever(lambda u=urls: _wds_docs(u)))
            for k, urls in enumerate(self.per_cluster)
        }
        weights = {str(k): float(w) for k, w in enumerate(self.weights)}
        sampler = tn.MultiNodeWeightedSampler(nodes, weights, stop_criteria="CYCLE_FOREVER", seed=seed)
        return iter(tn.Loader(sampler))


class EpochSource:
    """Re-iterates a (streaming / litdata) dataset forever, yielding its token arrays."""

    def __init__(self, dataset):
        self.dataset = dataset

    def __call__(self):
        def docs():
            for item in self.dataset:
                yield item["ids"]

        return _forever(docs)


def import_streaming():
    import streaming

    return streaming


# ---------------------------------------------------------------- datasets per tool
def make_dataset(tool: str, root: Path, weights: np.ndarray, seq_len: int, batch: int, seed: int):
    per_cluster = cluster_shards(root)
    if tool in ("grip", *VARIANTS):
        from grip_loop.dataset import GripIterableDataset
        from grip_loop.manifest import load_manifest

        n_docs = np.array(load_manifest(root).sizes)
        budgets = np.maximum(1, np.round(weights * n_docs.sum())).astype(np.int64)
        # as training builds its loader (train/data.py): one shared-memory buffer per batch
        ds = GripIterableDataset(root, budgets, seq_len=seq_len, seed=seed)
        if tool == "grip-ids-only":
            return IdsOnly(ds), {"fields": "input_ids"}
        collate = {
            "grip": "collate_blocks",
            "grip-shm": "collate_blocks(pipe_bytes=0)",
            "grip-default-collate": "collate_blocks(pack=False)",
        }[tool]
        return ds, {"collate_fn": collate}
    if tool == "webdataset":
        urls = [u for urls in per_cluster for u in urls]
        return Packer(WdsSource(urls), seq_len), {"shardshuffle": False}
    if tool == "torchdata.nodes":
        return Packer(NodesSource(per_cluster, weights), seq_len), {"stop_criteria": "CYCLE_FOREVER"}
    if tool == "streaming":
        streaming = import_streaming()
        from corpus import to_mds
        from streaming.base.util import clean_stale_shared_memory

        clean_stale_shared_memory()
        dirs = to_mds(root, root.parent / (root.name + "-mds"))
        streams = [
            streaming.Stream(local=str(d), proportion=float(w)) for d, w in zip(dirs, weights, strict=True)
        ]
        from grip_loop.manifest import load_manifest

        total = int(sum(load_manifest(root).sizes))
        # A long epoch (50 x the corpus, streaming up-samples): re-iterating a StreamingDataset
        # inside a worker at an epoch end waits on a barrier of all workers -> deadlock.
        settings = {"shuffle": True, "shuffle_algo": "py1e", "epoch_size": 50 * total, "batch_size": batch}
        ds = streaming.StreamingDataset(streams=streams, **settings)
        return Packer(EpochSource(ds), seq_len), settings
    if tool == "litdata":
        import litdata
        from corpus import to_litdata

        dirs = to_litdata(root, root.parent / (root.name + "-litdata"))
        parts = [litdata.StreamingDataset(str(d)) for d in dirs]
        settings = {"iterate_over_all": False, "weights": "w_k", "shuffle": False}
        ds = litdata.CombinedStreamingDataset(
            parts, weights=list(map(float, weights)), iterate_over_all=False
        )
        return Packer(EpochSource(ds), seq_len), settings
    raise ValueError(f"tool: unknown {tool!r} (choose from {TOOLS + VARIANTS})")


def available(tool: str) -> str | None:
    """None when the tool can run in this interpreter, else the import error."""
    if tool not in TOOLS + VARIANTS:
        return f"unknown tool (choose from {', '.join(TOOLS + VARIANTS)})"
    mod = {"webdataset": "webdataset", "torchdata.nodes": "torchdata.nodes", "litdata": "litdata"}.get(tool)
    try:
        if tool == "streaming":
            import_streaming()
        elif mod:
            __import__(mod)
    except Exception as exc:  # noqa: BLE001 - any import failure means "skip this peer"
        return f"{type(exc).__name__}: {exc}"
    return None


def measure(tool, root, weights, *, seq_len, batch, workers, warmup, seconds, seed=0) -> dict:
    ds, settings = make_dataset(tool, root, weights, seq_len, batch, seed)
    kw = {"num_workers": workers, "batch_size": batch}
    if settings.get("collate_fn", "").startswith("collate_blocks"):
        from grip_loop.collate import collate_blocks

        pack = False if settings["collate_fn"].endswith("(pack=False)") else None
        pipe = 0 if settings["collate_fn"].endswith("(pipe_bytes=0)") else None
        kw["collate_fn"] = functools.partial(collate_blocks, pack=pack, pipe_bytes=pipe)
    if workers:
        # fork for everyone (Linux default; litdata may switch the global default to spawn)
        kw.update(prefetch_factor=4, multiprocessing_context="fork")
    loader = DataLoader(ds, **kw)
    it = iter(loader)
    t_start = time.perf_counter()
    for _ in range(warmup):
        next(it)
    startup = time.perf_counter() - t_start
    tokens = docs = blocks = 0
    t0 = time.perf_counter()
    while True:
        b = next(it)["input_ids"]
        tokens += b.numel()
        docs += int((b == EOS).sum())
        blocks += b.shape[0]
        dt = time.perf_counter() - t0
        if dt >= seconds:
            break
    del it, loader
    return {
        "tokens_per_s": tokens / dt,
        "docs_per_s": docs / dt,
        "blocks": blocks,
        "startup_s": startup,
        "settings": {**{k: v for k, v in kw.items() if k != "collate_fn"}, **settings},
    }


def main(argv=None) -> int:
    p = parser(__doc__.split("\n")[0])
    p.add_argument(
        "--tools", nargs="+", default=list(TOOLS), help=f"tools to run ({', '.join(TOOLS + VARIANTS)})"
    )
    p.add_argument("--workers", type=int, nargs="+", default=[0, 1, 2], help="DataLoader num_workers values")
    p.add_argument("--clusters", type=int, default=16, help="clusters K of the synthetic corpus")
    p.add_argument("--docs", type=int, default=1000, help="documents per cluster")
    p.add_argument("--min-len", type=int, default=200, help="shortest document (tokens)")
    p.add_argument("--max-len", type=int, default=2000, help="longest document (tokens)")
    p.add_argument("--seq-len", type=int, default=2048, help="tokens per packed block")
    p.add_argument("--batch", type=int, default=8, help="blocks per batch")
    p.add_argument("--seconds", type=float, default=4.0, help="timed window per repeat")
    p.add_argument("--warmup", type=int, default=10, help="untimed batches first (worker start, indexes)")
    p.add_argument("--data", type=Path, default=DATA / "throughput", help="corpus directory (cached)")
    args = p.parse_args(argv)
    if args.quick:
        args.clusters, args.docs, args.min_len, args.max_len = 4, 40, 50, 400
        args.seq_len, args.seconds, args.warmup, args.repeats = 256, 0.3, 1, 1
        args.workers = [0]
        args.data = args.data.with_name(args.data.name + "-quick")

    root = build_corpus(args.data, args.clusters, args.docs, min_len=args.min_len, max_len=args.max_len)
    weights = cluster_weights(args.clusters)
    skipped = {t: err for t in args.tools if (err := available(t)) is not None}
    tools = [t for t in args.tools if t not in skipped]
    rows = []
    for workers in args.workers:
        runs = {t: [] for t in tools}
        # interleave tools inside each repeat so drift on the shared machine hits all alike
        for _ in range(args.repeats):
            for t in tools:
                runs[t].append(
                    measure(
                        t,
                        root,
                        weights,
                        seq_len=args.seq_len,
                        batch=args.batch,
                        workers=workers,
                        warmup=args.warmup,
                        seconds=args.seconds,
                    )
                )
        med = {t: median([r["tokens_per_s"] for r in runs[t]]) for t in tools}
        for t in tools:
            rows.append(
                {
                    "tool": t,
                    "workers": workers,
                    "tokens_per_s": med[t],
                    "docs_per_s": median([r["docs_per_s"] for r in runs[t]]),
                    "grip_over_tool": med["grip"] / med[t] if "grip" in med else float("nan"),
                    "tool_over_webdataset": med[t] / med["webdataset"]
                    if "webdataset" in med
                    else float("nan"),
                    "startup_s": median([r["startup_s"] for r in runs[t]]),
                    "settings": runs[t][0]["settings"],
                }
            )
    best = {}
    for t in tools:
        r = max((r for r in rows if r["tool"] == t), key=lambda r: r["tokens_per_s"])
        best[t] = {"tokens_per_s": r["tokens_per_s"], "docs_per_s": r["docs_per_s"], "workers": r["workers"]}
    targets = {}
    if "grip" in best and "webdataset" in best:
        targets["grip_over_webdataset_best"] = (
            best["grip"]["tokens_per_s"] / best["webdataset"]["tokens_per_s"]
        )
    for t in ("torchdata.nodes", "streaming", "litdata"):
        if "grip" in best and t in best:
            targets[f"grip_over_{t}_best"] = best["grip"]["tokens_per_s"] / best[t]["tokens_per_s"]
    emit(
        "sampler_throughput",
        rows,
        args,
        columns=["tool", "workers", "tokens_per_s", "docs_per_s", "grip_over_tool", "tool_over_webdataset"],
        corpus={
            "clusters": args.clusters,
            "docs_per_cluster": args.docs,
            "doc_tokens": [args.min_len, args.max_len],
            "seq_len": args.seq_len,
            "batch": args.batch,
            "weights": weights.tolist(),
        },
        best=best,
        targets=targets,
        skipped=skipped,
    )
    print()
    print(
        "best per tool: "
        + ", ".join(f"{t} {b['tokens_per_s']:,.0f} tok/s (w={b['workers']})" for t, b in best.items())
    )
    print("ratios (best vs best): " + ", ".join(f"{k} {v:.2f}" for k, v in targets.items()))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
