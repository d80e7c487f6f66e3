"""GRASP-style subset-level attribution of cluster budgets (docs/design.md, "Attribution").

Question: before paying for a training run, is an allocation w (token shares over the K
clusters) better for a target set (held-out code, HumanEval, another corpus) than another?
Attribution per cluster is additive; allocations are subsets, and two clusters that teach the
same thing are worth less together than the sum of their scores. Three parts:

1. Sketches (`sketch`). For cluster k, its probe documents are split into S disjoint groups;
   for each group the mean per-token next-token loss gradient g_{k,s} of the model's *upper*
   parameters (the LM head, plus the last `layers` decoder blocks and the final norm) is
   computed, then projected: z_{k,s} = P g_{k,s}, P a seeded Gaussian matrix (p x d) with
   N(0, 1/d) entries, so E<Pa, Pb> = <a, b> (Johnson-Lindenstrauss). P is never stored: it is
   drawn in fixed chunks of each parameter from a generator seeded by (seed, parameter name,
   chunk), so the same parameter always projects the same way. The target set gets the same
   S sketches z_{t,s}.

2. Surrogate (`Surrogate`). One step of length eta along the mixture's training gradient
   G w (G = [g_1 .. g_K], w = token shares) changes the target loss by, to second order,
       -Delta L_t = eta <g_t, G w> - eta^2/2 (G w)^T H_t (G w).
   The descent lemma (an L-smooth target: H_t <= L I) turns this into a lower bound on the
   utility; in the sketch space (inner products preserved, not a Hessian) the curvature is
   taken isotropic, which gives, per unit step,
       U(w) = a^T w - gamma w^T C w,   a_k = <z_t, z_k>,  C_kl = <z_k, z_l>,
   gamma = eta L / 2. The additive baseline is a^T w (gamma = 0). eta L is not tuned: it is
   fixed by a line search at a reference allocation w0 (uniform over clusters) -- the step the
   quadratic model itself takes along w0 (eta = a^T w0 / (L w0^T C w0)), so
       gamma = |a^T w0| / (2 w0^T C w0)
   a closed form of the sketches alone (no retraining, no evaluation data). At that scale the
   reference is predicted to reach the maximum of its own parabola: an allocation gains only
   where its direction is better aligned with the target *per unit of squared step*, which is
   what the redundancy penalty says. docs/design.md discusses the alternatives.

3. Lower confidence bound (`evaluate`, `select`). Everything above is a function of the S
   group sketches; the delete-one-group jackknife over the groups (cluster groups and target
   group s removed together, gamma refit each time) gives a standard error of U(w) and of the
   paired difference U(w) - U(w_ref). LCB = U - z * se. The protocol is finite: it reports the
   candidate with the best LCB, and recommends the candidate whose paired gain over the
   current allocation has the best LCB, only when that LCB is > 0 (else: keep the current).

Layout: `attribution_grad` (the upper parameters, a group's loss gradient, the projection P);
this module makes the sketches, the surrogate and the selection. Import from here: it
re-exports the public API.
"""

from __future__ import annotations

import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

import numpy as np
import torch
from torch import nn

from grip_loop.attribution_grad import (  # noqa: F401  (CHUNK re-exported)
    CHUNK,
    IGNORE,
    _targets,
    group_gradient,
    project,
    projection_matrix,
    split_rows,
    upper_parameters,
)

__all__ = [
    "AttributionError",
    "Candidate",
    "SketchConfig",
    "Sketches",
    "Surrogate",
    "allocation_report",
    "evaluate",
    "fit_gamma",
    "group_gradient",
    "project",
    "projection_matrix",
    "select",
    "sketch",
    "split_rows",
    "upper_parameters",
]


class AttributionError(ValueError):
    """Input that cannot be attributed (empty target, zero gradients, ...); the message says which."""


@dataclass(kw_only=True)
class SketchConfig:
    dim: int = 256
    """d: the sketch dimension (rows of the projection)."""
    layers: int = 1
    """Upper decoder blocks whose parameters are sketched (with the final norm and the LM head);
    0 = the LM head only."""
    splits: int = 4
    """S: independent sketches per cluster and target, from disjoint documents (>= 2: the LCB
    needs a spread)."""
    seed: int = 0
    """Seed of the projection P."""
    micro_batch: int = 16
    """Windows per forward/backward."""
    pad_id: int | None = None
    """Right-padding token id, not a loss target (the probe windows pad with EOS)."""

    def __post_init__(self) -> None:
        for name, lo in (("dim", 1), ("layers", 0), ("splits", 2), ("seed", 0), ("micro_batch", 1)):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int) or v < lo:
                raise ValueError(f"{name}: expected an int >= {lo}, got {v!r}")
        if self.pad_id is not None and (isinstance(self.pad_id, bool) or not isinstance(self.pad_id, int)):
            raise ValueError(f"pad_id: expected None or an int, got {self.pad_id!r}")


