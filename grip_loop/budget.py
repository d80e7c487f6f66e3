"""Inter-cluster budgeting: GRIP Eq. 4, 5, 7 and 8 as pure functions over per-cluster arrays.

Conventions shared by every function here:

* Arrays are indexed by cluster id k in [0, K). Empty clusters (N_k = 0) are allowed and
  always receive zero.
* Static quality Q_k is on a [0, 1] scale: the mean of the four 0-10 rubric scores of the
  paper's Appendix A.1, divided by 10. With T = 1 the Boltzmann factor exp(Q_k/T) then spans
  at most a factor e between the worst and the best cluster, which is what "preserve the
  natural quality distribution" (section 3.2) asks for; on the raw 0-10 scale it would span
  e^10 and hand the whole budget to the top cluster.
* Integer budgets are produced by a bounded largest-remainder apportionment
  (`apportion`): they sum *exactly* to the requested total, respect per-cluster bounds, and
  ties are broken by the lower cluster id, so results are deterministic.
* Non-finite inputs raise ValueError naming the argument, with one documented exception:
  the adaptation deltas of `replay_multiplier` may be NaN (a probe that failed for a cluster)
  and have a defined fallback.
"""

from __future__ import annotations

import numpy as np

from grip_loop._checks import count_array, finite_array, finite_scalar, same_length

#: Quality gate of Eq. 7 on the [0, 1] scale. The paper does not give tau_th. The rubric's
#: bands are 0-3 (low: does not run, unreadable, trivial), 4-7 (mid) and 8-10 (high); a
#: threshold of 0.35 lets a cluster replay when its average score is closer to the mid band
#: than to the low band, and stops replay of clusters the judge calls noise.
DEFAULT_QUALITY_THRESHOLD = 0.35


def apportion(weights, total: int, lower=None, upper=None) -> np.ndarray:
    """Integers n_k summing exactly to `total`, proportional to `weights` within [lower, upper].

    Real targets are t_k = clip(lam * w_k, lower_k, upper_k) with lam chosen so that
    sum t_k = total (water-filling: a cluster that hits a bound stays there and the rest is
    shared among the others in proportion). Integers are floor(t_k) plus one unit for the
    largest fractional remainders (ties: lower index first). Zero-weight clusters stay at
    their lower bound unless every positive-weight cluster is at its upper bound. Bounds
    are integers (default 0 and +inf).

    Raises ValueError when sum(lower) > total or sum(upper) < total.
    """
    w = finite_array("weights", weights, ndim=1)
    if np.any(w < 0):
        raise ValueError("weights: must be non-negative")
    k = len(w)
    total = int(total)
    if total < 0:
        raise ValueError(f"total: must be >= 0, got {total}")
    lo = np.zeros(k) if lower is None else np.asarray(lower, dtype=np.float64)
    hi = np.full(k, np.inf) if upper is None else np.asarray(upper, dtype=np.float64)
    if lo.shape != (k,) or hi.shape != (k,) or np.any(lo > hi) or np.any(lo < 0):
        raise ValueError("lower/upper: need one entry per weight and 0 <= lower <= upper")
    if np.any(lo != np.floor(lo)) or np.any(np.isfinite(hi) & (hi != np.floor(hi))):
        raise ValueError("lower/upper: bounds must be integers")
    if lo.sum() > total:
        raise ValueError(f"total ({total}) is below the sum of the lower bounds ({int(lo.sum())})")
    if hi.sum() < total:
        raise ValueError(f"total ({total}) exceeds the sum of the upper bounds ({int(hi.sum())})")

    target = _waterfill(w, total, lo, hi)
    n = np.floor(target + 1e-9).astype(np.int64)
    deficit = total - int(n.sum())
    if deficit:
        rem = target - n
        if deficit > 0:
            cand = np.flatnonzero(n < hi)
            order = cand[np.argsort(-rem[cand], kind="stable")]
            n[order[:deficit]] += 1
        else:  # float round-up overshoot: take back from the smallest remainders
            cand = np.flatnonzero(n > lo)
            order = cand[np.argsort(rem[cand], kind="stable")]
            n[order[:-deficit]] -= 1
    assert int(n.sum()) == total, "apportion: rounding failed to hit the total"
    return n


