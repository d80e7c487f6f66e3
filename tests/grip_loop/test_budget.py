"""Eq. 3-5, 7, 8: naive references, invariants over many seeds, and every documented edge case."""

from __future__ import annotations

import inspect
import math

import numpy as np
import pytest

import grip_loop as gl
from tests.conftest import unit_rows

SEEDS = range(40)


# ----------------------------------------------------------------------------- references


def naive_largest_remainder(w, total):
    """Textbook Hamilton apportionment, written independently with plain Python."""
    s = sum(w)
    quotas = [total * x / s for x in w]
    n = [math.floor(q) for q in quotas]
    order = sorted(range(len(w)), key=lambda i: (-(quotas[i] - n[i]), i))
    for i in order[: total - sum(n)]:
        n[i] += 1
    return n


def naive_waterfill(w, total, lo, hi):
    """Bounded proportional targets by repeatedly pinning the clusters that break a bound."""
    w, lo, hi = (np.asarray(a, dtype=float) for a in (w, lo, hi))
    fixed = np.full(len(w), np.nan)
    for _ in range(len(w) + 1):
        free = np.isnan(fixed)
        lam = (total - np.nansum(fixed)) / w[free].sum()
        t = np.where(free, lam * w, fixed)
        low, high = free & (t < lo), free & (t > hi)
        if not (low.any() or high.any()):
            return t
        # pin the worst violators of one side first (the other side may resolve itself)
        if high.any():
            fixed[high] = hi[high]
        else:
            fixed[low] = lo[low]
    raise AssertionError("did not converge")


def random_clusters(seed, k=None):
    rng = np.random.default_rng(seed)
    k = k or int(rng.integers(2, 30))
    sizes = rng.integers(0, 500, size=k)
    sizes[rng.integers(0, k)] = 1  # always a one-point cluster
    sizes[rng.integers(0, k)] += 50  # and never an all-empty corpus
    sigma = np.where(sizes > 1, rng.uniform(0.05, 0.9, size=k), 0.0)
    quality = rng.uniform(0, 1, size=k)
    return rng, sizes, sigma, quality


# ----------------------------------------------------------------------------- apportion


@pytest.mark.parametrize("seed", SEEDS)
def test_apportion_unbounded_matches_textbook_hamilton(seed):
    rng = np.random.default_rng(seed)
    w = rng.uniform(0, 10, size=rng.integers(1, 40))
    w[rng.random(len(w)) < 0.2] = 0.0
    w[0] += 1.0
    total = int(rng.integers(0, 100_000))
    assert gl.apportion(w, total).tolist() == naive_largest_remainder(w.tolist(), total)


@pytest.mark.parametrize("seed", SEEDS)
def test_apportion_bounded_is_within_one_of_waterfill_and_exact(seed):
    rng = np.random.default_rng(seed)
    k = int(rng.integers(2, 25))
    w = rng.uniform(0.01, 5, size=k)
    hi = rng.integers(1, 60, size=k).astype(float)
    lo = np.minimum(rng.integers(0, 3, size=k), hi).astype(float)
    total = int(rng.integers(int(lo.sum()), int(hi.sum()) + 1))
    n = gl.apportion(w, total, lower=lo, upper=hi)
    assert n.sum() == total
    assert np.all(n >= lo) and np.all(n <= hi)
    t = naive_waterfill(w, total, lo, hi)
    assert np.all(np.abs(n - t) < 1.0 + 1e-9)
    assert np.array_equal(n, gl.apportion(w, total, lower=lo, upper=hi))


@pytest.mark.timeout(30)
def test_a_subnormal_weight_next_to_large_ones_terminates_and_fills_the_total():
    """Hypothesis found it in CI: sigma_k = 5e-324 made Eq. 4's mass subnormal; scaled by the
    largest weight it underflowed to 0, its entry could never rise to fill the last unit, and the
    bracket search climbed forever."""
    sizes = [546, 10000, 110, 278, 1329, 170]
    n = gl.probe_allocation(sizes, [1.41, 1.41, 0.99999, 1e-14, 0.54, 5e-324], sum(sizes) - 1)
    assert int(n.sum()) == sum(sizes) - 1 and np.all(n <= sizes) and np.all(n >= 1)
    assert n.tolist() == [546, 10000, 110, 278, 1329, 169]  # the smallest weight gives the unit up
    n = gl.apportion([5e-324, 1e3], 10, upper=[5, 6])
    assert n.tolist() == [4, 6]


def test_apportion_infeasible_and_bad_bounds():
    with pytest.raises(ValueError, match="exceeds the sum of the upper bounds"):
        gl.apportion([1, 1], 10, upper=[3, 3])
    with pytest.raises(ValueError, match="below the sum of the lower bounds"):
        gl.apportion([1, 1], 1, lower=[1, 1])
    with pytest.raises(ValueError, match="integers"):
        gl.apportion([1, 1], 3, upper=[1.5, 2])
    with pytest.raises(ValueError, match="weights"):
        gl.apportion([1, -1], 3)


