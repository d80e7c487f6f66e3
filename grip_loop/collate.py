"""Batching GRIP blocks: `collate_blocks`, the DataLoader `collate_fn` that hands a worker's batch
to the main process as one buffer (through the worker's pipe, `PipedBatch`, or, when large, one
shared-memory storage; docs/benchmarks.md section 1), and `token_clusters`, which
expands a block's (or batch's) `cluster_spans` into the cluster of every token where a consumer
needs it.

Cluster attribution travels compactly: a block carries `cluster_spans`, one (cluster, tokens) row
per document piece in the block, in order (a few rows a block, where per-token cluster ids were
as many bytes as the token ids). Blocks hold different numbers of pieces, so `collate_blocks` pads
a batch's spans to its longest with (0, 0) rows: zero tokens, which attribute nothing.
"""

from __future__ import annotations

import math

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


def _fill_spans(out: torch.Tensor, spans: list) -> torch.Tensor:
    """Write each block's spans into `out` [B, S, 2], padded with (0, 0) rows."""
    lens = [sp.shape[0] for sp in spans]
    if all(n == out.shape[1] for n in lens):
        return _stack(spans, out=out)
    v, flat, at = out.numpy(), torch.cat(spans).numpy(), 0
    v[...] = 0
    for i, n in enumerate(lens):
        v[i, :n] = flat[at : at + n]
        at += n
    return out


def _stack(values: list, out: torch.Tensor | None = None) -> torch.Tensor:
    """torch.stack of same-shaped tensors (into `out`); 1-D ones through `cat` into its flat
    storage, several times faster than `stack(out=)`."""
    if out is not None and values[0].ndim == 1:
        torch.cat(values, out=out.view(-1))
        return out
    return torch.stack(values, out=out)


def collate_blocks(
    samples: list, *, pack: bool | None = None, pipe_bytes: int | None = None
) -> dict[str, torch.Tensor] | object:
    """`collate_fn` for GRIP blocks: `default_collate`'s batch, in a worker with every tensor in
    ONE buffer.

    The batch holds the same keys, values, shapes and dtypes as `default_collate` produces (for
    GRIP blocks `input_ids` [B, T], `cluster_spans` [B, S, 2] with S the most pieces of a block
    in the batch, (0, 0) rows padding the others, `cluster_ids` [B], `weights_version` [B]),
    each contiguous. In a DataLoader worker (or with `pack=True`) they are views into a single
    buffer, field after field: the hand-over of a batch to the main process, not the reading,
    bounds a worker's throughput. In a worker a batch of at most `pipe_bytes` (default
    `PIPE_BYTES`; 0: never) is a `PipedBatch`,
    which goes through the worker's pipe as bytes (no shared memory: docs/benchmarks.md section
    1); a larger one is allocated in shared memory, one storage for the batch (instead of one
    per field: 1.6-1.9x the tokens/s with 1-2 workers). In the main process (`pack=None`, no workers)
    nothing is handed over and plain `default_collate` is faster. Samples that are not dicts of
    same-shaped, same-dtype tensors (spans aside) always go to `default_collate`.
    """
    in_worker = get_worker_info() is not None
    if pack is None:
        pack = in_worker
    first = samples[0] if samples else None
    if (
        not isinstance(first, dict)
        or not first
        or any(not isinstance(s, dict) or list(s) != list(first) for s in samples)
    ):
        return default_collate(samples)
    values = {k: [s[k] for s in samples] for k in first}
    if not all(isinstance(v, torch.Tensor) for vals in values.values() for v in vals):
        return default_collate(samples)
    spans = values.pop(SPANS, None)
    if spans is not None and not all(sp.ndim == 2 and sp.shape[1] == 2 for sp in spans):
        return default_collate(samples)  # not GRIP spans: default_collate decides
    b = len(samples)
    shapes = {k: vals[0].shape for k, vals in values.items()}
    if spans is not None:
        shapes[SPANS] = torch.Size((max(sp.shape[0] for sp in spans), 2))
    same = all(v.shape == shapes[k] for k, vals in values.items() for v in vals)
    if not pack or not same:
        out = {k: _stack(values[k]) if same else default_collate(values[k]) for k in values}
        if spans is not None:
            out[SPANS] = _fill_spans(torch.empty((b, *shapes[SPANS]), dtype=spans[0].dtype), spans)
        return {k: out[k] for k in first}
    dtype = first[next(iter(first))].dtype
    if any(v.dtype != dtype for vals in values.values() for v in vals) or (
        spans is not None and any(sp.dtype != dtype for sp in spans)
    ):
        return default_collate(samples)
    sizes = {k: b * math.prod(shapes[k]) for k in first}
    total = sum(sizes.values())
    limit = PIPE_BYTES if pipe_bytes is None else pipe_bytes
    piped = in_worker and total * dtype.itemsize <= limit and not first[next(iter(first))].is_cuda
    if in_worker and not piped:  # as default_collate does in a worker: allocated shared, no copy when sent
        head = first[next(iter(first))]
        buf = head.new(head._typed_storage()._new_shared(total, device=head.device))
    else:
        buf = torch.empty(total, dtype=dtype)
    off, layout = 0, []
    for k in first:
        layout.append((k, off, (b, *shapes[k])))
        off += sizes[k]
    out = PipedBatch.of(buf, tuple(layout)) if piped else {}
    for k, off, shape in layout:
        view = out[k] if piped else buf[off : off + sizes[k]].view(shape)
        out[k] = _fill_spans(view, spans) if k == SPANS else _stack(values[k], out=view)
    return out