def _waterfill(w: np.ndarray, total: int, lo: np.ndarray, hi: np.ndarray) -> np.ndarray:
    """Real targets t = clip(lam * w, lo, hi) with sum t = total (bisection on lam).

    Zero-weight entries sit at their lower bound unless the positive-weight entries all
    saturate at their upper bounds; the rest is then shared equally by the zero-weight ones.
    """
    pos = w > 0
    if not pos.any():
        return _waterfill(np.where(lo < hi, 1.0, 0.0), total, lo, hi) if np.any(lo < hi) else lo.copy()
    saturated = np.where(pos, hi, lo)
    if saturated.sum() <= total:
        rest = total - saturated.sum()
        if rest == 0:
            return saturated
        zero = ~pos & (lo < hi)
        t = saturated.copy()
        t[zero] = _waterfill(np.ones(int(zero.sum())), rest + lo[zero].sum(), lo[zero], hi[zero])
        return t
    if not np.isfinite(hi).any() and not lo.any():
        return total * w / w.sum()  # the unbounded case, exact without search
    if total == 0:
        return lo.copy()  # sum(lo) <= total forces lo == 0
    # Bisection on x = log(lam), so that weight ratios beyond the float range (1e-311 next
    # to 1.0: hypothesis found it) neither overflow lam nor stall the search: exp() of a
    # huge exponent is inf and clips to the upper bound. The weights are scaled in log space:
    # w / max(w) would underflow a subnormal weight (5e-324 next to 1e3) to 0, its entry could
    # then never rise and the bracket search below would climb forever.
    with np.errstate(divide="ignore", over="ignore"):
        logw = np.log(w) - np.log(w[pos].max())  # scale-free; finite for every positive weight
        w = np.exp(logw)

        def filled(x: float) -> np.ndarray:
            return np.clip(np.exp(x + logw), lo, hi)

        x_lo = x_hi = float(np.log(total) - np.log(w.sum()))
        while filled(x_hi).sum() < total:
            x_lo, x_hi = x_hi, x_hi + 1.0
        if x_lo == x_hi:
            x_lo = x_hi - 1.0
            while filled(x_lo).sum() >= total and x_lo > -1e4:
                x_lo, x_hi = x_lo - 1.0, x_lo
        for _ in range(200):
            x = 0.5 * (x_lo + x_hi)
            if x in (x_lo, x_hi):
                break
            if filled(x).sum() < total:
                x_lo = x
            else:
                x_hi = x
        return filled(x_hi)


def geometric_consistency(emb, labels, centroids) -> np.ndarray:
    """Eq. 3: sigma_k = sqrt(mean_{x in C_k} ||e(x) - mu_k||^2).

    `emb` holds L2-normalised rows (N, d); `labels` the cluster id of each row; `centroids`
    (K, d). Empty clusters get sigma = 0, and so do one-point clusters: a single document
    carries no information about a cluster's spread, whatever centroid was passed.
    """
    e = finite_array("emb", emb, ndim=2, dtype=np.float32)
    mu = finite_array("centroids", centroids, ndim=2, dtype=np.float32)
    lab = np.asarray(labels)
    if lab.ndim != 1 or len(lab) != len(e):
        raise ValueError(f"labels: expected shape ({len(e)},), got {lab.shape}")
    if e.shape[1] != mu.shape[1]:
        raise ValueError(f"centroids: dimension {mu.shape[1]} does not match emb dimension {e.shape[1]}")
    k = len(mu)
    if len(lab) and (lab.min() < 0 or lab.max() >= k):
        raise ValueError(f"labels: cluster ids must lie in [0, {k})")
    norms = np.linalg.norm(e, axis=1)
    if len(e) and np.max(np.abs(norms - 1.0)) > 1e-3:
        raise ValueError("emb: rows must be L2-normalised (divide each row by its norm)")
    d2 = np.sum((e - mu[lab]) ** 2, axis=1, dtype=np.float64)
    counts = np.bincount(lab, minlength=k)
    sums = np.bincount(lab, weights=d2, minlength=k)
    sigma = np.sqrt(np.divide(sums, counts, out=np.zeros(k), where=counts > 0))
    sigma[counts < 2] = 0.0
    return sigma


