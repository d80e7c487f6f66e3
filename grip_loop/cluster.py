"""Clusters of the embeddings: spherical k-means with faiss (train on a sample, assign every
document) and GEM's entry point `fit_gem` (its teacher, the balanced vMF mixture, is
`grip_loop.gem`; the linear student that labels every document is here).

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

from dataclasses import dataclass

import numpy as np

from grip_loop import workdir
from grip_loop._checks import finite_array
from grip_loop.devices import faiss_gpu_available
from grip_loop.gem import GEMTeacher, _best_kappa, _entropy, fit_gem_teacher, gem_objective


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
    x = finite_array("emb", workdir.take_rows(emb, train_idx), ndim=2, dtype=np.float32)
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
        workdir.trim_maps()
    return labels


# ---------------------------------------------------------------------------------------
# distillation: a linear softmax student assigns the whole corpus


@dataclass
class Student:
    """softmax(x W + b): the cheap assigner distilled from the teacher's soft assignments."""

    w: np.ndarray  # (d, K)
    b: np.ndarray  # (K,)

    def predict(self, emb, *, block: int = 65536) -> np.ndarray:
        """argmax_k of the student's logits for every row, streamed in blocks (a memmap is read
        block by block; rows are L2-normalised first, like the fit)."""
        labels = np.empty(len(emb), np.int64)
        for lo in range(0, len(emb), block):
            xb = _unit(np.asarray(emb[lo : lo + block], np.float64), "emb", lo)
            labels[lo : lo + block] = np.argmax(xb @ self.w + self.b, axis=1)
            workdir.trim_maps()
        return labels


def train_student(
    x: np.ndarray, soft: np.ndarray, *, l2: float = 0.0, max_iter: int = 300, tol: float = 1e-10
) -> Student:
    """Minimise the cross-entropy of softmax(x W + b) to the teacher's posteriors `soft` (n, K)
    plus l2 * |W|^2: full batch, L-BFGS (memory 10, backtracking Armijo line search) from
    W = 0, b = 0, in numpy float64 (deterministic; no torch.optim, whose first use costs
    seconds of imports).

    No regularisation by default: the vMF teacher's posterior is itself a softmax of a linear
    function of x (logits kappa mu_k . x + log pi_k), so the loss has a finite minimum at the
    teacher's own parameters and the student can match it exactly; what the held-out agreement
    then measures is how well a fit on the sample recovers it (near-ties are where they differ)."""
    x = np.ascontiguousarray(x, np.float64)
    soft = np.ascontiguousarray(soft, np.float64)
    n, d = x.shape
    k = soft.shape[1]

    def loss_grad(theta: np.ndarray) -> tuple[float, np.ndarray]:
        w, b = theta[: d * k].reshape(d, k), theta[d * k :]
        z = x @ w + b
        z -= z.max(axis=1, keepdims=True)
        log_p = z - np.log(np.exp(z).sum(axis=1, keepdims=True))
        loss = -float((soft * log_p).sum()) / n + l2 * float((w * w).sum())
        g = (np.exp(log_p) - soft) / n
        return loss, np.concatenate([(x.T @ g + 2 * l2 * w).ravel(), g.sum(axis=0)])

    theta = np.zeros(d * k + k)
    f, g = loss_grad(theta)
    s_hist: list[np.ndarray] = []
    y_hist: list[np.ndarray] = []
    for _ in range(max_iter):
        # two-loop recursion: direction = -H g
        q = g.copy()
        alphas = []
        for s_, y_ in zip(reversed(s_hist), reversed(y_hist), strict=True):
            a_ = float(s_ @ q) / float(y_ @ s_)
            alphas.append(a_)
            q -= a_ * y_
        if y_hist:
            q *= float(s_hist[-1] @ y_hist[-1]) / float(y_hist[-1] @ y_hist[-1])
        for (s_, y_), a_ in zip(zip(s_hist, y_hist, strict=True), reversed(alphas), strict=True):
            q += s_ * (a_ - float(y_ @ q) / float(y_ @ s_))
        direction = -q
        slope = float(g @ direction)
        if slope >= 0:  # not a descent direction: restart from the gradient
            s_hist.clear()
            y_hist.clear()
            direction, slope = -g, -float(g @ g)
        step = 1.0
        while True:
            f_new, g_new = loss_grad(theta + step * direction)
            if f_new <= f + 1e-4 * step * slope or step < 1e-12:
                break
            step *= 0.5
        s_vec, y_vec = step * direction, g_new - g
        theta, f_old, f, g = theta + s_vec, f, f_new, g_new
        if float(s_vec @ y_vec) > 1e-12:
            s_hist.append(s_vec)
            y_hist.append(y_vec)
            if len(s_hist) > 10:
                s_hist.pop(0)
                y_hist.pop(0)
        if f_old - f <= tol * max(1.0, abs(f)) or float(np.abs(g).max()) < 1e-8:
            break
    return Student(w=theta[: d * k].reshape(d, k).copy(), b=theta[d * k :].copy())


