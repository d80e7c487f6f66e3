"""(N,) arrays of `grip prepare` read a block of rows at a time: what these functions hold is
O(block + groups), so an input that is a memory map (a stage file, a `workdir.Scratch` array) is
never copied whole into private memory, and an output can be one too (`out`)."""

from __future__ import annotations

import numpy as np

from grip_loop import workdir

#: Rows a block: a few int64 temporaries of 2 MB each (1 << 20 rows made them 8 MB, ~50-80 MB
#: together in `group_by_label` and the held-out split).
BLOCK = 1 << 18


def _block(a, lo: int, block: int) -> np.ndarray:
    workdir.trim_maps()  # the maps' pages read so far are not kept resident
    return np.asarray(a[lo : lo + block])


def bincount(labels, n: int, mask=None, *, block: int = BLOCK) -> np.ndarray:
    """int64 (n,): how many rows (where `mask`, if given) carry each label 0..n-1; labels
    outside [0, n) are not counted. `np.bincount(labels[mask], minlength=n)` for labels < n."""
    counts = np.zeros(n, np.int64)
    for lo in range(0, len(labels), block):
        lb = _block(labels, lo, block)
        ok = (lb >= 0) & (lb < n)
        if mask is not None:
            ok &= _block(mask, lo, block)
        counts += np.bincount(lb[ok], minlength=n)
    return counts


def masked_sum(values, mask, *, block: int = BLOCK) -> int:
    """`int(values[mask].sum())` of integer values, exactly."""
    return sum(
        int(_block(values, lo, block)[_block(mask, lo, block)].sum()) for lo in range(0, len(values), block)
    )


def fill(out, fn, *, block: int = BLOCK):
    """`out[lo:hi] = fn(lo, hi)` block after block; returns `out`."""
    for lo in range(0, len(out), block):
        hi = min(lo + block, len(out))
        out[lo:hi] = fn(lo, hi)
        workdir.trim_maps()
    return out


def group_by_label(labels, n: int, mask=None, *, out=None, block: int = BLOCK):
    """(order, bounds): the rows whose label is in [0, n) (and `mask`, if given) grouped by label,
    ascending inside a group (what `np.argsort(labels, kind="stable")` gives for them); group g
    is `order[bounds[g] : bounds[g + 1]]`. A counting sort, one block at a time: `out`, an int64
    array of at least that many rows (a memory map, say), receives the order; a new array
    otherwise."""
    bounds = np.concatenate([[0], np.cumsum(bincount(labels, n, mask, block=block))]).astype(np.int64)
    order = np.empty(bounds[-1], np.int64) if out is None else out[: bounds[-1]]
    nxt = bounds[:-1].copy()  # where the next row of each group goes
    for lo in range(0, len(labels), block):
        lb = _block(labels, lo, block)
        ok = (lb >= 0) & (lb < n)
        if mask is not None:
            ok &= _block(mask, lo, block)
        rows = np.flatnonzero(ok)
        s = np.argsort(lb[rows], kind="stable")
        rows, lb = rows[s], lb[rows[s]]
        counts = np.bincount(lb, minlength=n)
        first = np.cumsum(counts) - counts  # where each group starts among this block's rows
        order[nxt[lb] + np.arange(len(rows)) - first[lb]] = lo + rows
        nxt += counts
    return order, bounds
