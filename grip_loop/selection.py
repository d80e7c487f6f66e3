"""Intra-cluster selection: GRIP Eq. 9 (kNN kernel density) and Eq. 10 (length-rectified
inverse-density weights), plus the Efraimidis–Spirakis order that turns "draw n documents
without replacement with probability proportional to P_select" into "take the first n".

All of this is static per document, so it runs once offline (`grip prepare`); at training
time a budget change only moves the cursor limit of a cluster's precomputed order.

Density choices the paper leaves open (documented here, used as defaults):

* The neighbourhood N_k(x) is x's k nearest *other* members of its cluster, and the sum
  also carries the self term exp(0) = 1 that a kNN query of x against its own cluster
  returns. rho(x) therefore lies in [1, k + 1]: an isolated point gets the smallest
  density (the largest weight) without the weight blowing up to infinity, and a point in
  a clump of k near-duplicates gets k + 1. Clusters with at most k members use all of them.
* The bandwidth h defaults to the median distance from a point to its k neighbours
  (the median over every point and neighbour of the cluster), so the kernel adapts to each
  cluster's scale; if every such distance is 0 (all members identical) rho = 1 + k_eff.
"""

from __future__ import annotations

import numpy as np

from grip_loop._checks import finite_array, finite_scalar, same_length
from grip_loop.devices import faiss_gpu_available


