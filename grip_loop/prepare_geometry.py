"""`grip prepare` stage 5, the orders of each cluster (Eq. 9 kNN density, Eq. 10 weights, the
Efraimidis-Spirakis draw), distributed over the torchrun ranks by cluster.

Rank 0 fixes each cluster's training documents (the probe's evaluation documents removed) and
writes them to `work/geometry/members.npy` with `plan.json` (the key of every input and each
cluster's bounds in the members array). Every rank then computes the orders of its clusters,
assigned by greedy balancing of their estimated cost (n_k^2 for the exact kNN, n_k x
`knn_approx_above` above it), and writes `work/geometry/cluster-KKKKK.npz` (one array per order)
and its record `cluster-KKKKK.json` (key, sha256, the approximate kNN's recall) last. A re-run
with the same inputs skips a cluster whose record and file check out. Rank 0 reads every
cluster's orders back from the files. A cluster's orders depend only on its members, their
embeddings and lengths, and seeds derived from (seed, cluster): not on the rank that computes
them, nor on the number of ranks.
"""

from __future__ import annotations

import hashlib
import json
import shutil
import sys
from pathlib import Path

import numpy as np

from grip_loop import distributed, workdir
from grip_loop.prepare_cluster import cluster_orders
from grip_loop.prepare_common import (
    _atomic_json,
    _atomic_npy,
    _atomic_npz,
    _file_sha256,
    _finished,
    _key,
    _seed,
)
from grip_loop.prepare_write import assign

PLAN = "plan.json"


def plan(work: Path, members: np.ndarray, bounds, key_parts: list, block: int = 1 << 20) -> None:
    """Rank 0: record each cluster's training documents, cluster k's being
    `members[bounds[k] : bounds[k + 1]]` (int64; a memmap is read a piece at a time), and
    remove the results of another plan."""
    gdir = work / "geometry"
    flat = members[: bounds[-1]]
    bounds = np.asarray(bounds, np.int64)
    sha = hashlib.sha256()
    for lo in range(0, len(flat), block):
        sha.update(np.ascontiguousarray(flat[lo : lo + block], np.int64).tobytes())
        workdir.trim_maps()
    sha.update(bounds.tobytes())
    key = _key("geometry", *key_parts, sha.hexdigest())
    old, _ = workdir.read_json(gdir / PLAN)
    if old is None or old.get("key") != key:
        shutil.rmtree(gdir, ignore_errors=True)
        gdir.mkdir(parents=True)
        _atomic_npy(gdir / "members.npy", flat)
        _atomic_json(gdir / PLAN, {"key": key, "bounds": bounds.tolist()})


def _cost(n: int, approx_above: int | None) -> int:
    return n * n if approx_above is None or n <= approx_above else n * approx_above


def _name(k: int) -> str:
    return f"cluster-{k:05d}"


def compute(cfg, work: Path, emb, lengths: np.ndarray, rank: int, world: int) -> int:
    """Every rank: the orders of its clusters (skipping those finished by an earlier run).
    Returns the clusters computed by every rank together. Raises on every rank when a cluster
    failed on any."""
    from tqdm import tqdm

    gdir = work / "geometry"
    p = json.loads((gdir / PLAN).read_text())
    bounds = p["bounds"]
    flat = np.load(gdir / "members.npy", mmap_mode="r")
    sizes = np.diff(bounds)
    mine = assign([_cost(int(n), cfg.knn_approx_above) for n in sizes], world)[rank]
    done, error, own = 0, None, None
    desc = "density+order" if world == 1 else f"density+order (rank 0's {len(mine)} of {len(sizes)} clusters)"
    for k in tqdm(mine, desc=desc, unit="cluster", disable=not cfg.progress or rank != 0, mininterval=5.0):
        try:
            done += _one(
                cfg, gdir, p["key"], k, np.asarray(flat[bounds[k] : bounds[k + 1]]), emb, lengths, rank
            )
        except Exception as exc:
            print(
                f"error: grip prepare: rank {rank}: the orders of {_name(k)} failed: {exc}", file=sys.stderr
            )
            error, own = (_name(k), f"{type(exc).__name__}: {exc}"), exc
            if world == 1:
                raise
            break
        workdir.trim_maps()  # the embeddings' rows gathered so far are not kept resident
    gathered = distributed.all_gather((error, done))
    if own is not None:
        raise own
    failed = [(r, e) for r, (e, _) in enumerate(gathered) if e is not None]
    if failed:
        r, (name, why) = failed[0]
        raise RuntimeError(
            f"geometry: the orders of {name} failed on rank {r} ({why}); re-run the same command: "
            "finished clusters are kept"
        )
    return sum(n for _, n in gathered)


def _one(cfg, gdir: Path, plan_key: str, k: int, m: np.ndarray, emb, lengths: np.ndarray, rank: int) -> int:
    rec_path, npz = gdir / f"{_name(k)}.json", gdir / f"{_name(k)}.npz"
    key = _key("geometry-cluster", plan_key, k)
    rec = _finished(rec_path, key, f"geometry ({_name(k)})")
    if rec is not None:
        try:
            if _file_sha256(npz) == rec.get("sha256"):
                return 0
        except OSError:
            pass
        print(f"note: {npz}: missing, or does not match the checksum recorded; recomputing {_name(k)}")
    rec_path.unlink(missing_ok=True)
    info: dict = {}
    orders = cluster_orders(
        workdir.take_rows(emb, m),
        workdir.take_rows(lengths, m),
        cfg.orders,
        beta=cfg.beta,
        knn_k=cfg.knn_k,
        seed=_seed(cfg.seed, k, 0),
        approx_above=cfg.knn_approx_above,
        target_recall=cfg.knn_target_recall,
        info=info,
    )
    _atomic_npz(npz, **{o: np.asarray(orders[o], np.int64) for o in cfg.orders})
    _atomic_json(rec_path, {"key": key, "sha256": _file_sha256(npz), "info": info, "rank": rank})
    return 1


def knn_infos(work: Path, n_clusters: int) -> list[dict | None]:
    """Rank 0, after `compute`: each cluster's approximate-kNN record (None for an exact
    search), from the files."""
    gdir = work / "geometry"
    knn_info = []
    for k in range(n_clusters):
        info = json.loads((gdir / f"{_name(k)}.json").read_text())["info"]
        knn_info.append({"cluster": k, **info} if info.get("approx") else None)
    return knn_info


def orders(cfg, work: Path, k: int, names=None) -> dict[str, np.ndarray]:
    """Rank 0, after `compute`: cluster k's orders (positions -> its members), from its file:
    read when needed, one cluster at a time; only those in `names` (default: every order)."""
    with np.load(work / "geometry" / f"{_name(k)}.npz") as z:
        return {o: z[o] for o in (cfg.orders if names is None else names)}