def test_apportion_zero_weights_take_the_rest_only_when_others_saturate():
    assert gl.apportion([1, 0, 0], 5, upper=[10, 10, 10]).tolist() == [5, 0, 0]
    assert gl.apportion([1, 0, 0], 5, upper=[1, 10, 10]).tolist() == [1, 2, 2]
    assert gl.apportion([0, 0], 3).tolist() == [2, 1]


# ----------------------------------------------------------------------------- Eq. 3


def test_geometric_consistency_matches_naive_loop(rng):
    emb = unit_rows(rng.normal(size=(300, 16)))
    labels = rng.integers(0, 6, size=300)
    labels[labels == 4] = 0  # cluster 4 empty
    labels[7] = 5
    labels[labels == 5] = 1
    labels[7] = 5  # cluster 5 has exactly one point
    cents = unit_rows(rng.normal(size=(6, 16)))
    sigma = gl.geometric_consistency(emb, labels, cents)
    for k in range(6):
        members = emb[labels == k].astype(np.float64)
        if len(members) < 2:
            assert sigma[k] == 0.0
        else:
            ref = math.sqrt(sum(float(np.sum((x - cents[k]) ** 2)) for x in members) / len(members))
            assert sigma[k] == pytest.approx(ref, rel=1e-5)


def test_geometric_consistency_rejects_bad_input(rng):
    emb = unit_rows(rng.normal(size=(10, 4)))
    with pytest.raises(ValueError, match="L2-normalised"):
        gl.geometric_consistency(emb * 2, np.zeros(10, int), emb[:1])
    with pytest.raises(ValueError, match="labels"):
        gl.geometric_consistency(emb, np.full(10, 3), emb[:2])
    with pytest.raises(ValueError, match="centroids"):
        gl.geometric_consistency(emb, np.zeros(10, int), np.ones((1, 5)))


# ----------------------------------------------------------------------------- Eq. 4


