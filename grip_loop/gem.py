"""GEM's teacher: a balanced mixture of von Mises-Fisher components fitted by
Minorize-Maximize (the model, the objective and the MM steps are derived in the comment
below). `grip_loop.cluster.fit_gem` fits it on a sample and distils it to a linear student
that labels every document."""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

# ---------------------------------------------------------------------------------------
# GEM: a balanced mixture of von Mises-Fisher components, fitted by Minorize-Maximize
#
# Model. Unit vectors x_i in R^d (d >= 3); K components with unit mean directions mu_k, one
# concentration kappa shared by every component, mixing weights pi on the simplex:
#
#     p(x) = sum_k pi_k C_d(kappa) exp(kappa mu_k . x),
#     C_d(kappa) = kappa^nu / ((2 pi)^(d/2) I_nu(kappa)),  nu = d/2 - 1.
#
# Objective (per point; `objective` computes exactly this):
#
#     F(theta) = (1/n) sum_i log p(x_i) + lambda H(pi),   H(pi) = -sum_k pi_k log pi_k,
#
# lambda = `balance` >= 0. The entropy bonus is the mixing-balance regulariser: it is maximal
# at uniform weights, and since pi_k enters every point's posterior as log pi_k, it keeps
# small components from starving (a component that loses mass loses prior, then loses more
# points: the collapse spherical k-means shows on anisotropic embeddings).
#
# Why one shared kappa: with per-component kappa_k, a component that captures a handful of
# near-duplicates drives kappa_k -> infinity and the likelihood up without bound (a known
# degeneracy of vMF mixtures); a shared kappa has no such optimum, and the posterior
# log pi_k + kappa mu_k . x ranks components by cosine plus prior, like a soft, prior-aware
# spherical k-means.
#
# MM. Jensen's inequality with the current posteriors r_ik gives a minoriser of F that
# touches it at the current parameters and separates into a (mu, kappa) part and a pi part,
# each maximised exactly (block-wise):
#   mu_k    = normalise(sum_i r_ik x_i)                        (closed form)
#   kappa   = argmax log C_d(kappa) + kappa * Rbar,  Rbar = (1/n) sum_k |sum_i r_ik x_i|
#             (1-d, golden section on log kappa in [KAPPA_MIN, KAPPA_MAX], on the same
#             approximate log C_d that F uses)
#   pi      = argmax sum_k a_k log pi_k + lambda H(pi),  a_k = (1/n) sum_i r_ik
#             (concave; stationarity a_k/pi_k - lambda log pi_k = c, solved by nested bisection;
#             lambda = 0 gives pi = a, plain EM)
# Every block update is accepted only if it does not lower its part of the minoriser (a
# numerical safeguard: the 1-d searches are approximate), so F never decreases:
# F(theta_{t+1}) >= Q(theta_{t+1} | theta_t) >= Q(theta_t | theta_t) = F(theta_t).
#
# log I_nu: the uniform (Debye) asymptotic expansion with two correction terms,
#     log I_nu(nu z) ~ nu eta - log(2 pi nu)/2 - log(1 + z^2)/4 + log(1 + u1(t)/nu + u2(t)/nu^2),
#     eta = sqrt(1 + z^2) + log(z / (1 + sqrt(1 + z^2))),  t = 1 / sqrt(1 + z^2),
# in log space, so it neither overflows nor underflows for d in the thousands and kappa in
# [1e-6, 1e6] (scipy's `ive` underflows to 0 at d = 384, kappa < ~30). Absolute error in
# log I_nu: < 1e-4 for d >= 8, < 2e-3 for d = 3 (tests/grip_loop/test_gem.py, against scipy).
# F uses the same approximation everywhere, so the monotonicity holds for the F computed.

KAPPA_MIN, KAPPA_MAX = 1e-6, 1e6