# ---------------------------------------------------------------------------------------
# the public entry point


@dataclass
class GEMResult:
    centroids: np.ndarray  # (K, d) float32 unit rows (the teacher's mu)
    labels: np.ndarray  # (N,) int64, the student's assignment of every row
    teacher: GEMTeacher
    student: Student | None
    agreement: float  # student argmax == teacher argmax on held-out sample points
    n_heldout: int
    sample_size: int
    fallback: str | None = None  # "k=1" when the documented K = 1 shortcut was taken

    def stats(self) -> dict:
        """JSON-able summary for the manifest (`stats.clustering`)."""
        sizes = np.bincount(self.labels, minlength=len(self.centroids))
        return {
            "method": "gem",
            "balance": self.teacher.balance,
            "kappa": round(self.teacher.kappa, 6),
            "mm_iterations": self.teacher.n_iter,
            "objective": [round(v, 9) for v in (self.teacher.objective[0], self.teacher.objective[-1])],
            "sample_size": self.sample_size,
            "student_agreement": round(self.agreement, 6),
            "student_heldout_points": self.n_heldout,
            "size_entropy": round(normalised_entropy(sizes), 6),
            "fallback": self.fallback,
        }


def normalised_entropy(sizes) -> float:
    """Entropy of the cluster-size distribution / log K (1 = perfectly balanced); 1 for K = 1."""
    sizes = np.asarray(sizes, np.float64)
    if len(sizes) < 2 or sizes.sum() == 0:
        return 1.0
    return _entropy(sizes / sizes.sum()) / float(np.log(len(sizes)))


def _unit(x: np.ndarray, name: str, offset: int = 0) -> np.ndarray:
    x = finite_array(name, x, ndim=2)
    norms = np.linalg.norm(x, axis=1)
    if np.any(norms == 0):
        raise ValueError(
            f"{name}: row {offset + int(np.flatnonzero(norms == 0)[0])} is all zeros (no direction)"
        )
    return x / norms[:, None]


def gem_cluster(emb: np.ndarray, k: int, **options) -> tuple[np.ndarray, np.ndarray]:
    """GEM clustering: (centroids (k, d) float32 unit rows, labels (N,) int64), the contract of
    `spherical_kmeans`. `options` are `fit_gem`'s keywords; see it for the steps and the
    degenerate cases."""
    r = fit_gem(emb, k, **options)
    return r.centroids, r.labels


