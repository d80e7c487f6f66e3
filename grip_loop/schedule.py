"""Which cluster each draw comes from: a pure, O(1)-memory function of (key, draw index, budgets).

A *pass* of a partition with integer budgets m_k (sum M) is M draws in which cluster k is
drawn exactly m_k times, in a pseudo-random order: slot s of the pass maps to
`perm(s)` under a keyed bijection of [0, M), and the cluster is the one whose interval of
the cumulative budgets holds `perm(s)`. This is systematic sampling without storing a
permutation: the bijection is a small Feistel network with cycle walking, so a pass of
10^9 draws costs no memory, and any slot can be computed directly (exact resume needs only
the slot number).
"""

from __future__ import annotations

import numpy as np

_MASK64 = np.uint64(0xFFFFFFFFFFFFFFFF)


def _mix(x: np.ndarray, key: np.uint64) -> np.ndarray:
    """splitmix64 finaliser of (x ^ key): a cheap, well-mixed 64-bit round function."""
    with np.errstate(over="ignore"):
        z = (x ^ key) + np.uint64(0x9E3779B97F4A7C15)
        z = (z ^ (z >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
        z = (z ^ (z >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
        return z ^ (z >> np.uint64(31))


def round_keys(key: int, rounds: int = 4) -> list[np.uint64]:
    ss = np.random.SeedSequence(key)
    return [np.uint64(v) for v in ss.generate_state(rounds, dtype=np.uint64)]


def permute(idx, n: int, key: int) -> np.ndarray:
    """A keyed bijection of [0, n) evaluated at `idx` (vectorised Feistel + cycle walking)."""
    idx = np.asarray(idx, dtype=np.uint64)
    if n <= 1:
        return np.zeros_like(idx, dtype=np.int64)
    bits = max(2, int(n - 1).bit_length())
    bits += bits % 2  # an even split into two halves
    half = np.uint64(bits // 2)
    lo_mask = np.uint64((1 << (bits // 2)) - 1)
    keys = round_keys(key)
    out = idx.copy()
    todo = np.ones(out.shape, dtype=bool)
    # Cycle walking: values that land outside [0, n) are encrypted again; the domain is < 4n,
    # so on average fewer than 4 rounds of walking are needed.
    x = out
    while todo.any():
        left, right = x[todo] >> half, x[todo] & lo_mask
        for k in keys:
            left, right = right, left ^ (_mix(right, k) & lo_mask)
        y = (left << half) | right
        x = x.copy()
        x[todo] = y
        todo = x >= np.uint64(n)
    return x.astype(np.int64)


def pass_clusters(slots, budgets: np.ndarray, key: int) -> np.ndarray:
    """Cluster of each slot of a pass whose cluster k holds `budgets[k]` slots."""
    budgets = np.asarray(budgets, dtype=np.int64)
    total = int(budgets.sum())
    if total == 0:
        raise ValueError("budgets: a pass needs at least one draw")
    perm = permute(slots, total, key)
    return np.searchsorted(np.cumsum(budgets), perm, side="right")


def partition_budgets(budgets, partition: int, num_partitions: int) -> np.ndarray:
    """Partition g's share of each cluster: the count of v in [0, n_k) with v % G == g.

    The shares of all partitions sum to n_k exactly, and partition g's i-th draw of cluster
    k in a pass stands for virtual position v = g + G * i, so the partitions together visit
    each v in [0, n_k) exactly once per pass: no duplicates, no gaps.
    """
    n = np.asarray(budgets, dtype=np.int64)
    g, big_g = int(partition), int(num_partitions)
    if not 0 <= g < big_g:
        raise ValueError(f"partition {g} outside [0, {big_g})")
    return np.maximum(0, (n - g + big_g - 1) // big_g)
