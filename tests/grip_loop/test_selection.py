"""Eq. 9-10 and the Efraimidis–Spirakis order against brute-force references."""

from __future__ import annotations

import itertools

import numpy as np
import pytest

import grip_loop as gl
from tests.conftest import unit_rows
from tests.devices import requires_faiss_gpu


def brute_density(emb, k, h=None):
    """Eq. 9 by brute force: all pairwise distances, k nearest others, plus the self term."""
    e = emb.astype(np.float64)
    d2 = ((e[:, None, :] - e[None, :, :]) ** 2).sum(-1)
    np.fill_diagonal(d2, np.inf)
    kk = min(k, len(e) - 1)
    nn = np.sort(d2, axis=1)[:, :kk]
    if h is None:
        h = np.median(np.sqrt(nn))
    return 1.0 + np.exp(-nn / (2 * h * h)).sum(1), h


@pytest.mark.parametrize("seed", range(5))
@pytest.mark.parametrize("n,k", [(200, 10), (7, 10), (50, 3)])
def test_kernel_density_matches_brute_force(seed, n, k):
    rng = np.random.default_rng(seed)
    # a clumped cluster: half the points near one direction, the rest spread out
    x = rng.normal(size=(n, 24))
    x[: n // 2] = x[0] + 0.05 * rng.normal(size=(n // 2, 24))
    emb = unit_rows(x)
    ref, _ = brute_density(emb, k)
    got = gl.kernel_density(emb, k=k)
    np.testing.assert_allclose(got, ref, rtol=1e-4, atol=1e-5)
    assert np.all(got >= 1) and np.all(got <= min(k, n - 1) + 1 + 1e-9)
    # the clump is denser than the spread-out half
    assert got[: n // 2].mean() > got[n // 2 :].mean()
    ref_h, _ = brute_density(emb, k, h=0.3)
    np.testing.assert_allclose(gl.kernel_density(emb, k=k, bandwidth=0.3), ref_h, rtol=1e-4, atol=1e-5)


def test_kernel_density_degenerate_clusters(rng):
    assert gl.kernel_density(np.zeros((0, 4), np.float32)).shape == (0,)
    np.testing.assert_array_equal(gl.kernel_density(unit_rows(rng.normal(size=(1, 4)))), [1.0])
    same = np.tile(unit_rows(rng.normal(size=(1, 8))), (6, 1))
    np.testing.assert_array_equal(gl.kernel_density(same, k=10), np.full(6, 6.0))  # 1 + 5 others
    # mostly duplicates: the bandwidth falls back to the positive distances, stays finite
    mixed = np.vstack([same, unit_rows(rng.normal(size=(2, 8)))])
    assert np.all(np.isfinite(gl.kernel_density(mixed, k=10)))
    with pytest.raises(ValueError, match="emb"):
        gl.kernel_density(np.full((3, 4), np.nan, np.float32))
    with pytest.raises(ValueError, match="bandwidth"):
        gl.kernel_density(unit_rows(rng.normal(size=(5, 4))), bandwidth=0.0)


@pytest.mark.gpu
@requires_faiss_gpu
def test_knn_gpu_equals_cpu(rng):
    emb = unit_rows(rng.normal(size=(500, 32)))
    d_cpu, i_cpu = gl.knn(emb, 10, use_gpu=False)
    d_gpu, i_gpu = gl.knn(emb, 10, use_gpu=True)
    np.testing.assert_allclose(d_gpu, d_cpu, rtol=1e-4, atol=1e-5)
    assert (i_gpu == i_cpu).mean() > 0.99  # ties may order differently


def test_selection_weights_formula(rng):
    rho = rng.uniform(1, 11, size=50)
    lengths = rng.integers(1, 5000, size=50).astype(float)
    w = gl.selection_weights(rho, lengths)
    ref = (lengths / lengths.mean()) ** 0.3 / rho
    np.testing.assert_allclose(w, ref / ref.sum())
    assert w.sum() == pytest.approx(1.0)
    np.testing.assert_allclose(gl.selection_weights(rho, lengths, beta=0), (1 / rho) / (1 / rho).sum())
    # long documents gain weight as beta grows (the length rectification)
    long = np.argmax(lengths)
    assert (
        gl.selection_weights(rho, lengths, beta=1.0)[long] > gl.selection_weights(rho, lengths, beta=0)[long]
    )


def test_selection_weights_zero_length_and_errors():
    w = gl.selection_weights([1.0, 2.0, 1.0], [0, 10, 20])
    assert w[0] == 0 and w.sum() == pytest.approx(1)
    np.testing.assert_allclose(gl.selection_weights([1.0, 1.0], [0, 0]), [0.5, 0.5])
    with pytest.raises(ValueError, match="density"):
        gl.selection_weights([0.0, 1.0], [1, 1])
    with pytest.raises(ValueError, match="lengths"):
        gl.selection_weights([1.0, 1.0], [np.nan, 1])
    with pytest.raises(ValueError, match="beta"):
        gl.selection_weights([1.0, 1.0], [1, 1], beta=-1)


def exact_inclusion(w, n):
    """P(item i among the first n draws) of successive sampling without replacement, by enumeration."""
    w = np.asarray(w, float)
    p = np.zeros(len(w))
    for seq in itertools.permutations(range(len(w)), n):
        prob, left = 1.0, w.sum()
        for i in seq:
            prob *= w[i] / left
            left -= w[i]
        p[list(seq)] += prob
    return p


@pytest.mark.parametrize("w,n", [([1, 2, 3, 4, 10], 2), ([5, 1, 1, 1, 0.5, 0.1], 3), ([1, 1, 8], 1)])
def test_selection_order_prefix_is_weighted_sample_without_replacement(w, n):
    trials = 20_000
    counts = np.zeros(len(w))
    for seed in range(trials):
        counts[gl.selection_order(w, seed)[:n]] += 1
    p = exact_inclusion(w, n)
    freq = counts / trials
    tol = 4.5 * np.sqrt(p * (1 - p) / trials) + 1e-3
    assert np.all(np.abs(freq - p) < tol), (freq, p)


def test_selection_order_permutation_determinism_and_zero_weights():
    w = np.array([0.0, 1.0, 2.0, 0.0, 3.0])
    for seed in range(20):
        o = gl.selection_order(w, seed)
        assert sorted(o.tolist()) == list(range(5))
        assert o[-2:].tolist() == [0, 3]  # zero weights last, in index order
        assert np.array_equal(o, gl.selection_order(w, seed))
    orders = {tuple(gl.selection_order(np.ones(30), s)) for s in range(10)}
    assert len(orders) == 10
    with pytest.raises(ValueError, match="weights"):
        gl.selection_order([1.0, -1.0], 0)
    # tiny weights do not underflow to ties (log-space keys)
    o = gl.selection_order(np.array([1e-300, 1e-300, 1.0]), 0)
    assert o[0] == 2


def _blobs(n, d, seed):
    rng = np.random.default_rng(seed)
    centers = rng.standard_normal((20, d))
    x = centers[rng.integers(0, 20, n)] + 0.6 * rng.standard_normal((n, d))
    return (x / np.linalg.norm(x, axis=1, keepdims=True)).astype(np.float32)


def test_approximate_knn_keeps_recall_and_density_close_to_exact():
    """IVF above the threshold: recall@10 against the exact search >= 0.95 on every query (not
    only on the tuning sample), over several seeds; the Eq. 9 density barely moves."""
    from grip_loop.selection import kernel_density, knn, knn_approx, knn_recall

    for seed in range(2):
        x = _blobs(4000, 24, seed)
        d2, idx, info = knn_approx(x, 10, seed=seed)
        exact_d2, exact_idx = knn(x, 10)
        assert info["recall"] >= 0.95 and info["nprobe"] <= info["nlist"]
        assert knn_recall(d2, exact_d2) >= 0.95
        assert not (idx == np.arange(len(x))[:, None]).any()  # never itself
        assert np.all(np.diff(d2, axis=1) >= -1e-6)  # nearest first, as knn
        info2: dict = {}
        rho = kernel_density(x, 10, approx_above=1000, seed=seed, info=info2)
        exact = kernel_density(x, 10)
        assert info2["approx"] and info2["recall"] >= 0.95
        assert np.median(np.abs(rho - exact) / exact) < 0.01 and np.corrcoef(rho, exact)[0, 1] > 0.98
        # deterministic (a pure function of rows and seed) and exact below the threshold
        assert np.array_equal(kernel_density(x, 10, approx_above=1000, seed=seed), rho)
        small: dict = {}
        assert np.array_equal(
            kernel_density(x[:500], 10, approx_above=1000, info=small), kernel_density(x[:500], 10)
        )
        assert small == {"approx": False, "n": 500}
    # a very high target forces a wider search: recall 1.0 at nprobe up to nlist
    _, _, info = knn_approx(_blobs(2000, 16, 9), 10, target_recall=1.0)
    assert info["recall"] == 1.0