def log_bessel_iv(nu: float, kappa):
    """log I_nu(kappa) for nu > 0 and kappa > 0: the uniform asymptotic (Debye) expansion with
    two correction terms (see the comment above); vectorised over `kappa`."""
    kappa = np.asarray(kappa, np.float64)
    z = kappa / nu
    s = np.sqrt(1.0 + z * z)
    t = 1.0 / s
    t2 = t * t
    u1 = t * (3.0 - 5.0 * t2) / 24.0
    u2 = t2 * (81.0 - 462.0 * t2 + 385.0 * t2 * t2) / 1152.0
    eta = s + np.log(z / (1.0 + s))
    return nu * eta - 0.5 * np.log(2.0 * np.pi * nu) - 0.5 * np.log(s) + np.log1p(u1 / nu + u2 / nu**2)


def vmf_log_norm(d: int, kappa):
    """log C_d(kappa), the vMF normaliser on the unit sphere of R^d (d >= 3)."""
    nu = d / 2.0 - 1.0
    kappa = np.asarray(kappa, np.float64)
    return nu * np.log(kappa) - (d / 2.0) * np.log(2.0 * np.pi) - log_bessel_iv(nu, kappa)


def _logsumexp(a: np.ndarray, axis: int) -> np.ndarray:
    m = np.max(a, axis=axis, keepdims=True)
    return (m + np.log(np.sum(np.exp(a - m), axis=axis, keepdims=True))).squeeze(axis)


def _entropy(pi: np.ndarray) -> float:
    p = pi[pi > 0]
    return float(-(p * np.log(p)).sum())


def _log_joint(x: np.ndarray, mu: np.ndarray, kappa: float, pi: np.ndarray) -> np.ndarray:
    """(n, K): log pi_k + log C_d(kappa) + kappa mu_k . x_i (-inf where pi_k = 0)."""
    with np.errstate(divide="ignore"):
        log_pi = np.log(pi)
    return log_pi[None, :] + float(vmf_log_norm(x.shape[1], kappa)) + kappa * (x @ mu.T)


def gem_objective(x: np.ndarray, mu: np.ndarray, kappa: float, pi: np.ndarray, balance: float) -> float:
    """F(theta): mean log-likelihood of the rows of `x` plus `balance` x entropy of `pi`."""
    return float(_logsumexp(_log_joint(x, mu, kappa, pi), 1).mean()) + balance * _entropy(pi)


def _golden_max(f, lo: float, hi: float, iters: int = 90) -> float:
    g = (np.sqrt(5.0) - 1.0) / 2.0
    a, b = lo, hi
    c, d = b - g * (b - a), a + g * (b - a)
    fc, fd = f(c), f(d)
    for _ in range(iters):
        if fc >= fd:
            b, d, fd = d, c, fc
            c = b - g * (b - a)
            fc = f(c)
        else:
            a, c, fc = c, d, fd
            d = a + g * (b - a)
            fd = f(d)
    return c if fc >= fd else d


def _vmf_log_norm_scalar(d: int, kappa: float) -> float:
    """`vmf_log_norm` for one float, with `math` (the 1-d kappa search calls it ~100 times)."""
    nu = d / 2.0 - 1.0
    z = kappa / nu
    s = math.sqrt(1.0 + z * z)
    t2 = 1.0 / (s * s)
    t = math.sqrt(t2)
    u1 = t * (3.0 - 5.0 * t2) / 24.0
    u2 = t2 * (81.0 - 462.0 * t2 + 385.0 * t2 * t2) / 1152.0
    log_iv = (
        nu * (s + math.log(z / (1.0 + s)))
        - 0.5 * math.log(2.0 * math.pi * nu)
        - 0.5 * math.log(s)
        + math.log1p(u1 / nu + u2 / nu**2)
    )
    return nu * math.log(kappa) - (d / 2.0) * math.log(2.0 * math.pi) - log_iv


def _best_kappa(d: int, rbar: float) -> float:
    """argmax over kappa of log C_d(kappa) + kappa * rbar (rbar = mean resultant length)."""
    u = _golden_max(
        lambda u: _vmf_log_norm_scalar(d, math.exp(u)) + math.exp(u) * rbar,
        math.log(KAPPA_MIN),
        math.log(KAPPA_MAX),
    )
    return math.exp(u)