# ----------------------------------------------------------------------------- sketches


@dataclass
class Sketches:
    """S sketches per cluster and for the target; NaN rows for clusters without data."""

    clusters: np.ndarray
    """[K, S, d] z_{k,s}."""
    target: np.ndarray
    """[S, d] z_{t,s}."""
    tokens: np.ndarray
    """[K, S] target tokens behind each cluster sketch (0 = no data)."""
    target_tokens: np.ndarray
    """[S]."""
    grad_norms: np.ndarray
    """[K] |g_k| of the full (unprojected) mean gradient over all groups (NaN = no data)."""
    target_grad_norm: float
    params: int
    """p: sketched parameters."""
    seconds: float
    config: SketchConfig = field(default_factory=SketchConfig)

    @property
    def present(self) -> np.ndarray:
        return (self.tokens > 0).all(axis=1)


def _groups(windows: torch.Tensor, splits: int) -> list[torch.Tensor]:
    return [windows[torch.as_tensor(idx, dtype=torch.long)] for idx in split_rows(windows.shape[0], splits)]


def sketch(
    model: nn.Module,
    cluster_windows: Mapping[int, torch.Tensor | Sequence[torch.Tensor]],
    target_windows: torch.Tensor | Sequence[torch.Tensor],
    config: SketchConfig,
    *,
    num_clusters: int | None = None,
    progress=None,
) -> Sketches:
    """Sketch every cluster's and the target's training signal (module docstring, part 1).

    `cluster_windows[k]`: LongTensor (n, T) of cluster k's windows (each window from documents
    of its own; rows are dealt round robin into `config.splits` groups), or a list of S
    tensors (the groups, already disjoint by document). Same for `target_windows`.
    `progress(done, total)` is called after each group. Raises AttributionError when the target
    or a cluster has fewer than S non-empty groups, or a gradient is zero.
    """
    start = time.perf_counter()
    k_total = num_clusters if num_clusters is not None else max(cluster_windows, default=-1) + 1
    named = upper_parameters(model, config.layers)
    params = [p for _, p in named]
    names_sizes = [(n, p.numel()) for n, p in named]
    s = config.splits

    def as_groups(entry, what: str) -> list[torch.Tensor]:
        groups = list(entry) if isinstance(entry, list | tuple) else _groups(entry, s)
        if len(groups) != s:
            raise AttributionError(f"{what}: expected {s} groups, got {len(groups)}")
        return groups

    target_groups = as_groups(target_windows, "target")
    jobs: list[tuple[int | None, int, torch.Tensor]] = [(None, i, g) for i, g in enumerate(target_groups)]
    for c in sorted(cluster_windows):
        if not 0 <= c < k_total:
            raise ValueError(f"cluster_windows: id {c} outside 0..{k_total - 1}")
        entry = cluster_windows[c]
        if entry is None:
            continue
        jobs += [(c, i, g) for i, g in enumerate(as_groups(entry, f"cluster {c}"))]
    # token counts first (cheap): bad input fails before any gradient is computed
    counted = [int((_targets(g, config.pad_id) != IGNORE).sum()) if g.shape[0] else 0 for _, _, g in jobs]
    t_tok = np.array(counted[:s])
    if (t_tok == 0).any():
        raise AttributionError(
            f"target: {int((t_tok == 0).sum())} of its {s} document groups have no target tokens "
            f"(it needs at least {s} documents with >= 2 tokens)"
        )
    ids = {c for c, _, _ in jobs[s:]}
    full = {c for c in ids if all(n for (cc, _, _), n in zip(jobs, counted, strict=True) if cc == c)}
    if not full:
        raise AttributionError(
            f"no cluster has documents in all {s} groups (each cluster needs >= {s} probe documents)"
        )
    p_total = sum(n for _, n in names_sizes)
    stacked = torch.zeros(len(jobs), p_total)  # one flat gradient per group (zero when skipped)
    tokens = []
    for j, (c, _, g) in enumerate(jobs):
        n = 0
        if counted[j] and (c is None or c in full):
            stacked[j], n = group_gradient(
                model, params, g, pad_id=config.pad_id, micro_batch=config.micro_batch
            )
        tokens.append(n)
        if progress is not None:
            progress(j + 1, len(jobs))
    z = project(stacked, names_sizes, config.dim, config.seed).numpy()
    target = z[:s]
    clusters = np.full((k_total, s, config.dim), np.nan)
    tok = np.zeros((k_total, s), dtype=np.int64)
    for (c, i, _), n, row in zip(jobs[s:], tokens[s:], z[s:], strict=True):
        if n:
            clusters[c, i] = row
            tok[c, i] = n
    w_tok = torch.tensor(tokens, dtype=torch.float64)
    norms = np.full(k_total, np.nan)
    for c in range(k_total):
        rows = [j for j, job in enumerate(jobs) if job[0] == c and tokens[j]]
        if rows:  # |mean gradient over all the cluster's tokens|
            w = w_tok[rows] / w_tok[rows].sum()
            norms[c] = float((w[:, None] * stacked[rows].double()).sum(0).norm())
    present = (tok > 0).all(axis=1)
    for c in range(k_total):  # partial data: a cluster needs all S groups
        if not present[c]:
            clusters[c] = np.nan
    w = w_tok[:s] / w_tok[:s].sum()
    t_norm = float((w[:, None] * stacked[:s].double()).sum(0).norm())
    if not t_norm > 0:
        raise AttributionError(
            "target: its loss gradient is zero (degenerate sketch): the model's upper layers get no "
            "signal from it (a constant or fully padded target?)"
        )
    zeros = [c for c in range(k_total) if present[c] and not norms[c] > 0]
    if zeros:
        raise AttributionError(
            f"clusters {zeros}: their loss gradient is zero (degenerate sketch); check their probe documents"
        )
    return Sketches(
        clusters=clusters,
        target=target,
        tokens=tok,
        target_tokens=t_tok,
        grad_norms=norms,
        target_grad_norm=t_norm,
        params=p_total,
        seconds=time.perf_counter() - start,
        config=config,
    )


