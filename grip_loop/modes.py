"""Sampler modes (the rows of the paper's Table 1, Panel B) and the budget rule of each.

A mode fixes three things:

* `order`: which selection order's shards the dataset reads inside a cluster
  ("random": a seeded permutation, "diversity": Eq. 10 with beta = 0, "grip": Eq. 10 with
  the configured beta);
* `budget`: "uniform" (n_k proportional to N_k, i.e. uniform over documents) or "eq5"
  (the static baseline budget of Eq. 5);
* `replay`: "none", "quality" (Eq. 7 driven by static quality, computed once) or "loss"
  (Eq. 7 driven by the Rapid Adaptation Probe at every refresh).

Static replay (row 3) feeds Eq. 7 with Delta_k := 1 - Q_k, so high-quality clusters get
the large multipliers a small loss drop would give them: "simply up-weighting high-quality
static data" in the paper's words, through the same function as the loss-driven rows.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np

from grip_loop._checks import check_number
from grip_loop.budget import (
    DEFAULT_MAX_REPETITION,
    DEFAULT_QUALITY_THRESHOLD,
    allocate,
    apportion,
    baseline_budget,
    repetition_capped,
    replay_multiplier,
    stream_passes,
)

if TYPE_CHECKING:
    from grip_loop.manifest import Manifest


@dataclass(frozen=True)
class Mode:
    order: str
    budget: str
    replay: str


MODES: dict[str, Mode] = {
    "random": Mode(order="random", budget="uniform", replay="none"),
    "static-budget": Mode(order="random", budget="eq5", replay="none"),
    "static-replay": Mode(order="random", budget="eq5", replay="quality"),
    "loss-replay": Mode(order="random", budget="eq5", replay="loss"),
    "diversity": Mode(order="diversity", budget="eq5", replay="loss"),
    "grip": Mode(order="grip", budget="eq5", replay="loss"),
}


def get_mode(name: str) -> Mode:
    if name not in MODES:
        raise ValueError(f"mode: unknown {name!r}; choose one of {sorted(MODES)}")
    return MODES[name]


@dataclass(kw_only=True)
class BudgetConfig:
    """Budget hyper-parameters (paper section 3.2 defaults)."""

    b_total: int | None = None
    """B: documents per pass of the support set (a whole number); None = the corpus size."""
    tau: float = 0.5
    """Eq. 5 sub-linear exponent (0.5 = square-root sampling)."""
    temperature: float = 1.0
    """Eq. 5 Boltzmann temperature (> 0)."""
    alpha: float = 2.0
    """Eq. 7 replay intensity (r_k at most 1 + alpha: 3x at the default)."""
    quality_threshold: float = DEFAULT_QUALITY_THRESHOLD
    """Eq. 7 gate on Q_k in [0, 1]: clusters below it are not replayed."""
    ema: float = 0.0
    """Smoothing of r_k across refreshes, r <- ema * r_prev + (1 - ema) * r, in [0, 1); 0 = off."""
    floor: float = 0.0
    """Minimum sampling probability of a non-empty cluster, in [0, 1); 0 = off."""
    max_repetition: float | None = DEFAULT_MAX_REPETITION
    """Repetition guard: the most passes over one cluster's stream within the run's token budget
    (trainer.max_steps x tokens per step); a capped cluster's excess goes to the others.
    None (YAML null) = off. See `budget.repetition_capped`."""

    def __post_init__(self) -> None:
        b = self.b_total
        if b is not None:
            if (
                isinstance(b, bool)
                or not isinstance(b, int | float)
                or not np.isfinite(b)
                or b != int(b)
                or b < 1
            ):
                raise ValueError(f"b_total: expected None or a whole number of documents >= 1, got {b!r}")
            self.b_total = int(b)
        check_number("tau", self.tau, 0.0)
        check_number("temperature", self.temperature, 0.0, open_lo=True)
        check_number("alpha", self.alpha, 0.0)
        check_number("quality_threshold", self.quality_threshold)
        check_number("ema", self.ema, 0.0, hi=1.0, open_hi=True)
        check_number("floor", self.floor, 0.0, hi=1.0, open_hi=True)
        check_number("max_repetition", self.max_repetition, 0.0, open_lo=True, optional=True, unit="passes")


def base_budget(mode: Mode, sizes, sigma, quality, cfg: BudgetConfig) -> np.ndarray:
    """Real-valued n_k^base of a mode (sums to B)."""
    sizes = np.asarray(sizes, dtype=np.int64)
    b = int(cfg.b_total or sizes.sum())
    if mode.budget == "uniform":
        return b * sizes / sizes.sum()
    return baseline_budget(sizes, sigma, quality, b, tau=cfg.tau, temperature=cfg.temperature)


def replay_for(mode: Mode, quality, cfg: BudgetConfig, delta=None, shrink: float = 1.0) -> np.ndarray:
    """r_k of a mode; `delta` (the probe's Delta L_k) and `shrink` (how far to trust it, from
    its reliability; see `budget.replay_multiplier`) are used only by loss replay."""
    q = np.asarray(quality, dtype=np.float64)
    if mode.replay == "none":
        return np.ones_like(q)
    if mode.replay == "quality":
        return replay_multiplier(1.0 - q, q, alpha=cfg.alpha, quality_threshold=cfg.quality_threshold)
    if delta is None:  # before the first probe: neutral
        delta = np.full_like(q, np.nan)
    return replay_multiplier(
        delta, q, alpha=cfg.alpha, quality_threshold=cfg.quality_threshold, shrink=shrink
    )


def replay_step(mode: Mode, quality, cfg: BudgetConfig, *, delta=None, shrink: float = 1.0, prev_r=None):
    """r_k of one publication: `replay_for`, then the optional EMA over the previous r_k. The
    training callback and `grip simulate` both call this (one copy of the rule)."""
    r = replay_for(mode, quality, cfg, delta=delta, shrink=shrink)
    if cfg.ema > 0 and prev_r is not None:
        r = cfg.ema * np.asarray(prev_r, dtype=np.float64) + (1 - cfg.ema) * r
    return r


@dataclass(frozen=True)
class RepetitionGuard:
    """What the repetition guard needs besides the budgets: documents per cluster, tokens per
    document (mean length + EOS), the run's token budget and the cap (passes per stream)."""

    sizes: tuple
    doc_tokens: tuple
    run_tokens: float
    max_repetition: float

    def passes(self, n) -> np.ndarray:
        return stream_passes(n, self.sizes, self.doc_tokens, self.run_tokens)