def _mass(sizes: np.ndarray, sigma: np.ndarray) -> np.ndarray:
    """N_k * sigma_k, falling back to N_k when every non-empty cluster has sigma = 0."""
    mass = sizes * sigma
    if mass.sum() == 0:
        return sizes.astype(np.float64)
    return mass


def probe_allocation(sizes, sigma, b_probe: int) -> np.ndarray:
    """Eq. 4: Neyman allocation of the probe set, n_k^probe proportional to N_k sigma_k.

    Returns integers that sum exactly to `b_probe`, never exceed N_k and are at least 1 for
    every non-empty cluster when b_probe >= the number of non-empty clusters (so every
    cluster gets a quality score and a RAP batch). One-point clusters (sigma = 0) get their
    single document through that floor. If every sigma is 0, the allocation is proportional
    to N_k. ValueError if b_probe exceeds the corpus size.
    """
    n = count_array("sizes", sizes)
    s = finite_array("sigma", sigma, ndim=1)
    same_length(sizes=n, sigma=s)
    if np.any(s < 0):
        raise ValueError("sigma: must be non-negative")
    b = int(finite_scalar("b_probe", b_probe, lo=0))
    if b > n.sum():
        raise ValueError(f"b_probe ({b}) exceeds the corpus size ({int(n.sum())}); lower the probe fraction")
    nonempty = n > 0
    lower = nonempty.astype(np.float64) if b >= nonempty.sum() else None
    return apportion(_mass(n, s), b, lower=lower, upper=n.astype(np.float64))


def baseline_budget(
    sizes, sigma, quality, b_total: float, tau: float = 0.5, temperature: float = 1.0
) -> np.ndarray:
    """Eq. 5: n_k^base = B (N_k sigma_k)^tau exp(Q_k/T) / sum_j (N_j sigma_j)^tau exp(Q_j/T).

    Computed in log space (a softmax), so large Q/T cannot overflow. Empty clusters get 0;
    one-point clusters (sigma = 0) get 0 unless every cluster has sigma = 0, in which case
    N_k replaces N_k sigma_k. The result is real-valued and sums to b_total; `allocate` turns
    it into integers.
    """
    n = count_array("sizes", sizes)
    s = finite_array("sigma", sigma, ndim=1)
    q = finite_array("quality", quality, ndim=1)
    same_length(sizes=n, sigma=s, quality=q)
    if np.any(s < 0):
        raise ValueError("sigma: must be non-negative")
    b = finite_scalar("b_total", b_total, lo=0)
    tau = finite_scalar("tau", tau, lo=0)
    t = finite_scalar("temperature", temperature, lo=0, lo_open=True)
    if n.sum() == 0:
        raise ValueError("sizes: every cluster is empty")
    mass = _mass(n, s)
    out = np.zeros(len(n))
    pos = mass > 0
    logits = tau * np.log(mass[pos]) + q[pos] / t
    p = np.exp(logits - logits.max())
    out[pos] = b * p / p.sum()
    return out


