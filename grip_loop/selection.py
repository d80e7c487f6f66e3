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


def kernel_density(
    emb, k: int = 10, bandwidth: float | None = None, *, use_gpu: bool | None = None
) -> np.ndarray:
    """Eq. 9 inside one cluster: rho(x) = 1 + sum_{z in kNN(x)} exp(-||e(x) - e(z)||^2 / 2h^2).

    `emb` are the cluster's L2-normalised embeddings (N, d). See the module docstring for
    the self term and the default bandwidth (median kNN distance). Returns float64 (N,),
    every value in [1, k + 1].
    """
    e = finite_array("emb", emb, ndim=2, dtype=np.float32)
    if int(k) < 1:
        raise ValueError(f"k: must be >= 1, got {k}")
    n = len(e)
    if n == 0:
        return np.zeros(0)
    d2, _ = knn(e, k, use_gpu=use_gpu)
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