#: A worker's batch of at most this many bytes goes to the main process through the worker's
#: pipe, as bytes (`PipedBatch`); a larger one through shared memory, as torch sends tensors.
PIPE_BYTES = 4 << 20


class PipedBatch(dict):
    """A worker's batch (a plain dict to its reader) whose tensors are views of one flat CPU
    tensor, and which pickles as that tensor's bytes and the layout.

    Why: torch sends a tensor from a DataLoader worker through shared memory: the worker creates
    a shared-memory file, the main process fetches its descriptor over a socket from the
    worker's resource-sharer thread (connect, accept, send the descriptor), maps it, and unmaps
    and closes it when the batch is freed. For a batch of a few hundred kilobytes that costs
    more than copying the bytes through the worker's pipe (docs/benchmarks.md section 1, "Issue
    16: a worker's batch through its pipe"). Unpickled, the batch is a `PipedBatch` again: the
    same keys, shapes, dtypes and values, contiguous views of one writable buffer.

    Once a value is replaced or a key added or removed (a device transfer, pinning), it pickles
    as the plain dict it holds (each tensor as torch sends it)."""

    __slots__ = ("_flat", "_layout")

    @classmethod
    def of(cls, flat: torch.Tensor, layout: tuple) -> PipedBatch:
        """The batch of `layout` ((key, offset, shape) per field, in order) over `flat`."""
        batch = cls((k, flat[off : off + math.prod(shape)].view(shape)) for k, off, shape in layout)
        batch._flat, batch._layout = flat, layout
        return batch

    def _intact(self) -> bool:
        layout = getattr(self, "_layout", None)
        if layout is None or len(self) != len(layout):
            return False
        flat = self._flat
        at, size = flat.data_ptr(), flat.element_size()
        for k, off, shape in layout:
            v = self.get(k)
            if (
                not isinstance(v, torch.Tensor)
                or v.data_ptr() != at + off * size
                or v.dtype != flat.dtype
                or tuple(v.shape) != tuple(shape)
                or not v.is_contiguous()
            ):
                return False
        return True

    def __reduce__(self):
        if self._intact():
            flat = self._flat.numpy()
            return (_piped, (flat.tobytes(), flat.dtype.str, self._layout))
        return (dict, (dict(self),))

    def __copy__(self):  # shallow, as dict.copy: the same tensors (pinning copies, then replaces)
        if self._intact():
            return PipedBatch.of(self._flat, self._layout)
        return dict(self)


def _piped(raw: bytes, dtype: str, layout: tuple) -> PipedBatch:
    flat = torch.from_numpy(np.frombuffer(bytearray(raw), np.dtype(dtype)))  # writable: a bytearray
    return PipedBatch.of(flat, layout)