# ----------------------------------------------------------------------------- surrogate


def fit_gamma(a: np.ndarray, c: np.ndarray, w0: np.ndarray) -> float:
    """gamma = |a.w0| / (2 w0^T C w0): the line-search step at the reference w0 (module docstring)."""
    q = float(w0 @ c @ w0)
    if not q > 0:
        raise AttributionError("the reference allocation's sketched gradient is zero (degenerate sketch)")
    return abs(float(a @ w0)) / (2.0 * q)


@dataclass
class Surrogate:
    """U(w) = a.w - gamma w^T C w over the present clusters (w indexes all K; absent clusters
    must get 0 weight)."""

    a: np.ndarray
    """[K] alignment <z_t, z_k> (0 for absent clusters)."""
    c: np.ndarray
    """[K, K] Gram matrix of the cluster sketches."""
    gamma: float

    @classmethod
    def from_means(cls, zk: np.ndarray, zt: np.ndarray, present: np.ndarray, w0: np.ndarray | None = None):
        """From mean sketches zk [K, d] (NaN rows absent) and zt [d]; w0 = uniform over present."""
        z = np.where(present[:, None], zk, 0.0)
        a = z @ zt
        c = z @ z.T
        if w0 is None:
            w0 = present / present.sum()
        return cls(a=a, c=c, gamma=fit_gamma(a, c, w0))

    def utility(self, w) -> np.ndarray:
        """U for one allocation [K] or a batch [M, K]."""
        w = np.asarray(w, np.float64)
        return w @ self.a - self.gamma * np.einsum("...k,kl,...l->...", w, self.c, w)

    def additive(self, w) -> np.ndarray:
        return np.asarray(w, np.float64) @ self.a

    def cosines(self) -> np.ndarray:
        d = np.sqrt(np.clip(np.diag(self.c), 0, None))
        with np.errstate(invalid="ignore", divide="ignore"):
            return self.c / np.outer(d, d)


def _surrogates(sk: Sketches, w0=None) -> tuple[Surrogate, list[Surrogate]]:
    """The full-data surrogate and the S delete-one-group surrogates (the jackknife replicates)."""
    present = sk.present
    s = sk.target.shape[0]
    full = Surrogate.from_means(sk.clusters.mean(1), sk.target.mean(0), present, w0)
    reps = []
    for i in range(s):
        keep = [j for j in range(s) if j != i]
        reps.append(Surrogate.from_means(sk.clusters[:, keep].mean(1), sk.target[keep].mean(0), present, w0))
    return full, reps


def _jack_se(reps: np.ndarray) -> np.ndarray:
    """Jackknife standard error over axis 0 (S replicates)."""
    s = reps.shape[0]
    return np.sqrt((s - 1) / s * ((reps - reps.mean(0)) ** 2).sum(0))


@dataclass
class Candidate:
    name: str
    w: np.ndarray
    """Token shares over the K clusters (sum 1)."""
    utility: float = float("nan")
    se: float = float("nan")
    lcb: float = float("nan")
    additive: float = float("nan")
    additive_se: float = float("nan")
    gain: float = float("nan")
    """U(w) - U(w_ref), paired."""
    gain_lcb: float = float("nan")


