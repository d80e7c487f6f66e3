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

import numpy as np

from grip_loop._checks import check_number
from grip_loop.budget import (
    DEFAULT_QUALITY_THRESHOLD,
    allocate,
    apportion,
    baseline_budget,
    replay_multiplier,
)


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


def budgets(base, replay, b_total: int, *, sizes=None, floor: float = 0.0) -> np.ndarray:
    """Eq. 8 integers; with `floor` > 0 every non-empty cluster gets at least floor * B
    (rounded up), the rest shared in proportion to U_k as before (bounded apportionment)."""
    if floor <= 0 or sizes is None:
        return allocate(base, replay, b_total)
    u = np.asarray(base, dtype=np.float64) * np.asarray(replay, dtype=np.float64)
    nonempty = np.asarray(sizes) > 0
    lower = np.where(nonempty, np.ceil(floor * b_total), 0.0)
    if lower.sum() > b_total:
        raise ValueError(f"floor: {floor} x {int(nonempty.sum())} clusters exceeds the whole budget")
    return apportion(u, int(b_total), lower=lower)