@dataclass(frozen=True)
class Allocation:
    """Integer budgets and what decided them (the ledger records it)."""

    n: np.ndarray
    capped: np.ndarray  # bool per cluster: the repetition cap binds
    infeasible: bool = False  # no split keeps every cluster under the cap (fallback: n ~ N_k)


def allocation(
    base, replay, b_total: int, *, sizes=None, floor: float = 0.0, guard: RepetitionGuard | None = None
) -> Allocation:
    """Eq. 8 integers; with `floor` > 0 every non-empty cluster gets at least floor * B
    (rounded up), the rest shared in proportion to U_k as before (bounded apportionment);
    with `guard`, no cluster's stream is read more than guard.max_repetition times in the run
    (`budget.repetition_capped`: the excess of a capped cluster goes to the others)."""
    k = len(np.asarray(base))
    lower = None
    if floor > 0 and sizes is not None:
        nonempty = np.asarray(sizes) > 0
        lower = np.where(nonempty, np.ceil(floor * b_total), 0.0)
        if lower.sum() > b_total:
            raise ValueError(f"floor: {floor} x {int(nonempty.sum())} clusters exceeds the whole budget")
    if guard is None:
        if lower is None:
            n = allocate(base, replay, b_total)
        else:
            u = np.asarray(base, dtype=np.float64) * np.asarray(replay, dtype=np.float64)
            n = apportion(u, int(b_total), lower=lower)
        return Allocation(n=n, capped=np.zeros(k, dtype=bool))
    u = np.asarray(base, dtype=np.float64) * np.asarray(replay, dtype=np.float64)
    if b_total > 0 and u.sum() <= 0:
        raise ValueError("base * replay is zero for every cluster: nothing to allocate")
    n, capped, infeasible = repetition_capped(
        u, int(b_total), guard.sizes, guard.doc_tokens, guard.run_tokens, guard.max_repetition, lower=lower
    )
    return Allocation(n=n, capped=capped, infeasible=infeasible)


def budgets(
    base, replay, b_total: int, *, sizes=None, floor: float = 0.0, guard: RepetitionGuard | None = None
) -> np.ndarray:
    """The integers of `allocation` (Eq. 8 with the optional floor and repetition guard)."""
    return allocation(base, replay, b_total, sizes=sizes, floor=floor, guard=guard).n