def replay_multiplier(
    delta,
    quality,
    alpha: float = 2.0,
    quality_threshold: float = DEFAULT_QUALITY_THRESHOLD,
    shrink: float = 1.0,
) -> np.ndarray:
    """Eq. 7: r_k = 1 + alpha exp(-Delta L_k / tau_norm) 1(Q_k > tau_th), tau_norm = mean Delta L_k
    over the clusters whose gate is open (Q_k > tau_th).

    The paper sets tau_norm ~ E[Delta L] without saying over which clusters. Here it is the mean
    over the clusters that can receive replay: a gated cluster (noise, by the judge) has a drop
    near 0, and counting it would lower tau_norm, raise every other cluster's ratio, shrink their
    multipliers and so hand the gated cluster a larger share through Eq. 8's renormalisation.

    r_k lies in [1, 1 + alpha]. Defined fallbacks (the result is never NaN):

    * Delta L_k < 0 (the probe's loss went *up*: nothing learnable in N steps) is clipped to
      0, the largest deficit, so r_k = 1 + alpha.
    * Delta L_k NaN or infinite (the probe failed on that cluster, or flagged it for having
      too few documents) is treated as the mean, the neutral value r_k = 1 + alpha / e.
    * When tau_norm is 0 or undefined (every delta <= 0 or non-finite) the probe ranks
      nothing, and every gated cluster gets the neutral value 1 + alpha / e; all-equal
      deltas give that same value by Eq. 7 itself.
    * Clusters with Q_k <= tau_th get r_k = 1 (so all-below-threshold gives all ones).

    `shrink` in [0, 1] is how far to trust the probe (its split-half reliability, see
    `RAPResult.shrink`): the deviation of every gated r_k from the neutral 1 + alpha / e is
    multiplied by it, r_k = 1 + alpha (shrink e^{-Delta/tau_norm} + (1 - shrink) e^{-1}).
    0 = every gated cluster neutral (Eq. 5's budgets, the gate still applied), 1 = Eq. 7.
    """
    d = np.asarray(delta, dtype=np.float64)
    if d.ndim != 1:
        raise ValueError(f"delta: expected a 1-d array, got shape {d.shape}")
    q = finite_array("quality", quality, ndim=1)
    same_length(delta=d, quality=q)
    a = finite_scalar("alpha", alpha, lo=0)
    th = finite_scalar("quality_threshold", quality_threshold)
    s = finite_scalar("shrink", shrink, lo=0, hi=1)
    ok = np.isfinite(d)
    d = np.where(ok, np.maximum(d, 0.0), np.nan)
    gate = q > th
    tau_norm = float(d[ok & gate].mean()) if (ok & gate).any() else 0.0
    if tau_norm > 0:
        ratio = np.where(ok, d / tau_norm, 1.0)
    else:
        ratio = np.ones_like(d)
    return 1.0 + a * (s * np.exp(-ratio) + (1.0 - s) * np.exp(-1.0)) * gate


def allocate(base, replay, b_total: int) -> np.ndarray:
    """Eq. 8: n_k = B U_k / sum_j U_j with U_k = n_k^base r_k, as integers summing exactly to B.

    Largest-remainder rounding, ties to the lower cluster id. Budgets are not capped by
    cluster size: n_k > N_k means cluster k is replayed (its stream wraps around), which is
    how a budget larger than the corpus is spent.
    """
    nb = finite_array("base", base, ndim=1)
    r = finite_array("replay", replay, ndim=1)
    same_length(base=nb, replay=r)
    if np.any(nb < 0):
        raise ValueError("base: must be non-negative")
    if np.any(r < 0):
        raise ValueError("replay: must be non-negative")
    b = finite_scalar("b_total", b_total, lo=0)
    if b != int(b):
        raise ValueError(f"b_total: must be an integer, got {b}")
    u = nb * r
    if b > 0 and u.sum() <= 0:
        raise ValueError("base * replay is zero for every cluster: nothing to allocate")
    return apportion(u, int(b))


#: Default of `budget.max_repetition`: passes over a cluster's stream within one run. Returns
#: from repeated data fall fast beyond ~4 epochs (Muennighoff et al. 2023, "Scaling
#: Data-Constrained Language Models"); OLMo-core's mixing caps sources the same way.
DEFAULT_MAX_REPETITION = 4.0