def normalise(w, present: np.ndarray, what: str = "allocation") -> np.ndarray:
    """Non-negative weights -> shares over the present clusters (absent ones are dropped)."""
    w = np.asarray(w, np.float64)
    if w.shape != present.shape or not np.isfinite(w).all() or (w < 0).any():
        raise ValueError(f"{what}: expected {present.shape[0]} finite non-negative weights, got {w!r}")
    w = np.where(present, w, 0.0)
    if not w.sum() > 0:
        raise ValueError(f"{what}: no weight on a cluster with sketches")
    return w / w.sum()


def evaluate(
    sk: Sketches, allocations: Mapping[str, np.ndarray], *, reference: str | None = None, z: float = 1.645
) -> tuple[Surrogate, list[Candidate]]:
    """Predicted utility, jackknife standard error and LCB (U - z se) of each allocation, GRASP
    and additive; with `reference`, the paired gain over that allocation and its LCB."""
    full, reps = _surrogates(sk)
    names = list(allocations)
    w = np.stack([normalise(allocations[n], sk.present, n) for n in names])
    u = full.utility(w)
    u_reps = np.stack([r.utility(w) for r in reps])
    add = full.additive(w)
    add_reps = np.stack([r.additive(w) for r in reps])
    se, add_se = _jack_se(u_reps), _jack_se(add_reps)
    out = []
    ref = names.index(reference) if reference is not None else None
    for i, n in enumerate(names):
        cand = Candidate(
            n, w[i], float(u[i]), float(se[i]), float(u[i] - z * se[i]), float(add[i]), float(add_se[i])
        )
        if ref is not None:
            diff = u_reps[:, i] - u_reps[:, ref]
            cand.gain = float(u[i] - u[ref])
            cand.gain_lcb = float(cand.gain - z * _jack_se(diff[:, None])[0])
        out.append(cand)
    return full, out


def select(candidates: Sequence[Candidate], reference: str | None = None) -> dict:
    """The finite LCB protocol. `best_lcb`: the candidate with the best LCB of its utility.
    With a `reference` (the current allocation): `recommend` is the candidate whose paired
    gain over the reference has the best LCB, if that LCB is > 0; otherwise the reference
    (a change must be supported by the sketches' spread, not only by the point estimate)."""
    best = max(candidates, key=lambda c: c.lcb)
    out = {"best_lcb": best.name}
    if reference is not None:
        others = [c for c in candidates if c.name != reference and np.isfinite(c.gain_lcb)]
        top = max(others, key=lambda c: c.gain_lcb, default=None)
        if top is not None and top.gain_lcb > 0:
            out["recommend"] = top.name
            out["reason"] = (
                f"gain {top.gain:.4g} over {reference}, lower confidence bound {top.gain_lcb:.4g} > 0"
            )
        else:
            out["recommend"] = reference
            out["reason"] = f"no candidate's gain over {reference} has a positive lower confidence bound"
    return out


def allocation_report(sk: Sketches, surrogate: Surrogate, names: Sequence[str], top: int = 5) -> dict:
    """Per-cluster alignment (with its jackknife se and cosine to the target) and the most
    redundant (highest sketch cosine) and complementary (lowest) cluster pairs."""
    present = sk.present
    _, reps = _surrogates(sk)
    a_se = _jack_se(np.stack([r.a for r in reps]))
    zt = sk.target.mean(0)
    zk = np.where(present[:, None], sk.clusters.mean(1), 0.0)
    with np.errstate(invalid="ignore", divide="ignore"):
        cos_t = zk @ zt / (np.linalg.norm(zk, axis=1) * np.linalg.norm(zt))
    cos = surrogate.cosines()
    rows = []
    for k, name in enumerate(names):
        rows.append(
            {
                "cluster": k,
                "name": name,
                "sketched": bool(present[k]),
                "alignment": float(surrogate.a[k]) if present[k] else None,
                "alignment_se": float(a_se[k]) if present[k] else None,
                "cosine_to_target": float(cos_t[k]) if present[k] else None,
                "grad_norm": float(sk.grad_norms[k]) if present[k] else None,
                "tokens": int(sk.tokens[k].sum()),
            }
        )
    ids = np.flatnonzero(present)
    pairs = [(float(cos[i, j]), int(i), int(j)) for n, i in enumerate(ids) for j in ids[n + 1 :]]
    pairs.sort(reverse=True)

    def pair(p):
        return {"a": names[p[1]], "b": names[p[2]], "cosine": p[0], "gram": float(surrogate.c[p[1], p[2]])}

    return {
        "clusters": rows,
        "redundant_pairs": [pair(p) for p in pairs[:top]],
        "complementary_pairs": [pair(p) for p in pairs[::-1][:top]],
    }