@pytest.mark.parametrize("seed", SEEDS)
def test_probe_allocation_invariants(seed):
    rng, sizes, sigma, _ = random_clusters(seed)
    nonempty = int((sizes > 0).sum())
    b = int(rng.integers(nonempty, max(nonempty + 1, sizes.sum() // 20)))
    n = gl.probe_allocation(sizes, sigma, b)
    assert n.dtype.kind == "i" and n.sum() == b
    assert np.all(n <= sizes) and np.all(n[sizes > 0] >= 1) and np.all(n[sizes == 0] == 0)
    t = naive_waterfill(sizes * sigma + 0.0, b, (sizes > 0).astype(float), sizes.astype(float))
    assert np.all(np.abs(n - t) < 1.0 + 1e-9)
    assert np.array_equal(n, gl.probe_allocation(sizes, sigma, b))


def test_probe_allocation_is_neyman_when_no_bound_binds():
    sizes, sigma = np.array([1000, 2000, 1000, 4000]), np.array([0.2, 0.1, 0.4, 0.05])
    # N*sigma = 200, 200, 400, 200 -> shares 1/5, 1/5, 2/5, 1/5
    assert gl.probe_allocation(sizes, sigma, 50).tolist() == [10, 10, 20, 10]


def test_probe_allocation_edge_cases():
    # empty cluster gets 0, one-point cluster (sigma 0) still gets its one document
    assert gl.probe_allocation([0, 1, 100], [0.0, 0.0, 0.3], 10).tolist() == [0, 1, 9]
    # fewer probes than clusters: no floor, still exact and capped
    n = gl.probe_allocation([5, 5, 5, 5], [0.1, 0.2, 0.3, 0.4], 2)
    assert n.sum() == 2 and np.all(n <= 5)
    # every sigma zero: proportional to size
    assert gl.probe_allocation([10, 30], [0.0, 0.0], 8).tolist() == [2, 6]
    # the whole corpus
    assert gl.probe_allocation([3, 4], [0.5, 0.1], 7).tolist() == [3, 4]
    with pytest.raises(ValueError, match="b_probe"):
        gl.probe_allocation([3, 4], [0.5, 0.1], 8)


# ----------------------------------------------------------------------------- Eq. 5


@pytest.mark.parametrize("seed", SEEDS)
def test_baseline_budget_matches_formula(seed):
    _, sizes, sigma, quality = random_clusters(seed)
    b = 123_457
    got = gl.baseline_budget(sizes, sigma, quality, b)
    u = [
        (n * s) ** 0.5 * math.exp(q / 1.0) if n * s > 0 else 0.0
        for n, s, q in zip(sizes, sigma, quality, strict=True)
    ]
    ref = [b * x / sum(u) for x in u]
    np.testing.assert_allclose(got, ref, rtol=1e-10)
    assert got.sum() == pytest.approx(b) and np.all(got >= 0) and np.all(got[sizes == 0] == 0)


def test_baseline_budget_tau_and_temperature_and_overflow():
    sizes, sigma, q = np.array([100, 400]), np.array([0.5, 0.5]), np.array([0.0, 0.0])
    # tau=0.5 is square-root sampling: 4x the mass -> 2x the budget
    np.testing.assert_allclose(gl.baseline_budget(sizes, sigma, q, 300), [100, 200])
    np.testing.assert_allclose(gl.baseline_budget(sizes, sigma, q, 500, tau=1.0), [100, 400])
    # a huge Q/T must not overflow (log-space softmax)
    out = gl.baseline_budget(sizes, sigma, [1000.0, 0.0], 10, temperature=0.01)
    assert np.all(np.isfinite(out)) and out[0] == pytest.approx(10)
    # all sigma zero: N_k replaces N_k sigma_k
    np.testing.assert_allclose(gl.baseline_budget([1, 4], [0, 0], [0, 0], 3), [1, 2])
    with pytest.raises(ValueError, match="temperature"):
        gl.baseline_budget(sizes, sigma, q, 10, temperature=0)
    with pytest.raises(ValueError, match="every cluster is empty"):
        gl.baseline_budget([0, 0], [0, 0], [0, 0], 10)


# ----------------------------------------------------------------------------- Eq. 7


def test_replay_multiplier_matches_formula_and_bounds(rng):
    for _ in range(20):
        k = int(rng.integers(2, 40))
        d, q = rng.uniform(0.01, 3, size=k), rng.uniform(0, 1, size=k)
        r = gl.replay_multiplier(d, q)
        gate = q > gl.DEFAULT_QUALITY_THRESHOLD
        if not gate.any():
            np.testing.assert_array_equal(r, 1.0)
            continue
        ref = 1 + 2.0 * np.exp(-d / d[gate].mean()) * gate  # tau_norm over the open gates
        np.testing.assert_allclose(r, ref)
        assert np.all(r >= 1) and np.all(r <= 3)
    # the deficit cluster (small drop) gets more replay than the saturated one
    r = gl.replay_multiplier([0.1, 1.0], [0.9, 0.9])
    assert r[0] > r[1]


def test_replay_multiplier_fallbacks_never_nan():
    neutral = 1 + 2.0 / math.e
    q = [0.9, 0.9, 0.9]
    np.testing.assert_allclose(gl.replay_multiplier([0.5, 0.5, 0.5], q), [neutral] * 3)
    # a negative drop is the largest deficit: full replay
    r = gl.replay_multiplier([-0.2, 0.5, 1.0], q)
    assert r[0] == pytest.approx(3.0)
    # NaN / inf (failed probe) -> neutral; the others use the mean of the finite deltas
    r = gl.replay_multiplier([np.nan, 0.5, np.inf], q)
    assert r[0] == pytest.approx(neutral) and r[2] == pytest.approx(neutral)
    assert r[1] == pytest.approx(neutral)
    for d in ([np.nan] * 3, [0.0, 0.0, 0.0], [-1.0, -2.0, 0.0]):
        np.testing.assert_allclose(gl.replay_multiplier(d, q), [neutral] * 3)
    # a gated cluster's drop does not enter tau_norm: noise (drop ~0) cannot lower it
    a = gl.replay_multiplier([0.0, 0.5, 1.0], [0.1, 0.9, 0.9])
    b = gl.replay_multiplier([2.0, 0.5, 1.0], [0.1, 0.9, 0.9])
    np.testing.assert_array_equal(a, b)
    assert a[0] == 1.0 and a[1] == pytest.approx(1 + 2 * math.exp(-0.5 / 0.75))
    # every cluster below the quality gate: no replay at all
    np.testing.assert_array_equal(gl.replay_multiplier([0.1, 0.2, 3.0], [0.1, 0.2, 0.35]), [1, 1, 1])
    with pytest.raises(ValueError, match="quality"):
        gl.replay_multiplier([0.1, 0.2], [np.nan, 0.5])
    with pytest.raises(ValueError, match="alpha"):
        gl.replay_multiplier([0.1, 0.2], [0.5, 0.5], alpha=-1)


def test_replay_shrink_moves_gated_multipliers_linearly_toward_neutral(rng):
    neutral = 1 + 2.0 / math.e
    for _ in range(10):
        k = int(rng.integers(3, 20))
        d, q = rng.uniform(0.01, 3, size=k), rng.uniform(0, 1, size=k)
        full = gl.replay_multiplier(d, q)
        gate = q > gl.DEFAULT_QUALITY_THRESHOLD
        for s in (0.0, 0.3, 1.0):
            r = gl.replay_multiplier(d, q, shrink=s)
            want = np.where(gate, neutral + s * (full - neutral), 1.0)
            np.testing.assert_allclose(r, want)
    # shrink 0: Eq. 5's budgets for the gated clusters, the gate still closed for the others
    np.testing.assert_allclose(
        gl.replay_multiplier([0.1, 3.0, 1.0], [0.9, 0.9, 0.1], shrink=0.0), [neutral, neutral, 1]
    )
    for bad in (-0.1, 1.5, np.nan):
        with pytest.raises(ValueError, match="shrink"):
            gl.replay_multiplier([0.1, 0.2], [0.5, 0.5], shrink=bad)


# ----------------------------------------------------------------------------- Eq. 8


@pytest.mark.parametrize("seed", SEEDS)
def test_allocate_invariants_over_seeds(seed):
    rng, sizes, sigma, quality = random_clusters(seed)
    b = int(rng.integers(1, 3 * sizes.sum()))  # up to 3x the corpus: replay
    base = gl.baseline_budget(sizes, sigma, quality, b)
    r = gl.replay_multiplier(rng.uniform(0, 2, size=len(sizes)), quality)
    n = gl.allocate(base, r, b)
    assert n.dtype.kind == "i" and n.sum() == b and np.all(n >= 0)
    assert np.all(n[base == 0] == 0)
    assert n.tolist() == naive_largest_remainder((base * r).tolist(), b)
    assert np.array_equal(n, gl.allocate(base, r, b))


def test_allocate_budget_larger_than_corpus_means_replay():
    sizes, sigma, q = np.array([10, 10]), np.array([0.3, 0.3]), np.array([0.5, 0.5])
    n = gl.allocate(gl.baseline_budget(sizes, sigma, q, 50), [1.0, 3.0], 50)
    assert n.tolist() == [13, 37] and n[1] > sizes[1]


def test_allocate_errors():
    with pytest.raises(ValueError, match="zero for every cluster"):
        gl.allocate([0.0, 0.0], [1.0, 1.0], 5)
    with pytest.raises(ValueError, match="b_total"):
        gl.allocate([1.0, 1.0], [1.0, 1.0], 2.5)
    assert gl.allocate([0.0, 0.0], [1.0, 1.0], 0).tolist() == [0, 0]


# ----------------------------------------------------------------------------- API contract


@pytest.mark.parametrize(
    "fn,kwargs,name",
    [
        (gl.probe_allocation, dict(sizes=[1, 2], sigma=[np.nan, 0.1], b_probe=2), "sigma"),
        (gl.probe_allocation, dict(sizes=[1, np.inf], sigma=[0.1, 0.1], b_probe=2), "sizes"),
        (gl.baseline_budget, dict(sizes=[1, 2], sigma=[0.1, 0.1], quality=[0, np.inf], b_total=3), "quality"),
        (gl.baseline_budget, dict(sizes=[1, 2], sigma=[0.1, 0.1], quality=[0, 0], b_total=np.nan), "b_total"),
        (
            gl.baseline_budget,
            dict(sizes=[1, 2], sigma=[0.1, 0.1], quality=[0, 0], b_total=3, tau=np.inf),
            "tau",
        ),
        (gl.allocate, dict(base=[1.0, np.nan], replay=[1, 1], b_total=3), "base"),
        (gl.allocate, dict(base=[1.0, 1.0], replay=[1, -np.inf], b_total=3), "replay"),
        (gl.replay_multiplier, dict(delta=[0.1, 0.2], quality=[0.5, 0.5], alpha=np.nan), "alpha"),
    ],
)
def test_non_finite_inputs_raise_naming_the_argument(fn, kwargs, name):
    with pytest.raises(ValueError, match=f"^{name}"):
        fn(**kwargs)


def test_paper_defaults_are_the_function_defaults():
    def defaults(fn):
        return {k: p.default for k, p in inspect.signature(fn).parameters.items() if p.default is not p.empty}

    assert defaults(gl.baseline_budget) == {"tau": 0.5, "temperature": 1.0}
    assert defaults(gl.replay_multiplier) == {
        "alpha": 2.0,
        "quality_threshold": gl.DEFAULT_QUALITY_THRESHOLD,
        "shrink": 1.0,  # Eq. 7 as written; the callback passes the probe reliability's shrink
    }
    assert defaults(gl.selection_weights) == {"beta": 0.3}
    assert defaults(gl.kernel_density)["k"] == 10 and defaults(gl.kernel_density)["bandwidth"] is None