def _wright_omega(z: np.ndarray) -> np.ndarray:
    """omega(z) = W(e^z), the solution w > 0 of w + log w = z (vectorised; Newton from an
    asymptotic start: e^z for z < 1, z - log z above; 3 steps of Halley's method suffice to
    reach float64 precision from there, 6 are taken)."""
    z = np.asarray(z, np.float64)
    w = np.where(z < 1.0, np.exp(np.minimum(z, 1.0)), z - np.log(np.maximum(z, 1.0)))
    w = np.maximum(w, 1e-300)
    for _ in range(6):
        f = w + np.log(w) - z
        f1 = 1.0 + 1.0 / w
        f2 = -1.0 / (w * w)
        w = np.maximum(w - f / (f1 - 0.5 * f * f2 / f1), w * 1e-3)
    return w


def balanced_weights(a: np.ndarray, balance: float, iters: int = 100) -> np.ndarray:
    """argmax over the simplex of sum_k a_k log pi_k + balance * H(pi), for a_k >= 0 summing
    to 1 (concave). Stationarity: a_k / pi_k - balance * log pi_k = c. For a given c that is
    pi_k = a_k / (balance * omega(c / balance + log(a_k / balance))) (omega = W(e^z), Wright's
    omega; pi_k = exp(-c / balance) where a_k = 0), decreasing in c; c is found by bisection so
    that sum_k pi_k = 1."""
    a = np.asarray(a, np.float64)
    if balance == 0:
        return a / a.sum()
    lam = float(balance)
    pos = a > 0
    log_a = np.log(np.where(pos, a, 1.0) / lam)

    def pis(c: float) -> np.ndarray:
        w = _wright_omega(c / lam + log_a)
        return np.where(pos, a / (lam * w), np.exp(-c / lam))

    # every pi_k(c) >= 1 for c <= min a_k; every pi_k(c) <= 1/K for c >= max_k(a_k K + lam log K).
    # Newton on S(c) = sum_k pi_k(c) - 1 (dpi_k/dc = -pi_k^2 / (a_k + lam pi_k)), kept inside
    # the bisection bracket.
    k = len(a)
    c_lo, c_hi = float(a.min()) - 1e-9, float((a * k).max() + lam * np.log(k)) + 1e-9
    c = 0.5 * (c_lo + c_hi)
    for _ in range(iters):
        pi = pis(c)
        excess = pi.sum() - 1.0
        if abs(excess) <= 1e-14:
            break
        if excess > 0:
            c_lo = c
        else:
            c_hi = c
        slope = -float((pi * pi / (a + lam * pi)).sum())
        c_new = c - excess / slope if slope < 0 else 0.5 * (c_lo + c_hi)
        c = c_new if c_lo < c_new < c_hi else 0.5 * (c_lo + c_hi)
    pi = pis(c)
    return pi / pi.sum()


def _pi_part(a: np.ndarray, pi: np.ndarray, balance: float) -> float:
    with np.errstate(divide="ignore", invalid="ignore"):
        t = np.where(a > 0, a * np.log(pi), 0.0)
    return float(t.sum()) + balance * _entropy(pi)


def spherical_kmeanspp(x: np.ndarray, k: int, rng: np.random.Generator) -> np.ndarray:
    """k-means++ seeding on the sphere: indices of k rows of unit rows `x`, each next one drawn
    with probability proportional to its cosine distance 1 - max cos to the seeds so far."""
    n = len(x)
    chosen = [int(rng.integers(n))]
    dist = np.clip(1.0 - x @ x[chosen[0]], 0.0, None)
    for _ in range(1, k):
        total = dist.sum()
        if total <= 0:  # every point coincides with a seed: callers check distinctness first
            raise ValueError(f"emb: fewer than k={k} distinct points to seed from")
        i = int(rng.choice(n, p=dist / total))
        chosen.append(i)
        dist = np.minimum(dist, np.clip(1.0 - x @ x[i], 0.0, None))
    return np.array(chosen, np.int64)