def repetition_guard(
    cfg: BudgetConfig, sizes, mean_length, run_tokens: float | None
) -> RepetitionGuard | None:
    """The guard of a run, or None when it is off (max_repetition null, or no known run length)."""
    if cfg.max_repetition is None or not run_tokens or run_tokens <= 0:
        return None
    return RepetitionGuard(
        sizes=tuple(int(x) for x in np.asarray(sizes)),
        doc_tokens=tuple(float(x) + 1.0 for x in np.asarray(mean_length, dtype=np.float64)),
        run_tokens=float(run_tokens),
        max_repetition=float(cfg.max_repetition),
    )


def repetition_infeasible(guard: RepetitionGuard | None, where: str = "budget") -> str | None:
    """Why `guard` cannot hold (the run reads the whole corpus more than max_repetition times:
    no split keeps every cluster under the cap), or None. Callers then turn the guard off for
    the run and say so (a warning naming the field and the fix), rather than refuse: the
    default cap applies to every run, including short tests on tiny corpora."""
    if guard is None:
        return None
    size = np.asarray(guard.sizes, dtype=np.float64)
    c = np.asarray(guard.doc_tokens, dtype=np.float64)
    corpus_passes = guard.run_tokens / float((size * c).sum())
    if corpus_passes <= guard.max_repetition:
        return None
    return (
        f"{where}.max_repetition: the run reads {guard.run_tokens:.4g} tokens, {corpus_passes:.2f} passes "
        f"over the whole corpus ({int(size.sum())} documents), more than max_repetition={guard.max_repetition:g}: "
        f"no split of the budget keeps every cluster under it, so the repetition guard is off for this run; "
        f"raise {where}.max_repetition, set it to null to silence this, lower trainer.max_steps, or prepare "
        "more data"
    )


@dataclass(frozen=True, eq=False)
class BudgetRule:
    """A run's budget rule on a prepared corpus, set up once and called at every publication:
    the training callback (`grip_loop.loop.GripLoop`) and `grip simulate` both use it (one copy
    of the rule). `guard` is None when the repetition guard is off; `guard_off` says why when
    max_repetition is set but no split can hold it (`repetition_infeasible`)."""

    mode: Mode
    cfg: BudgetConfig
    sizes: np.ndarray  # N_k, documents per cluster
    sigma: np.ndarray
    quality: np.ndarray  # Q_k
    mean_len: np.ndarray  # mean document length in tokens (without EOS)
    b_total: int  # B
    base: np.ndarray  # n_k^base (Eq. 5, or uniform), real-valued, sums to B
    guard: RepetitionGuard | None
    guard_off: str | None

    @classmethod
    def of(cls, mode: Mode, manifest: Manifest, cfg: BudgetConfig, run_tokens: float | None) -> BudgetRule:
        sizes = np.array(manifest.sizes, dtype=np.int64)
        sigma = np.array([c.sigma for c in manifest.clusters])
        quality = np.array([c.quality for c in manifest.clusters])
        mean_len = np.array([c.mean_length for c in manifest.clusters], dtype=np.float64)
        base = base_budget(mode, sizes, sigma, quality, cfg)
        guard = repetition_guard(cfg, sizes, mean_len, run_tokens)
        off = repetition_infeasible(guard)
        return cls(
            mode=mode,
            cfg=cfg,
            sizes=sizes,
            sigma=sigma,
            quality=quality,
            mean_len=mean_len,
            b_total=int(cfg.b_total or sizes.sum()),
            base=base,
            guard=None if off is not None else guard,
            guard_off=off,
        )

    def replay(self, *, delta=None, shrink: float = 1.0, prev_r=None) -> np.ndarray:
        """r_k of one publication (`replay_step`)."""
        return replay_step(self.mode, self.quality, self.cfg, delta=delta, shrink=shrink, prev_r=prev_r)

    def allocate(self, r) -> Allocation:
        """n_k of one publication (`allocation`: Eq. 8, floor, repetition guard)."""
        return allocation(
            self.base, r, self.b_total, sizes=self.sizes, floor=self.cfg.floor, guard=self.guard
        )

    def gate(self) -> np.ndarray:
        """Which clusters the Eq. 7 quality gate lets replay (none in a mode without replay)."""
        if self.mode.replay == "none":
            return np.zeros(len(self.sizes), dtype=bool)
        return self.quality > self.cfg.quality_threshold

    def projected(self, n, run_tokens: float | None) -> np.ndarray | None:
        """Passes over each cluster's stream that budgets `n` give over `run_tokens` (None: unknown)."""
        return stream_passes(n, self.sizes, self.mean_len + 1.0, run_tokens) if run_tokens else None