def stream_passes(n, sizes, doc_tokens, run_tokens: float) -> np.ndarray:
    """Passes over each cluster's stream if budgets `n` held for a run of `run_tokens` tokens.

    Cluster k is drawn with frequency n_k / sum n, a draw costs doc_tokens_k tokens (its mean
    length + EOS), so the run draws run_tokens / S documents, S = sum_j n_j doc_tokens_j / sum n,
    and cluster k's N_k documents are read run_tokens n_k / (S' N_k) times each on average
    (S' = sum_j n_j doc_tokens_j). Empty clusters: 0.
    """
    n = np.asarray(n, dtype=np.float64)
    c = np.asarray(doc_tokens, dtype=np.float64)
    size = np.asarray(sizes, dtype=np.float64)
    s = float((n * c).sum())
    if s <= 0:
        return np.zeros(len(n))
    return np.divide(float(run_tokens) * n, s * size, out=np.zeros(len(n)), where=size > 0)


def repetition_capped(
    weights,
    total: int,
    sizes,
    doc_tokens,
    run_tokens: float,
    max_repetition: float,
    lower=None,
) -> tuple[np.ndarray, np.ndarray, bool]:
    """`apportion(weights, total, lower)` with every cluster's stream read at most
    `max_repetition` times in a run of `run_tokens` tokens (see `stream_passes`).

    Returns (n, capped, infeasible): integers summing exactly to `total`, the clusters whose
    cap binds (n_k equals its cap and is below what the uncapped rule gives), and whether no
    split can respect the cap.

    The cap of cluster k is u_k = floor(R N_k S / run_tokens) documents, S = sum_j n_j c_j (the
    run draws fewer documents when the mix favours long ones, so the caps depend on the split).
    A capped cluster's excess goes to the others in proportion to their weights (the bounded
    water-filling of `apportion`). S is taken from the previous iterate and never allowed to
    grow (S_t = min(S_{t-1}, S(n_t))): the caps then only tighten, the iteration ends (within
    a few rounds in practice, at most once per integer step of a cap), and every cluster's
    passes under the final n are <= R (the true S is >= the one used).

    When the caps' integer sum falls below `total` the fallback is the split that spreads the
    passes most evenly, n_k proportional to N_k (every cluster read run_tokens / corpus tokens
    times), the clusters it cuts reported as capped. That split respects the cap
    whenever any split does; `infeasible` is True when even it does not (the run reads the
    whole corpus more than R times): callers check before training starts
    and turn the guard off (`modes.repetition_infeasible`: its message is the warning).
    """
    w = finite_array("weights", weights, ndim=1)
    size = count_array("sizes", sizes)
    c = finite_array("doc_tokens", doc_tokens, ndim=1)
    same_length(weights=w, sizes=size, doc_tokens=c)
    if np.any(c <= 0):
        raise ValueError("doc_tokens: must be > 0 (mean document length + 1 for the EOS)")
    t = finite_scalar("run_tokens", run_tokens, lo=0, lo_open=True)
    r = finite_scalar("max_repetition", max_repetition, lo=0, lo_open=True)
    lo = np.zeros(len(w)) if lower is None else np.asarray(lower, dtype=np.float64)
    n = apportion(w, total, lower=lo)
    free = n.copy()
    s_used = float((n * c).sum())
    caps = None
    for _ in range(100_000):  # bounded by the integer caps' descent; never reached in practice
        new_caps = np.maximum(np.floor(r * size * s_used / t), lo)
        if caps is not None and np.array_equal(new_caps, caps):
            break
        caps = new_caps
        if caps.sum() < total:
            even = apportion(size.astype(np.float64), total, lower=lo)
            return even, even < free, bool(t / float((size * c).sum()) > r)
        n = apportion(w, total, lower=lo, upper=caps)
        s_used = min(s_used, float((n * c).sum()))
    capped = (n >= caps) & (n < free)
    return n, capped, False