@dataclass
class GEMTeacher:
    """A fitted balanced vMF mixture (the teacher): directions, shared kappa, weights, and the
    objective after initialisation and after every MM iteration."""

    mu: np.ndarray  # (K, d) unit rows
    kappa: float
    pi: np.ndarray  # (K,)
    balance: float
    objective: list[float]
    n_iter: int

    def log_posterior(self, x: np.ndarray) -> np.ndarray:
        j = _log_joint(np.asarray(x, np.float64), self.mu, self.kappa, self.pi)
        return j - _logsumexp(j, 1)[:, None]


def mm_step(x: np.ndarray, mu: np.ndarray, kappa: float, pi: np.ndarray, balance: float):
    """One MM iteration (E-step posteriors, then block-wise maximisation of the minoriser):
    returns (mu, kappa, pi)."""
    n, d = x.shape
    j = _log_joint(x, mu, kappa, pi)
    r = np.exp(j - _logsumexp(j, 1)[:, None])  # (n, K) posteriors at the current parameters
    s = r.T @ x  # (K, d) weighted resultants
    norms = np.linalg.norm(s, axis=1)
    ok = norms > 1e-12 * max(1.0, float(norms.max(initial=0.0)))
    new_mu = mu.copy()  # a component with no mass keeps its direction (never NaN)
    new_mu[ok] = s[ok] / norms[ok, None]

    def mu_kappa_part(m: np.ndarray, kap: float) -> float:
        return float(vmf_log_norm(d, kap)) + kap * float(np.einsum("kd,kd->", s, m)) / n

    if mu_kappa_part(new_mu, kappa) < mu_kappa_part(mu, kappa):
        new_mu = mu
    rbar = float(np.einsum("kd,kd->", s, new_mu)) / n
    new_kappa = _best_kappa(d, max(rbar, 0.0))
    if mu_kappa_part(new_mu, new_kappa) < mu_kappa_part(new_mu, kappa):
        new_kappa = kappa
    a = r.sum(axis=0) / n
    new_pi = balanced_weights(a, balance)
    if _pi_part(a, new_pi, balance) < _pi_part(a, pi, balance):
        new_pi = pi
    return new_mu, new_kappa, new_pi


def fit_gem_teacher(
    x: np.ndarray,
    k: int,
    *,
    balance: float = 1.0,
    niter: int = 100,
    tol: float = 1e-7,
    seed: int = 0,
    init: np.ndarray | None = None,
) -> GEMTeacher:
    """Fit the balanced vMF mixture to the unit rows `x` (float64, d >= 3, at least k distinct
    rows; `_sample_checked` enforces it) from spherical k-means++ seeds (or `init`, (K, d)):
    uniform weights and the best shared kappa for the seeds' hard assignment; then MM until the
    objective gains less than tol * (1 + |F|) in an iteration, or `niter` iterations."""
    x = np.asarray(x, np.float64)  # float32 products round at ~1e-7 x kappa: F would wobble
    n, d = x.shape
    rng = np.random.default_rng(seed)
    mu = x[spherical_kmeanspp(x, k, rng)].copy() if init is None else np.asarray(init, np.float64).copy()
    pi = np.full(k, 1.0 / k)
    kappa = _best_kappa(d, max(float((x @ mu.T).max(axis=1).mean()), 0.0))
    hist = [gem_objective(x, mu, kappa, pi, balance)]
    for _ in range(niter):
        mu, kappa, pi = mm_step(x, mu, kappa, pi, balance)
        hist.append(gem_objective(x, mu, kappa, pi, balance))
        if hist[-1] - hist[-2] < tol * (1.0 + abs(hist[-2])):
            break
    return GEMTeacher(mu=mu, kappa=kappa, pi=pi, balance=balance, objective=hist, n_iter=len(hist) - 1)
