"""Batching GRIP blocks: `collate_blocks`, the DataLoader `collate_fn` that hands a worker's batch
to the main process in one shared-memory storage (docs/benchmarks.md), and `token_clusters`, which
expands a block's (or batch's) `cluster_spans` into the cluster of every token where a consumer
needs it.

Cluster attribution travels compactly: a block carries `cluster_spans`, one (cluster, tokens) row
per document piece in the block, in order (a few rows a block, where per-token cluster ids were
as many bytes as the token ids). Blocks hold different numbers of pieces, so `collate_blocks` pads
a batch's spans to its longest with (0, 0) rows: zero tokens, which attribute nothing.
"""

from __future__ import annotations

import numpy as np
import torch
from torch.utils.data import default_collate, get_worker_info

#: the block field of (cluster, tokens) rows; ragged across blocks, padded by `collate_blocks`
SPANS = "cluster_spans"


def token_clusters(batch) -> torch.Tensor:
    """The cluster of every token, shaped like `batch["input_ids"]` ([T] for a block, [B, T] for a
    batch), on the device of the spans: the expansion of `batch["cluster_spans"]`."""
    ids, spans = batch["input_ids"], batch[SPANS]
    flat = spans.reshape(-1, 2)
    out = torch.repeat_interleave(flat[:, 0], flat[:, 1], output_size=ids.numel())
    return out.reshape(ids.shape)


def cluster_token_counts(spans: torch.Tensor, k: int) -> np.ndarray:
    """Tokens per cluster (int64, K entries) of the spans of a block or a batch, on the host."""
    flat = spans.reshape(-1, 2).cpu().numpy()
    return np.bincount(flat[:, 0], weights=flat[:, 1], minlength=k).astype(np.int64)


def _pad_spans(samples: list) -> list:
    """`samples` with their spans padded to the longest with (0, 0) rows (a copy where needed)."""
    rows = max(s[SPANS].shape[0] for s in samples)
    out = []
    for s in samples:
        sp = s[SPANS]
        if sp.shape[0] != rows:
            padded = sp.new_zeros((rows, 2))
            padded[: sp.shape[0]] = sp
            s = {**s, SPANS: padded}
        out.append(s)
    return out


def collate_blocks(samples: list, *, pack: bool | None = None) -> dict[str, torch.Tensor] | object:
    """`collate_fn` for GRIP blocks: `default_collate`'s batch, in a worker with every tensor in
    ONE storage.

    The batch holds the same keys, values, shapes and dtypes as `default_collate` produces (for
    GRIP blocks `input_ids` [B, T], `cluster_spans` [B, S, 2] with S the most pieces of a block
    in the batch, (0, 0) rows padding the others, `cluster_ids` [B], `weights_version` [B]),
    each contiguous. In a DataLoader worker (or with `pack=True`) they are views into a single
    shared-memory buffer, field after field: a worker hands a batch to the main process
    through shared memory one storage at a time, and that hand-over, not the reading, bounds a
    worker's throughput (one storage instead of one per field measured 1.6-1.9x the tokens/s
    with 1-2 workers, docs/benchmarks.md). In the main process (`pack=None`, no workers)
    nothing is handed over and plain `default_collate` is faster. Samples that are not dicts of
    same-shaped, same-dtype tensors (spans aside) always go to `default_collate`.
    """
    in_worker = get_worker_info() is not None
    if pack is None:
        pack = in_worker
    first = samples[0] if samples else None
    if isinstance(first, dict) and all(
        isinstance(s, dict) and isinstance(s.get(SPANS), torch.Tensor) for s in samples
    ):
        if any(s[SPANS].shape != first[SPANS].shape for s in samples):
            samples = _pad_spans(samples)
            first = samples[0]
    if not pack or not isinstance(first, dict) or not first:
        return default_collate(samples)
    keys = list(first)
    head = first[keys[0]]
    dtype = head.dtype if isinstance(head, torch.Tensor) else None
    for s in samples:
        if not isinstance(s, dict) or list(s) != keys:
            return default_collate(samples)
        for k in keys:
            v = s[k]
            if not isinstance(v, torch.Tensor) or v.dtype != dtype or v.shape != first[k].shape:
                return default_collate(samples)
    b = len(samples)
    sizes = [b * first[k].numel() for k in keys]
    if in_worker:  # as default_collate does in a worker: allocated shared, no copy when it is sent
        buf = head.new(head._typed_storage()._new_shared(sum(sizes), device=head.device))
    else:
        buf = torch.empty(sum(sizes), dtype=dtype)
    out, off = {}, 0
    for k, n in zip(keys, sizes, strict=True):
        view = buf[off : off + n].view(b, *first[k].shape)
        torch.stack([s[k] for s in samples], out=view)
        out[k] = view
        off += n
    return out
