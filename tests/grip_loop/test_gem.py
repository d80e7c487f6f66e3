"""GEM clustering (`grip_loop.cluster.fit_gem`): the MM objective never decreases, one MM step
equals a naive, loop-by-loop implementation of the same update, the student agrees with the
teacher, and degenerate input fails clearly or takes the documented K = 1 fallback."""

import math

import numpy as np
import pytest

from grip_loop import cluster
from grip_loop import gem as C
from tests.conftest import unit_rows


def _cone(seed, n=240, d=8, groups=4, spread=0.35):
    """Unit rows in a cone around e_0, in `groups` planted groups of unequal size."""
    rng = np.random.default_rng(seed)
    sizes = np.array([0.5, 0.25, 0.15, 0.1][:groups]) * n
    truth = np.repeat(np.arange(groups), sizes.astype(int))
    means = rng.normal(size=(groups, d))
    means[:, 0] = 3.0
    x = means[truth] + spread * rng.normal(size=(len(truth), d))
    return unit_rows(x), truth


def test_log_bessel_matches_scipy():
    ive = pytest.importorskip("scipy.special").ive
    for d, tol in ((3, 0.1), (4, 0.015), (8, 1e-3), (16, 1e-4), (64, 1e-6), (384, 1e-8)):
        nu = d / 2 - 1
        kappa = np.geomspace(1e-3, 1e4, 60)
        with np.errstate(divide="ignore"):
            exact = np.log(ive(nu, kappa)) + kappa
        ok = np.isfinite(exact)  # scipy underflows at large d and small kappa; ours does not
        assert ok.sum() >= 20
        assert np.max(np.abs(C.log_bessel_iv(nu, kappa)[ok] - exact[ok])) < tol
        assert np.all(np.isfinite(C.log_bessel_iv(nu, kappa)))
        # the scalar version used by the kappa search is the same function
        for kap in (1e-3, 1.0, 50.0, 1e4):
            assert C._vmf_log_norm_scalar(d, kap) == pytest.approx(float(C.vmf_log_norm(d, kap)), abs=1e-9)


@pytest.mark.parametrize("seed", [0, 1, 2, 3])
def test_balanced_weights_is_the_argmax_on_the_simplex(seed):
    rng = np.random.default_rng(seed)
    a = rng.dirichlet(np.full(6, 0.4))
    a[rng.integers(6)] = 0.0  # an empty component
    a /= a.sum()
    lam = float(rng.uniform(0.05, 3.0))

    def f(p):
        with np.errstate(divide="ignore", invalid="ignore"):
            return float(np.where(a > 0, a * np.log(p), 0).sum() - lam * (p * np.log(p)).sum())

    pi = C.balanced_weights(a, lam)
    assert pi.sum() == pytest.approx(1.0) and np.all(pi > 0)
    # naive reference: no random point of the simplex, and no small move from pi, does better
    for q in rng.dirichlet(np.ones(6), size=2000):
        assert f(q) <= f(pi) + 1e-12
    for _ in range(200):
        q = np.abs(pi + 1e-4 * rng.normal(size=6))
        assert f(q / q.sum()) <= f(pi) + 1e-12
    assert np.allclose(C.balanced_weights(a, 0.0), a)
    # more balance, flatter weights
    assert C._entropy(C.balanced_weights(a, 10 * lam)) > C._entropy(pi) > C._entropy(a)


@pytest.mark.parametrize("seed", [0, 1, 2])
@pytest.mark.parametrize("balance", [0.0, 0.5, 3.0])
def test_mm_objective_never_decreases(seed, balance):
    x, _ = _cone(seed)
    t = C.fit_gem_teacher(x, 5, balance=balance, niter=60, tol=0.0, seed=seed)
    h = np.array(t.objective)
    assert len(h) == 61 and np.all(np.isfinite(h))
    assert np.all(np.diff(h) >= -1e-12 * (1 + np.abs(h[:-1]))), np.diff(h).min()
    assert h[-1] > h[0]  # it did something
    assert np.allclose(np.linalg.norm(t.mu, axis=1), 1) and t.pi.sum() == pytest.approx(1)
    assert C.KAPPA_MIN <= t.kappa <= C.KAPPA_MAX


