"""Input validation shared by the numeric core: every error names the offending argument."""

from __future__ import annotations

import numpy as np


def finite_array(name: str, x, *, ndim: int | None = None, dtype=np.float64) -> np.ndarray:
    """`x` as an array of `dtype`; ValueError naming `name` if it is non-finite or misshapen."""
    try:
        arr = np.asarray(x, dtype=dtype)
    except (TypeError, ValueError) as exc:
        raise ValueError(f"{name}: cannot convert to a {np.dtype(dtype).name} array ({exc})") from None
    if ndim is not None and arr.ndim != ndim:
        raise ValueError(f"{name}: expected a {ndim}-d array, got shape {arr.shape}")
    if arr.dtype.kind == "f" and not np.all(np.isfinite(arr)):
        bad = int(np.flatnonzero(~np.isfinite(arr.ravel()))[0])
        raise ValueError(f"{name}: contains non-finite values (first at flat index {bad})")
    return arr


def finite_scalar(
    name: str, x, *, lo: float | None = None, hi: float | None = None, lo_open: bool = False
) -> float:
    """`x` as a float in [lo, hi] (or (lo, hi] with `lo_open`); ValueError naming `name` otherwise."""
    try:
        v = float(x)
    except (TypeError, ValueError):
        raise ValueError(f"{name}: expected a number, got {x!r}") from None
    if not np.isfinite(v):
        raise ValueError(f"{name}: must be finite, got {v}")
    if lo is not None and (v <= lo if lo_open else v < lo):
        raise ValueError(f"{name}: must be {'>' if lo_open else '>='} {lo}, got {v}")
    if hi is not None and v > hi:
        raise ValueError(f"{name}: must be <= {hi}, got {v}")
    return v


def count_array(name: str, x) -> np.ndarray:
    """Non-negative integer counts (1-d)."""
    arr = finite_array(name, x, ndim=1)
    if np.any(arr < 0) or np.any(arr != np.floor(arr)):
        raise ValueError(f"{name}: must hold non-negative integers")
    return arr.astype(np.int64)


def same_length(**arrays: np.ndarray) -> int:
    sizes = {k: len(v) for k, v in arrays.items()}
    if len(set(sizes.values())) > 1:
        raise ValueError(f"length mismatch: {sizes}")
    return next(iter(sizes.values()))
