"""Batching GRIP blocks: `collate_blocks`, the DataLoader `collate_fn` that hands a worker's batch
to the main process in one shared-memory storage (docs/benchmarks.md)."""

from __future__ import annotations

import torch
from torch.utils.data import default_collate, get_worker_info


def collate_blocks(samples: list, *, pack: bool | None = None) -> dict[str, torch.Tensor] | object:
    """`collate_fn` for GRIP blocks: `default_collate`'s batch, in a worker with every tensor in
    ONE storage.

    The batch holds the same keys, values, shapes and dtypes as `default_collate` produces (for
    GRIP blocks `input_ids` [B, T], `token_cluster_ids` [B, T], `cluster_ids` [B],
    `weights_version` [B]), each contiguous. In a DataLoader worker (or with `pack=True`) they
    are views into a single buffer, field after field: a worker hands a batch to the main
    process through shared memory one storage at a time, and that hand-over, not the reading,
    bounds a worker's throughput (one storage instead of one per field measured 1.6-1.9x the
    tokens/s with 1-2 workers, docs/benchmarks.md). In the main process (`pack=None`, no
    workers) nothing is handed over and plain `default_collate` is faster. Samples that are
    not dicts of same-shaped, same-dtype tensors always go to `default_collate`.
    """
    in_worker = get_worker_info() is not None
    if pack is None:
        pack = in_worker
    first = samples[0] if samples else None
    if not pack or not isinstance(first, dict) or not first:
        return default_collate(samples)
    keys = list(first)
    dtype = first[keys[0]].dtype if isinstance(first[keys[0]], torch.Tensor) else None
    for s in samples:
        if not isinstance(s, dict) or list(s) != keys:
            return default_collate(samples)
        for k in keys:
            v = s[k]
            if not isinstance(v, torch.Tensor) or v.dtype != dtype or v.shape != first[k].shape:
                return default_collate(samples)
    b = len(samples)
    sizes = [b * first[k].numel() for k in keys]
    buf = torch.empty(sum(sizes), dtype=dtype)
    if in_worker:
        buf.share_memory_()  # as default_collate does in a worker: no copy when it is sent
    out, off = {}, 0
    for k, n in zip(keys, sizes, strict=True):
        view = buf[off : off + n].view(b, *first[k].shape)
        torch.stack([s[k] for s in samples], out=view)
        out[k] = view
        off += n
    return out