def _naive_step(x, mu, kappa, pi, balance):
    """The MM update written point by point and component by component; pi by a generic
    optimiser on the simplex, kappa by a dense grid then a fine one."""
    from scipy.optimize import minimize

    n, d = x.shape
    k = len(pi)
    log_c = math.log(float(np.exp(C.vmf_log_norm(d, kappa))))
    r = np.zeros((n, k))
    for i in range(n):
        terms = [math.log(pi[j]) + log_c + kappa * float(np.dot(mu[j], x[i])) for j in range(k)]
        top = max(terms)
        z = sum(math.exp(t - top) for t in terms)
        for j in range(k):
            r[i, j] = math.exp(terms[j] - top) / z
    new_mu = np.zeros_like(mu)
    rbar = 0.0
    for j in range(k):
        s = sum(r[i, j] * x[i] for i in range(n))
        new_mu[j] = s / np.linalg.norm(s)
        rbar += np.linalg.norm(s) / n
    grid = np.exp(np.linspace(math.log(C.KAPPA_MIN), math.log(C.KAPPA_MAX), 20001))
    vals = C.vmf_log_norm(d, grid) + grid * rbar
    g0 = int(np.argmax(vals))
    fine = np.exp(
        np.linspace(math.log(grid[max(g0 - 1, 0)]), math.log(grid[min(g0 + 1, len(grid) - 1)]), 20001)
    )
    new_kappa = float(fine[np.argmax(C.vmf_log_norm(d, fine) + fine * rbar)])
    a = r.sum(axis=0) / n

    def neg(z):
        p = np.exp(z - z.max())
        p /= p.sum()
        return -(float(np.sum(a * np.log(p))) - balance * float(np.sum(p * np.log(p))))

    res = minimize(neg, np.log(a), method="BFGS", options={"gtol": 1e-12, "maxiter": 10_000})
    p = np.exp(res.x - res.x.max())
    return new_mu, new_kappa, p / p.sum()


@pytest.mark.parametrize("seed", [0, 1])
def test_mm_step_equals_naive_reference(seed):
    pytest.importorskip("scipy")
    x, _ = _cone(seed, n=60, d=5, groups=3)
    rng = np.random.default_rng(seed)
    mu = x[C.spherical_kmeanspp(x, 3, rng)]
    kappa, pi, balance = 7.0, np.array([0.5, 0.3, 0.2]), 0.8
    for _ in range(3):
        fast = C.mm_step(x, mu, kappa, pi, balance)
        slow = _naive_step(x, mu, kappa, pi, balance)
        assert np.allclose(fast[0], slow[0], atol=1e-10)
        assert fast[1] == pytest.approx(slow[1], rel=1e-5)
        assert np.allclose(fast[2], slow[2], atol=1e-6)
        mu, kappa, pi = fast


def test_student_agrees_with_teacher_and_streams_in_blocks():
    x, truth = _cone(4, n=400, d=8)
    r = cluster.fit_gem(x, 4, seed=0, balance=1.0, heldout=0.25)
    assert r.n_heldout == 100 and r.agreement >= 0.95
    # naive reference for the assignment: argmax of the student's logits, row by row
    naive = np.array([int(np.argmax(row @ r.student.w + r.student.b)) for row in x])
    assert np.array_equal(r.labels, naive)
    assert np.array_equal(r.student.predict(x, block=7), r.labels)
    assert np.array_equal(r.student.predict(3.0 * x, block=64), r.labels)  # rows are normalised
    # the teacher's own posterior argmax labels (almost) the same on the whole set
    assert np.mean(np.argmax(r.teacher.log_posterior(x), 1) == r.labels) >= 0.95
    assert r.centroids.dtype == np.float32 and np.allclose(np.linalg.norm(r.centroids, axis=1), 1, atol=1e-6)
    s = r.stats()
    assert s["method"] == "gem" and s["student_agreement"] == pytest.approx(r.agreement, abs=1e-6)