def fit_gem(
    emb: np.ndarray,
    k: int,
    *,
    seed: int = 0,
    balance: float = 1.0,
    niter: int = 100,
    sample_size: int | None = 50_000,
    heldout: float = 0.1,
    block: int = 65536,
) -> GEMResult:
    """GEM on the rows of `emb` (N, d), L2-normalised here:

    1. a seeded uniform sample of `sample_size` rows (all rows if N is smaller);
    2. the teacher: the balanced vMF mixture fitted by MM on the whole sample;
    3. the student: a linear softmax classifier trained on the teacher's posteriors of the
       sample minus a seeded `heldout` fraction; `agreement` = how often student and teacher
       pick the same component on those held-out points;
    4. every row labelled by the student, streamed in blocks of `block` (a memmap is fine).

    Degenerate input: non-finite values, a zero row, d < 3, k outside [1, N], or a sample
    with fewer than k distinct rows (all-identical embeddings included) raise ValueError naming
    `emb` or `k` and the fix. K = 1 is a documented fallback: the centroid is the normalised mean
    (the first row if the mean is ~0), every label 0, no MM and no student. Centroids are
    never NaN: a component that loses all its mass keeps its previous direction.
    """
    n = len(emb)
    if isinstance(k, bool) or not isinstance(k, int | np.integer) or not 1 <= k <= n:
        raise ValueError(f"k: need an integer with 1 <= k <= number of documents ({n}), got {k!r}")
    if (
        isinstance(balance, bool)
        or not isinstance(balance, int | float)
        or not np.isfinite(balance)
        or balance < 0
    ):
        raise ValueError(f"balance: must be a finite number >= 0, got {balance!r}")
    if not 0 <= heldout < 1:
        raise ValueError(f"heldout: must lie in [0, 1), got {heldout!r}")
    rng = np.random.default_rng(seed)
    if sample_size is not None and n > sample_size:
        idx = np.sort(rng.choice(n, size=max(sample_size, k), replace=False))
    else:
        idx = np.arange(n)
    x = _unit(workdir.take_rows(emb, idx), "emb")
    d = x.shape[1]
    if k == 1:
        m = x.sum(axis=0)
        mu = (m / np.linalg.norm(m) if np.linalg.norm(m) > 1e-9 * len(x) else x[0]).reshape(1, d)
        kappa = _best_kappa(d, max(float((x @ mu[0]).mean()), 0.0)) if d >= 3 else 0.0
        obj = gem_objective(x, mu, kappa, np.ones(1), balance) if d >= 3 else float("nan")
        teacher = GEMTeacher(mu=mu, kappa=kappa, pi=np.ones(1), balance=balance, objective=[obj], n_iter=0)
        for lo in range(0, n, block):  # the same checks on every row as the student's pass
            _unit(np.asarray(emb[lo : lo + block]), "emb", lo)
            workdir.trim_maps()
        return GEMResult(mu.astype(np.float32), np.zeros(n, np.int64), teacher, None, 1.0, 0, len(x), "k=1")
    if d < 3:
        raise ValueError(f"emb: GEM needs embeddings of dimension >= 3 (the vMF normaliser), got {d}")
    distinct = len(np.unique(x, axis=0))
    if distinct < k:
        raise ValueError(
            f"emb: the fitting sample holds only {distinct} distinct embeddings, fewer than k={k} "
            f"(duplicates or identical documents); lower k to at most {distinct}"
        )
    teacher = fit_gem_teacher(x, k, balance=balance, niter=niter, seed=seed)
    soft = np.exp(teacher.log_posterior(x))
    n_hold = int(round(heldout * len(x))) if len(x) > k else 0
    order = np.random.default_rng([seed, 1]).permutation(len(x))
    hold, fit = order[:n_hold], order[n_hold:]
    student = train_student(x[fit], soft[fit])
    if n_hold:
        agreement = float(
            np.mean(np.argmax(x[hold] @ student.w + student.b, axis=1) == np.argmax(soft[hold], axis=1))
        )
    else:
        agreement = float("nan")
    labels = student.predict(emb, block=block)
    return GEMResult(
        centroids=teacher.mu.astype(np.float32),
        labels=labels,
        teacher=teacher,
        student=student,
        agreement=agreement,
        n_heldout=n_hold,
        sample_size=len(x),
    )
