"""The repetition guard (`budget.repetition_capped`, `modes.allocation`): a naive reference
over many seeds, the cap holds, totals are exact, and the infeasible cases are documented."""

from __future__ import annotations

import math

import numpy as np
import pytest

from grip_loop.budget import apportion, repetition_capped, stream_passes
from grip_loop.modes import BudgetConfig, RepetitionGuard, allocation, repetition_infeasible
from tests.grip_loop.test_budget import naive_waterfill

SEEDS = range(40)


def naive_bounded_hamilton(w, total, lo, hi):
    """floor of the water-filled targets, then +1 to the largest remainders below their cap."""
    t = naive_waterfill(w, total, lo, hi)
    n = [math.floor(x + 1e-9) for x in t]
    order = sorted((i for i in range(len(w)) if n[i] < hi[i]), key=lambda i: (-(t[i] - n[i]), i))
    for i in order[: total - sum(n)]:
        n[i] += 1
    return n


def naive_guard(w, total, sizes, c, run_tokens, r):
    """The documented rule, in plain Python: caps floor(R N_k S / T) from a non-increasing S."""
    k = len(w)
    n = naive_bounded_hamilton(w, total, [0.0] * k, [math.inf] * k)
    s_used = sum(a * b for a, b in zip(n, c, strict=True))
    caps = None
    while True:
        new = [math.floor(r * sizes[i] * s_used / run_tokens) for i in range(k)]
        if new == caps:
            return n
        caps = new
        if sum(caps) < total:
            return None
        n = naive_bounded_hamilton(w, total, [0.0] * k, [float(x) for x in caps])
        s_used = min(s_used, sum(a * b for a, b in zip(n, c, strict=True)))


def random_case(seed):
    rng = np.random.default_rng(seed)
    k = int(rng.integers(2, 20))
    sizes = rng.integers(1, 400, size=k)
    w = rng.uniform(0.05, 5, size=k) * sizes  # replay-like: big weights on some small clusters
    w[rng.integers(0, k)] *= 20
    c = rng.uniform(50, 3000, size=k)
    total = int(sizes.sum())
    corpus_tokens = float((sizes * c).sum())
    r = float(rng.choice([1.0, 2.0, 4.0]))
    run_tokens = corpus_tokens * r * float(rng.uniform(0.3, 0.95))  # feasible: under R corpus passes
    return w, total, sizes, c, run_tokens, r


@pytest.mark.parametrize("seed", SEEDS)
def test_guard_matches_a_naive_reference_and_holds_the_cap(seed):
    w, total, sizes, c, run_tokens, r = random_case(seed)
    n, capped, infeasible = repetition_capped(w, total, sizes, c, run_tokens, r)
    assert not infeasible
    assert n.sum() == total and np.all(n >= 0)
    ref = naive_guard(w.tolist(), total, sizes.tolist(), c.tolist(), run_tokens, r)
    if ref is not None:  # the naive rule found a split: the same integers
        assert n.tolist() == ref
        passes = stream_passes(n, sizes, c, run_tokens)
        assert passes.max() <= r + 1e-9, (passes.max(), r)
    else:  # the documented fallback: n_k ~ N_k, the most even passes
        assert n.tolist() == apportion(sizes.astype(float), total).tolist()
    free = apportion(w, total)
    # capped clusters lost budget, and only they; everyone else gained (or kept) theirs
    assert np.all(n[capped] < free[capped])
    if ref is not None:
        assert np.all(n[~capped] >= free[~capped])


def test_guard_is_a_no_op_when_the_cap_does_not_bind():
    for seed in SEEDS:
        w, total, sizes, c, run_tokens, _ = random_case(seed)
        n, capped, _ = repetition_capped(w, total, sizes, c, run_tokens, 1e6)
        assert n.tolist() == apportion(w, total).tolist() and not capped.any()


def test_small_cluster_is_capped_and_its_excess_shared_in_proportion():
    # cluster 0 has 10 documents and a huge weight; 3 clusters of equal length
    sizes, c = np.array([10, 100, 100]), np.full(3, 100.0)
    w = np.array([100.0, 1.0, 4.0])
    run_tokens = 2.0 * (sizes * c).sum()  # the run reads the corpus twice
    n, capped, infeasible = repetition_capped(w, 210, sizes, c, run_tokens, 4.0)
    assert capped.tolist() == [True, False, False] and not infeasible
    # S = 210 * 100 documents-tokens, cap of cluster 0 = floor(4 * 10 * 21000 / 42000) = 20
    assert n.tolist() == [20, 38, 152]  # the other 190 split 1:4
    assert stream_passes(n, sizes, c, run_tokens)[0] == pytest.approx(4.0)


def test_all_capped_falls_back_to_even_passes_and_flags_infeasible():
    sizes, c = np.array([10, 20, 30]), np.array([100.0, 50.0, 10.0])
    corpus = float((sizes * c).sum())
    # 5 passes over the whole corpus: no split keeps every cluster under 4
    n, capped, infeasible = repetition_capped([1.0, 1.0, 1.0], 60, sizes, c, 5 * corpus, 4.0)
    assert infeasible and capped.tolist() == [True, False, False]  # only cluster 0 is cut (20 -> 10)
    assert n.tolist() == [10, 20, 30]  # n_k ~ N_k: every cluster read 5 times
    np.testing.assert_allclose(stream_passes(n, sizes, c, 5 * corpus), 5.0)
    guard = RepetitionGuard(tuple(sizes), tuple(c), 5 * corpus, 4.0)
    why = repetition_infeasible(guard)
    assert why.startswith("budget.max_repetition: ") and "5.00 passes over the whole corpus" in why
    assert "guard is off for this run" in why
    assert repetition_infeasible(RepetitionGuard(tuple(sizes), tuple(c), 3 * corpus, 4.0)) is None


def test_allocation_with_floor_and_guard_keeps_both_bounds():
    sizes = np.array([5, 50, 50, 0])
    c = np.array([10.0, 10.0, 10.0, 10.0])
    guard = RepetitionGuard(tuple(sizes), tuple(c), 2.0 * 105 * 10, 3.0)
    a = allocation([80.0, 10.0, 10.0, 0.0], [3.0, 1.0, 1.0, 1.0], 105, sizes=sizes, floor=0.05, guard=guard)
    assert a.n.sum() == 105 and a.n[3] == 0 and np.all(a.n[:3] >= 6)
    assert a.capped.tolist() == [True, False, False, False]
    assert stream_passes(a.n, sizes, c, guard.run_tokens).max() <= 3.0 + 1e-9


def test_budget_config_validates_max_repetition():
    assert BudgetConfig().max_repetition == 4.0
    assert BudgetConfig(max_repetition=None).max_repetition is None
    for bad in (0, -1, float("nan"), True, "4"):
        with pytest.raises(ValueError, match="max_repetition"):
            BudgetConfig(max_repetition=bad)


def test_guard_rejects_bad_inputs_naming_them():
    with pytest.raises(ValueError, match="doc_tokens"):
        repetition_capped([1, 1], 2, [1, 1], [0.0, 1.0], 10, 1)
    with pytest.raises(ValueError, match="run_tokens"):
        repetition_capped([1, 1], 2, [1, 1], [1.0, 1.0], 0, 1)
    with pytest.raises(ValueError, match="max_repetition"):
        repetition_capped([1, 1], 2, [1, 1], [1.0, 1.0], 10, 0)
