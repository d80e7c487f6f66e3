"""Spherical k-means with faiss: train on a sample, assign every document.

Embeddings are L2-normalised, so spherical k-means (centroids re-normalised after each
update, assignment by largest inner product) is k-means on the unit sphere (paper 2.2).
Training cost is O(sample * K * d * iterations), assignment O(N * K * d) once, so the
centroids are fit on a seeded uniform sample of `sample_size` documents (faiss itself
needs only ~40-256 points per centroid) and the whole corpus is then assigned in blocks.
That is the step that scales to hundreds of millions of documents: assignment is
embarrassingly parallel and streams the memmapped embeddings.

GPU: with faiss-gpu and a GPU, training and assignment run there (`use_gpu=None` picks);
the CPU path computes the same thing up to float rounding.
"""

from __future__ import annotations

import numpy as np

from grip_loop._checks import finite_array
from grip_loop.devices import faiss_gpu_available


def spherical_kmeans(
    emb: np.ndarray,
    k: int,
    *,
    seed: int = 0,
    niter: int = 25,
    nredo: int = 1,
    sample_size: int | None = 200_000,
    use_gpu: bool | None = None,
    verbose: bool = False,
) -> tuple[np.ndarray, np.ndarray]:
    """(centroids (k, d) unit rows, labels (N,) int64) of the L2-normalised rows of `emb`."""
    import faiss

    n = len(emb)
    if not 1 <= k <= n:
        raise ValueError(f"k: need 1 <= k <= number of documents ({n}), got {k}")
    gpu = faiss_gpu_available() if use_gpu is None else use_gpu
    rng = np.random.default_rng(seed)
    if sample_size is not None and n > sample_size:
        train_idx = np.sort(rng.choice(n, size=max(sample_size, k), replace=False))
    else:
        train_idx = np.arange(n)
    x = finite_array("emb", np.asarray(emb[train_idx]), ndim=2, dtype=np.float32)
    km = faiss.Kmeans(
        x.shape[1],
        k,
        niter=niter,
        nredo=nredo,  # restarts from other random inits; the best objective wins
        seed=int(seed) & 0x7FFFFFFF,
        spherical=True,
        gpu=bool(gpu),
        verbose=verbose,
        max_points_per_centroid=max(256, -(-len(x) // k)),  # faiss would otherwise subsample again
    )
    km.train(np.ascontiguousarray(x))
    centroids = km.centroids / np.linalg.norm(km.centroids, axis=1, keepdims=True)
    return centroids.astype(np.float32), assign(emb, centroids, use_gpu=gpu)


def assign(
    emb: np.ndarray, centroids: np.ndarray, *, use_gpu: bool = False, block: int = 65536
) -> np.ndarray:
    """Label of each row: the centroid with the largest inner product, streamed in blocks."""
    import faiss

    index = faiss.IndexFlatIP(centroids.shape[1])
    if use_gpu:
        index = faiss.index_cpu_to_all_gpus(index)
    index.add(np.ascontiguousarray(centroids, dtype=np.float32))
    labels = np.empty(len(emb), np.int64)
    for lo in range(0, len(emb), block):
        _, idx = index.search(np.ascontiguousarray(emb[lo : lo + block], dtype=np.float32), 1)
        labels[lo : lo + block] = idx[:, 0]
    return labels
