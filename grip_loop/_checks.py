"""Input validation: every error names the offending argument or config field.

Config dataclasses (`RAPConfig`, `BudgetConfig`, `JudgeConfig`, `EncoderConfig`,
`EvalConfig`, ...) check their fields with `check_int`, `check_number` and `check_choice`,
whose errors read `field: expected ..., got ...`; the numeric core converts and checks its
arrays and scalars with `finite_array` / `finite_scalar`.
"""

from __future__ import annotations

import math

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


def _real(v) -> bool:
    return isinstance(v, int | float) and not isinstance(v, bool)


def check_int(name: str, v, lo: int, *, optional: bool = False) -> None:
    """`v` is an int >= `lo` (or None with `optional`)."""
    if optional and v is None:
        return
    if isinstance(v, bool) or not isinstance(v, int) or v < lo:
        what = f"None or an int >= {lo}" if optional else f"an int >= {lo}"
        raise ValueError(f"{name}: expected {what}, got {v!r}")


def check_number(
    name: str,
    v,
    lo: float | None = None,
    *,
    open_lo: bool = False,
    hi: float | None = None,
    open_hi: bool = False,
    optional: bool = False,
    unit: str = "",
) -> None:
    """`v` is a finite real number in the range [lo, hi] (ends open with `open_lo` / `open_hi`;
    None = unbounded), or None with `optional`."""
    if optional and v is None:
        return
    ok = _real(v) and math.isfinite(v)
    ok = ok and (lo is None or (v > lo if open_lo else v >= lo))
    ok = ok and (hi is None or (v < hi if open_hi else v <= hi))
    if not ok:
        bounds = []
        if lo is not None:
            bounds.append(f"{'>' if open_lo else '>='} {lo}")
        if hi is not None:
            bounds.append(f"{'<' if open_hi else '<='} {hi}")
        what = (
            "a finite number"
            + (f" of {unit}" if unit else "")
            + (" " + " and ".join(bounds) if bounds else "")
        )
        raise ValueError(f"{name}: expected {'None or ' if optional else ''}{what}, got {v!r}")


def check_choice(name: str, v, choices) -> None:
    """`v` is one of `choices`."""
    if v not in choices:
        raise ValueError(f"{name}: expected one of {tuple(choices)}, got {v!r}")
