"""grip-loop: the GRIP closed-loop data sampler.

The numeric core is pure functions over arrays (explicit seeds, no global state):

* `grip_loop.budget`: Eq. 3-5, 7, 8 (geometric consistency, probe and baseline budgets,
  replay multiplier, exact integer allocation).
* `grip_loop.selection`: Eq. 9-10 (kNN kernel density, length-rectified weights) and the
  Efraimidis–Spirakis order.
"""

from grip_loop.budget import (
    DEFAULT_QUALITY_THRESHOLD,
    allocate,
    apportion,
    baseline_budget,
    geometric_consistency,
    probe_allocation,
    replay_multiplier,
)
from grip_loop.selection import kernel_density, knn, selection_order, selection_weights

__version__ = "0.1.0"

__all__ = [
    "DEFAULT_QUALITY_THRESHOLD",
    "allocate",
    "apportion",
    "baseline_budget",
    "geometric_consistency",
    "kernel_density",
    "knn",
    "probe_allocation",
    "replay_multiplier",
    "selection_order",
    "selection_weights",
]
