"""`grip prepare` stages 4-5: the held-out slice, clusters (k-means, GEM or one per field
value), sigma_k (Eq. 3), the probe's size (Eq. 4) and each cluster's orders (Eq. 9-10)."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
from dataclasses import asdict
from pathlib import Path

import numpy as np

from grip_loop import blockwise, distributed, workdir
from grip_loop.budget import apportion
from grip_loop.prepare_common import (
    _atomic_json,
    _atomic_npy,
    _atomic_npz,
    _cached,
    _file_sha256,
    _finished,
    _key,
    _note,
    _seed,
)
from grip_loop.prepare_config import PrepareConfig
from grip_loop.selection import kernel_density, knn, selection_order, selection_weights

FAISS_MIN_POINTS_PER_CENTROID = 39


def small_corpus_notes(cfg: PrepareConfig, n_docs: int) -> list[str]:
    """One line per setting too large for a corpus of `n_docs` documents, with the fix: K
    clusters need ~39 documents each (faiss's minimum; below it clusters of one document with
    sigma 0 appear). Printed before the expensive stages."""
    notes = []
    per = FAISS_MIN_POINTS_PER_CENTROID
    if not cfg.cluster_by and n_docs < cfg.k * per:
        fit = max(1, n_docs // per)
        notes.append(
            f"warning: k={cfg.k} clusters for {n_docs} documents is ~{n_docs / cfg.k:.1f} per cluster "
            f"(k-means needs ~{per}; smaller ones are often single documents with sigma 0): "
            f"re-run with --k {fit} (or a --config with a smaller k, e.g. configs/prepare/quickstart.yaml)"
        )
    return notes


class _without_faiss_size_warning:
    """Drops faiss's "please provide at least N training points" line from the C++ stderr of the
    block (small_corpus_notes said it first, with the fix); every other line passes through."""

    def __enter__(self):
        import sys
        import tempfile

        sys.stderr.flush()
        self._saved = os.dup(2)  # faiss writes to the C stderr, fd 2, whatever sys.stderr is
        self._tmp = tempfile.TemporaryFile()
        os.dup2(self._tmp.fileno(), 2)
        return self

    def __exit__(self, *exc):
        import sys

        sys.stderr.flush()
        os.dup2(self._saved, 2)
        os.close(self._saved)
        self._tmp.seek(0)
        lines = self._tmp.read().splitlines(keepends=True)
        self._tmp.close()
        kept = b"".join(ln for ln in lines if b"please provide at least" not in ln)
        if kept:
            os.write(2, kept)
        return False


def heldout_split(langs: list[str], fraction: float, seed: int) -> np.ndarray:
    """Sorted indices of the held-out documents: round(fraction * n_lang) of each language,
    a seeded uniform draw inside the language; a language always keeps >= 1 training document."""
    values = sorted(set(langs))
    lookup = {v: i for i, v in enumerate(values)}
    return heldout_split_codes(np.array([lookup[v] for v in langs], np.int64), values, fraction, seed)


def heldout_split_codes(
    codes, values: list[str], fraction: float, seed: int, *, block: int = blockwise.BLOCK
):
    """`heldout_split` of documents given as codes: document i's language is values[codes[i]]
    (several codes may name one language). `codes` (a memory map, say) is read in blocks, twice
    in all, whatever the number of languages: what this holds is the held-out indices."""
    counts = blockwise.bincount(codes, len(values))
    langs = sorted({values[c] for c in np.flatnonzero(counts)})
    lang_of = {v: j for j, v in enumerate(langs)}
    code_lang = np.array([lang_of.get(v, -1) for v in values], np.int64)  # code -> language (-1: absent)
    n_lang = np.bincount(code_lang[counts > 0], weights=counts[counts > 0], minlength=len(langs)).astype(
        np.int64
    )
    # the drawn positions of each language among its rows, as one sorted array of keys
    # start[j] + position: the rows' positions in the order (language, row)
    start = np.concatenate([[0], np.cumsum(n_lang)])
    keys = []
    for j, lang in enumerate(langs):
        n = min(int(np.floor(fraction * n_lang[j] + 0.5)), int(n_lang[j]) - 1)
        if n > 0:
            rng = np.random.default_rng(
                _seed(seed, 7, int.from_bytes(lang.encode()[:8].ljust(8, b"\0"), "little"))
            )
            # rng.choice(rows, n) is rows[rng.choice(len(rows), n)]: the same draw, without `rows`
            keys.append(start[j] + np.sort(rng.choice(int(n_lang[j]), size=n, replace=False)))
    if not keys:
        return np.zeros(0, np.int64)
    keys = np.concatenate(keys)  # ascending: languages in order, positions sorted inside each
    seen, out = np.zeros(len(langs), np.int64), []
    for lo in range(0, len(codes), block):
        lab = code_lang[np.asarray(codes[lo : lo + block], np.int64)]
        o = np.argsort(lab, kind="stable")  # the block's rows by language, in row order inside one
        sl = lab[o]
        rank = np.arange(len(sl)) - np.searchsorted(sl, sl, side="left")  # position inside its language
        key = start[sl] + seen[sl] + rank
        hit = np.searchsorted(keys, key)
        hit = (hit < len(keys)) & (keys[np.minimum(hit, len(keys) - 1)] == key)
        out.append(lo + o[hit])
        seen += np.bincount(lab, minlength=len(langs))
        workdir.trim_maps()
    return np.sort(np.concatenate(out)).astype(np.int64)


def nth_training_rows(held: np.ndarray, nth: np.ndarray) -> np.ndarray:
    """The rows at positions `nth` among the rows not in `held` (sorted): what
    `np.flatnonzero(train)[nth]` gives, without the (N,) array of training rows."""
    nth = np.asarray(nth, np.int64)
    return nth + np.searchsorted(np.asarray(held, np.int64) - np.arange(len(held)), nth, side="right")


def clusters_from_field(
    codes, values: list[str], emb: np.ndarray, train: np.ndarray, *, out=None, block: int = 65536
):
    """`--cluster-by`: (centroids, labels, names). Document i's value is values[codes[i]]. One
    cluster per distinct value, in sorted order; a centroid is the L2-normalised mean embedding
    of its training documents (held-out documents keep their own value's label). `emb` and
    `codes` may be memmaps: they are read in blocks; `out`: the (N,) int64 labels to fill."""
    present = np.flatnonzero(blockwise.bincount(codes, len(values)))
    names = sorted({values[c] for c in present})
    lookup = {v: i for i, v in enumerate(names)}
    to_label = np.array([lookup.get(v, -1) for v in values], np.int64)
    labels = blockwise.fill(
        np.empty(len(codes), np.int64) if out is None else out,
        lambda lo, hi: to_label[np.asarray(codes[lo:hi])],
    )
    centroids = np.zeros((len(names), emb.shape[1]), np.float32)
    for lo in range(0, len(labels), block):
        t = np.asarray(train[lo : lo + block], bool)
        np.add.at(centroids, labels[lo : lo + block][t], np.asarray(emb[lo : lo + block], np.float32)[t])
        workdir.trim_maps()
    norm = np.linalg.norm(centroids, axis=1, keepdims=True)
    centroids = np.where(norm > 0, centroids / np.maximum(norm, 1e-12), 0.0).astype(np.float32)
    return centroids, labels, names


def sigma_streamed(
    emb, labels: np.ndarray, train: np.ndarray, centroids: np.ndarray, block: int = 65536, rows: int = 8192
):
    """Eq. 3 over the training documents (`budget.geometric_consistency`), reading a
    (memory-mapped) embedding matrix in blocks: the sums are taken a `block` of rows at a time,
    the distances computed `rows` at a time (what is held: a few (rows, dim) float32 arrays)."""
    k = len(centroids)
    mu = np.asarray(centroids, np.float32)
    sums, counts = np.zeros(k), np.zeros(k, np.int64)
    for lo in range(0, len(labels), block):
        hi = min(lo + block, len(labels))
        t = np.asarray(train[lo:hi], bool)
        lab = np.asarray(labels[lo:hi])[t]
        d2, off = [], 0  # each row's squared distance to its centroid (row by row: the same sums)
        for a in range(lo, hi, rows):
            b = min(a + rows, hi)
            e = np.asarray(emb[a:b], np.float32)[t[a - lo : b - lo]]
            if len(e) and np.max(np.abs(np.linalg.norm(e, axis=1) - 1.0)) > 1e-3:
                raise ValueError("emb: rows must be L2-normalised (divide each row by its norm)")
            la, off = lab[off : off + len(e)], off + len(e)
            d2.append(np.sum((e - mu[la]) ** 2, axis=1, dtype=np.float64))
        d2 = np.concatenate(d2) if d2 else np.zeros(0)
        sums += np.bincount(lab, weights=d2, minlength=k)
        counts += np.bincount(lab, minlength=k)
        workdir.trim_maps()
    sigma = np.sqrt(np.divide(sums, counts, out=np.zeros(k), where=counts > 0))
    sigma[counts < 2] = 0.0  # one document says nothing about a cluster's spread
    return sigma


ASSIGN_BLOCK = 65536


def _cluster(
    cfg: PrepareConfig,
    out: Path,
    work: Path,
    emb: np.ndarray,
    emb_key: str,
    train: np.ndarray,
    held: np.ndarray,
) -> tuple[np.ndarray, np.ndarray | None, dict]:
    """(centroids, labels, stats): centroids fitted on the training documents only (`train`,
    the complement of the sorted indices `held`); labels of every document (held-out ones get
    their nearest centroid, or the GEM student's label, for reporting; memory-mapped from
    work/labels.npy); stats for `manifest.stats.clustering`. Rank 0. With k-means, labels is None
    when the assignment is still to do: `assign_blocks` on every rank, then `finish_labels`."""
    from grip_loop.cluster import fit_gem, normalised_entropy, spherical_kmeans

    shutil.rmtree(work / "assign", ignore_errors=True)  # what an unfinished assignment left

    meta = work / "labels.json"
    parts = ["cluster", emb_key, cfg.k, cfg.seed, cfg.kmeans_niter, cfg.kmeans_sample]
    if cfg.cluster.method != "kmeans":  # k-means keeps its old key: its finished stages resume
        parts.append(asdict(cfg.cluster))
    # the held-out rows by the sha256 of their int64 bytes (as a list they were ~45 bytes a
    # held-out document in the key's JSON: 2% of N)
    key = _key(
        *parts, "held-sha256", hashlib.sha256(np.ascontiguousarray(held, np.int64).tobytes()).hexdigest()
    )
    files = {"centroids": out / "centroids.npy", "labels": work / "labels.npy"}
    info = _finished(meta, key, "cluster")
    if info is not None:
        sums = info.get("sha256") if isinstance(info.get("sha256"), dict) else {}
        for name, path in files.items():
            try:
                ok = _file_sha256(path) == sums.get(name)
            except OSError:
                ok = False
            if not ok:  # cut short, overwritten (--cluster-by rewrites centroids.npy), or missing
                _note(path, "does not match the checksum recorded when it was written", "cluster")
                break
        else:
            _cached("cluster", meta)
            labels = np.load(files["labels"], mmap_mode="r")
            stats = info.get("stats") or {
                "method": "kmeans",
                "size_entropy": normalised_entropy(blockwise.bincount(labels, cfg.k, train)),
            }
            return np.load(files["centroids"]), labels, stats
    if cfg.cluster.method == "gem":
        c = cfg.cluster
        if cfg.progress:
            print(f"cluster: GEM, K={cfg.k}, balance {c.balance}, on up to {c.sample} documents")
        r = fit_gem(
            np.asarray(emb)[train],
            cfg.k,
            seed=cfg.seed,
            balance=c.balance,
            niter=c.niter,
            sample_size=c.sample,
            heldout=c.student_heldout,
        )
        centroids = r.centroids
        labels = r.student.predict(emb) if r.student is not None else np.zeros(len(emb), np.int64)
        stats = r.stats()
    else:
        # the sample spherical_kmeans would draw from the training rows, read from the memmap
        # alone (the same rows, so the same centroids, without a copy of every training row)
        n_train = len(emb) - len(held)
        if n_train > cfg.kmeans_sample:
            pick = np.random.default_rng(cfg.seed).choice(
                n_train, max(cfg.kmeans_sample, cfg.k), replace=False
            )
            rows = nth_training_rows(held, np.sort(pick))
        else:
            rows = np.flatnonzero(train)
        centroids, _ = spherical_kmeans(
            workdir.take_rows(emb, rows), cfg.k, seed=cfg.seed, niter=cfg.kmeans_niter, sample_size=None
        )
        adir = work / "assign"  # every rank assigns its blocks of rows (assign_blocks)
        adir.mkdir(parents=True)
        _atomic_npy(adir / "centroids.npy", centroids)
        _atomic_json(adir / "plan.json", {"key": key, "n": len(emb), "block": ASSIGN_BLOCK})
        return centroids, None, {"method": "kmeans", "key": key}
    return _save_labels(cfg, out, work, train, centroids, labels, stats, key)


def assign_blocks(work: Path, emb, rank: int, world: int) -> None:
    """Every rank: the nearest centroid of the rows of blocks b = rank (mod world) of
    `ASSIGN_BLOCK` rows, into `work/assign/block-BBBBB.npy`, when rank 0's k-means fit left a
    plan (nothing otherwise). A block's labels do not depend on the rank that computes it."""
    from grip_loop.cluster import assign

    adir = work / "assign"
    plan, _ = workdir.read_json(adir / "plan.json")
    if plan is not None:
        centroids = np.load(adir / "centroids.npy")
        n, block = plan["n"], plan["block"]
        for b in range(rank, -(-n // block), world):
            lo = b * block
            _atomic_npy(adir / f"block-{b:05d}.npy", assign(emb[lo : lo + block], centroids, block=block))
            workdir.trim_maps()
    distributed.barrier()


def finish_labels(
    cfg, out: Path, work: Path, train: np.ndarray, centroids, stats: dict, scratch: workdir.Scratch
):
    """Rank 0, after `assign_blocks`: every block's labels (gathered in a `scratch` array),
    saved with the stage's record; the labels returned are memory-mapped from the file."""
    adir = work / "assign"
    plan = json.loads((adir / "plan.json").read_text())
    n_blocks = -(-plan["n"] // plan["block"])
    labels = scratch.empty("assigned", plan["n"], np.int64)
    for b in range(n_blocks):
        labels[b * plan["block"] : (b + 1) * plan["block"]] = np.load(adir / f"block-{b:05d}.npy")
        workdir.trim_maps()
    stats = {k: v for k, v in stats.items() if k != "key"}
    result = _save_labels(cfg, out, work, train, centroids, labels, stats, plan["key"])
    shutil.rmtree(adir, ignore_errors=True)
    return result


def _save_labels(cfg, out, work, train, centroids, labels, stats, key):
    from grip_loop.cluster import normalised_entropy

    files = {"centroids": out / "centroids.npy", "labels": work / "labels.npy"}
    stats["size_entropy"] = round(normalised_entropy(blockwise.bincount(labels, cfg.k, train)), 6)
    _atomic_npy(files["centroids"], centroids)
    _atomic_npy(files["labels"], labels)  # np.save writes a memmap a piece at a time
    record = {"key": key, "sha256": {name: _file_sha256(path) for name, path in files.items()}}
    _atomic_json(work / "labels.json", record | {"stats": stats})
    return centroids, np.load(files["labels"], mmap_mode="r"), stats


def split_probe(probe_ids: list[str]) -> tuple[list[str], list[str]]:
    """(adaptation, evaluation) documents of a cluster's probe: alternating along the probe's
    random draw order, so every prefix of the draw is split evenly (the adaptation half gets
    the odd one out)."""
    return list(probe_ids[0::2]), list(probe_ids[1::2])


def probe_sizes(sizes: np.ndarray, sigma: np.ndarray, fraction: float, floor: int) -> np.ndarray:
    """Eq. 4 with a floor: n_k proportional to N_k sigma_k, at least min(floor, N_k), at most N_k.

    B_probe = round(fraction * N), raised to the sum of the floors when that is larger.
    With floor 1 this is `budget.probe_allocation`.
    """
    sizes = np.asarray(sizes, np.int64)
    lower = np.minimum(floor, sizes)
    b = int(min(sizes.sum(), max(round(fraction * sizes.sum()), lower.sum())))
    mass = sizes * np.asarray(sigma, np.float64)
    if mass.sum() == 0:
        mass = sizes.astype(np.float64)
    return apportion(mass, b, lower=lower.astype(np.float64), upper=sizes.astype(np.float64))


def cluster_orders(
    emb_k: np.ndarray,
    lengths_k: np.ndarray,
    orders: list[str],
    *,
    beta: float,
    knn_k: int,
    seed: int,
    approx_above: int | None = None,
    target_recall: float = 0.95,
    info: dict | None = None,
) -> dict[str, np.ndarray]:
    """Positions -> member indices of one cluster for each order (see the module docstring).
    `approx_above`, `target_recall`, `info`: the kNN of Eq. 9 (`selection.kernel_density`)."""
    if len(emb_k) == 0:
        return {o: np.zeros(0, np.int64) for o in orders}
    rho = (
        kernel_density(
            emb_k, k=knn_k, approx_above=approx_above, target_recall=target_recall, seed=seed, info=info
        )
        if any(o != "random" for o in orders)
        else None
    )
    weights = {
        "grip": lambda: selection_weights(rho, lengths_k, beta=beta),
        "diversity": lambda: selection_weights(rho, lengths_k, beta=0.0),
        "random": lambda: np.ones(len(emb_k)),
    }
    return {o: selection_order(weights[o](), seed=seed) for o in orders}


def _knn_stats(cfg: PrepareConfig, infos: list[dict | None]) -> dict:
    """manifest.stats.knn: which clusters used the approximate kNN and the recall measured."""
    approx = [i for i in infos if i]
    out = {
        "approx_above": cfg.knn_approx_above,
        "target_recall": cfg.knn_target_recall,
        "exact_clusters": len(infos) - len(approx),
        "approx_clusters": len(approx),
    }
    if approx:
        out["min_recall"] = min(i["recall"] for i in approx)
        out["approx"] = approx
    return out


def _pathology(cfg: PrepareConfig, out: Path, emb: np.ndarray, lengths: np.ndarray) -> str:
    n = len(emb)
    pick = np.sort(np.random.default_rng(cfg.seed).choice(n, min(n, cfg.pathology_sample), replace=False))
    d2, _ = knn(workdir.take_rows(emb, pick), cfg.knn_k)
    dist = np.sqrt(d2).mean(axis=1) if d2.shape[1] else np.zeros(len(pick))
    (out / "stats").mkdir(exist_ok=True)
    _atomic_npz(
        out / "stats" / "length_knn.npz",
        index=pick,
        length=workdir.take_rows(lengths, pick),
        knn_distance=dist,
    )
    return "stats/length_knn.npz"