def test_deterministic_for_a_seed_and_sampled_fit():
    x, _ = _cone(5, n=300)
    c1, l1 = cluster.gem_cluster(x, 4, seed=3, sample_size=120)
    c2, l2 = cluster.gem_cluster(x, 4, seed=3, sample_size=120)
    assert np.array_equal(c1, c2) and np.array_equal(l1, l2) and len(l1) == 300


def test_balance_flattens_the_mixing_weights():
    x, _ = _cone(6, n=300)
    w0 = C.fit_gem_teacher(x, 4, balance=0.0, seed=0).pi
    w1 = C.fit_gem_teacher(x, 4, balance=5.0, seed=0).pi
    assert C._entropy(w1) > C._entropy(w0)


# --- degenerate input --------------------------------------------------------------------


def test_k_one_is_the_normalised_mean():
    x, _ = _cone(7, n=50)
    centroids, labels = cluster.gem_cluster(x, 1)
    m = x.sum(0)
    assert np.allclose(centroids[0], m / np.linalg.norm(m), atol=1e-6)
    assert np.array_equal(labels, np.zeros(len(x), np.int64))
    # antipodal points: the mean is 0, the first row stands in (never NaN)
    pts = np.array([[1.0, 0, 0], [-1.0, 0, 0]])
    c, lab = cluster.gem_cluster(pts, 1)
    assert np.all(np.isfinite(c)) and np.allclose(c[0], pts[0])


def test_identical_embeddings_and_too_few_distinct_points_are_errors():
    same = np.tile(unit_rows(np.ones((1, 8))), (20, 1))
    with pytest.raises(ValueError, match=r"emb: .*only 1 distinct.*lower k to at most 1"):
        cluster.gem_cluster(same, 2)
    c, lab = cluster.gem_cluster(same, 1)  # K = 1 on identical rows is fine
    assert np.allclose(c[0], same[0]) and not lab.any()
    three = np.repeat(np.eye(8)[:3], 5, axis=0)
    with pytest.raises(ValueError, match="only 3 distinct"):
        cluster.gem_cluster(three, 4)
    _, lab = cluster.gem_cluster(three, 3)
    assert len(set(zip(lab.tolist(), np.repeat([0, 1, 2], 5).tolist(), strict=True))) == 3


@pytest.mark.parametrize(
    ("emb", "k", "match"),
    [
        (np.array([[1.0, 0, 0], [np.nan, 0, 0], [0, 1.0, 0]]), 2, "emb: contains non-finite"),
        (np.array([[1.0, 0, 0], [np.inf, 0, 0]]), 1, "emb: contains non-finite"),
        (np.array([[1.0, 0, 0], [0, 0, 0], [0, 1.0, 0]]), 2, "emb: row 1 is all zeros"),
        (np.eye(3), 4, "k: need"),
        (np.eye(3), 0, "k: need"),
        (np.eye(2), 2, "dimension >= 3"),
    ],
)
def test_bad_input_names_the_argument(emb, k, match):
    with pytest.raises(ValueError, match=match):
        cluster.gem_cluster(emb, k)


def test_bad_balance_is_an_error():
    with pytest.raises(ValueError, match="balance"):
        cluster.gem_cluster(np.eye(4), 2, balance=-1.0)
    with pytest.raises(ValueError, match="balance"):
        cluster.gem_cluster(np.eye(4), 2, balance=float("nan"))


def test_a_starved_component_keeps_a_finite_direction():
    # two tight groups and K = 3 with no balance: one component ends up with ~no mass
    x = unit_rows(np.repeat(np.eye(4)[:2], 30, axis=0) + 1e-3 * np.random.default_rng(0).normal(size=(60, 4)))
    t = C.fit_gem_teacher(x, 3, balance=0.0, niter=200, seed=0)
    assert np.all(np.isfinite(t.mu)) and np.allclose(np.linalg.norm(t.mu, axis=1), 1)
    assert np.all(np.isfinite(t.objective)) and np.all(
        np.diff(t.objective) >= -1e-12 * (1 + np.abs(t.objective[-1]))
    )