def knn(emb: np.ndarray, k: int, *, use_gpu: bool | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Exact k nearest *other* rows of each row: (squared L2 distances, indices), each (N, k).

    Uses faiss's exact flat index; on a GPU when faiss-gpu and a GPU exist (use_gpu=None
    picks automatically) — both compute the same exact search. `k` is capped at N - 1.
    """
    import faiss

    x = np.ascontiguousarray(emb, dtype=np.float32)
    n = len(x)
    k = min(int(k), n - 1)
    if k <= 0:
        return np.zeros((n, 0), np.float32), np.zeros((n, 0), np.int64)
    index = faiss.IndexFlatL2(x.shape[1])
    if faiss_gpu_available() if use_gpu is None else use_gpu:
        index = faiss.index_cpu_to_all_gpus(index)
    index.add(x)
    dist, idx = index.search(x, k + 1)
    # Drop each row's own entry. It is usually first, but exact duplicates may tie with it,
    # so remove by identity, and fall back to the farthest entry if self was not returned.
    own = idx == np.arange(n)[:, None]
    missing = ~own.any(axis=1)
    own[missing, -1] = True
    keep = ~own
    # faiss may return -1 padding when fewer than k+1 points exist; k <= n-1 rules that out.
    return np.maximum(dist[keep].reshape(n, k), 0.0), idx[keep].reshape(n, k)


def _drop_self(dist: np.ndarray, idx: np.ndarray, rows: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """k of the k + 1 results of each query row, its own entry removed (or the last one)."""
    n = len(rows)
    own = idx == rows[:, None]
    own &= np.cumsum(own, axis=1) == 1  # one entry only, even if faiss repeated it
    missing = ~own.any(axis=1)
    own[missing, -1] = True
    keep = ~own
    return np.maximum(dist[keep].reshape(n, k), 0.0), idx[keep].reshape(n, k)


def knn_recall(approx_d2: np.ndarray, exact_d2: np.ndarray) -> float:
    """recall@k of an approximate kNN against the exact one on the same queries, by distance:
    a returned neighbour counts when it is no farther than the exact k-th neighbour (so ties
    between equidistant points, e.g. duplicates, are not counted as misses)."""
    if approx_d2.size == 0:
        return 1.0
    kth = exact_d2[:, -1:] * (1 + 1e-5) + 1e-7
    return float((approx_d2 <= kth).mean())


def knn_approx(
    emb: np.ndarray, k: int, *, target_recall: float = 0.95, sample: int = 256, seed: int = 0
) -> tuple[np.ndarray, np.ndarray, dict]:
    """Approximate k nearest *other* rows (as `knn`) with a faiss IVF index, plus what it measured.

    Coarse centroids: sqrt(N) rows drawn with `seed` (no training, so the index is a pure
    function of the rows and the seed). `nprobe` starts at 8 and doubles until recall@k on
    `sample` seeded query rows, against an exact search of those rows, reaches `target_recall`
    (at nprobe = nlist the search is exact). Returns (squared distances, indices, info) with
    info = {"n", "nlist", "nprobe", "recall", "sample"}.
    """
    import faiss

    x = np.ascontiguousarray(emb, dtype=np.float32)
    n, d = x.shape
    k = min(int(k), n - 1)
    if k <= 0:
        return np.zeros((n, 0), np.float32), np.zeros((n, 0), np.int64), {"n": n, "recall": 1.0}
    rng = np.random.default_rng(seed)
    nlist = max(1, int(round(np.sqrt(n))))
    quantizer = faiss.IndexFlatL2(d)
    quantizer.add(x[np.sort(rng.choice(n, nlist, replace=False))])
    index = faiss.IndexIVFFlat(quantizer, d, nlist, faiss.METRIC_L2)
    index.is_trained = True  # the quantizer holds its centroids already
    index.add(x)
    q = np.sort(rng.choice(n, min(sample, n), replace=False))
    exact = faiss.IndexFlatL2(d)
    exact.add(x)
    ed, ei = exact.search(x[q], k + 1)
    exact_d2, _ = _drop_self(ed, ei, q, k)
    nprobe = min(8, nlist)
    while True:
        index.nprobe = nprobe
        ad, ai = index.search(x[q], k + 1)
        recall = knn_recall(_drop_self(ad, ai, q, k)[0], exact_d2)
        if recall >= target_recall or nprobe >= nlist:
            break
        nprobe = min(nlist, 2 * nprobe)
    dist, idx = index.search(x, k + 1)
    # faiss pads with -1 when the probed lists hold fewer than k + 1 points: fill from exact
    short = np.flatnonzero((idx < 0).any(axis=1))
    if len(short):
        dist[short], idx[short] = exact.search(x[short], k + 1)
    d2, nn = _drop_self(dist, idx, np.arange(n), k)
    info = {"n": n, "nlist": nlist, "nprobe": int(nprobe), "recall": round(recall, 4), "sample": len(q)}
    return d2, nn, info


def kernel_density(
    emb,
    k: int = 10,
    bandwidth: float | None = None,
    *,
    use_gpu: bool | None = None,
    approx_above: int | None = None,
    target_recall: float = 0.95,
    seed: int = 0,
    info: dict | None = None,
) -> np.ndarray:
    """Eq. 9 inside one cluster: rho(x) = 1 + sum_{z in kNN(x)} exp(-||e(x) - e(z)||^2 / 2h^2).

    `emb` are the cluster's L2-normalised embeddings (N, d). See the module docstring for
    the self term and the default bandwidth (median kNN distance). Returns float64 (N,),
    every value in [1, k + 1].

    Clusters of more than `approx_above` rows (None: never) use `knn_approx` (IVF, recall@k
    tuned to `target_recall` on a seeded sample) instead of the exact search; `info`, when
    given, receives what was done ({"approx": bool, ...knn_approx's info}).
    """
    e = finite_array("emb", emb, ndim=2, dtype=np.float32)
    if int(k) < 1:
        raise ValueError(f"k: must be >= 1, got {k}")
    n = len(e)
    if n == 0:
        return np.zeros(0)
    if approx_above is not None and n > approx_above:
        d2, _, got = knn_approx(e, k, target_recall=target_recall, seed=seed)
        if info is not None:
            info.update(approx=True, **got)
    else:
        d2, _ = knn(e, k, use_gpu=use_gpu)
        if info is not None:
            info.update(approx=False, n=n)
    d2 = d2.astype(np.float64)
    if d2.shape[1] == 0:
        return np.ones(n)
    if bandwidth is None:
        dist = np.sqrt(d2)
        positive = dist[dist > 0]
        if positive.size == 0:
            return np.full(n, 1.0 + d2.shape[1])
        h = float(np.median(dist))
        if h == 0.0:  # more than half the pairs are duplicates: use the scale of the rest
            h = float(np.median(positive))
    else:
        h = finite_scalar("bandwidth", bandwidth, lo=0, lo_open=True)
    return 1.0 + np.exp(-d2 / (2.0 * h * h)).sum(axis=1)


def selection_weights(density, lengths, beta: float = 0.3) -> np.ndarray:
    """Eq. 10: P_select(x) proportional to rho(x)^-1 (l(x) / l_avg)^beta, normalised to sum 1.

    `density` > 0 (from `kernel_density`), `lengths` >= 0 token counts of the same cluster;
    l_avg is their mean. beta = 0.3 is the paper's section 3.2 value (the text under Eq. 10
    says beta >= 1; any beta >= 0 is accepted). Zero-length documents get weight 0 when
    beta > 0 (they carry no tokens to train on) and so come last in `selection_order`; if
    every length is 0 the lengths are ignored.
    """
    rho = finite_array("density", density, ndim=1)
    ln = finite_array("lengths", lengths, ndim=1)
    same_length(density=rho, lengths=ln)
    b = finite_scalar("beta", beta, lo=0)
    if np.any(rho <= 0):
        raise ValueError("density: must be > 0 (kernel_density returns values >= 1)")
    if np.any(ln < 0):
        raise ValueError("lengths: must be >= 0")
    if len(rho) == 0:
        return np.zeros(0)
    l_avg = ln.mean()
    rect = (ln / l_avg) ** b if l_avg > 0 else np.ones_like(ln)
    w = rect / rho
    return w / w.sum()


def selection_order(weights, seed: int) -> np.ndarray:
    """Efraimidis–Spirakis order: indices sorted by key u_i^(1/w_i) descending, u_i ~ U(0, 1].

    The first n entries are a weighted random sample of n items without replacement (each
    next item drawn with probability proportional to its weight among those left), for
    every n at once. Keys are compared as log(u)/w to avoid underflow. Zero-weight items
    come last, in index order. Deterministic for a fixed `seed`.
    """
    w = finite_array("weights", weights, ndim=1)
    if np.any(w < 0):
        raise ValueError("weights: must be non-negative")
    u = 1.0 - np.random.default_rng(seed).random(len(w))  # in (0, 1], so log(u) is finite
    with np.errstate(divide="ignore"):
        keys = np.where(w > 0, np.log(u) / np.where(w > 0, w, 1.0), -np.inf)
    return np.argsort(-keys, kind="stable")
