"""The probe's windows: what `rapid_adaptation_probe` accepts (LongTensors or ProbeBatches, a
list or a dict), normalised into adaptation / evaluation windows and split halves, and the
AdamW step schedule over them (`grip_loop.rap`)."""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import torch

from grip_loop.rap_config import ProbeBatch, RAPConfig

# ----------------------------------------------------------------------------- probe windows


def _check_ids(c, name: str, t) -> None:
    where = f"probe_batches[{c}]{'.' + name if name else ''}"
    if not torch.is_tensor(t) or t.dim() != 2 or t.dtype != torch.long:
        got = tuple(t.shape) if torch.is_tensor(t) else type(t).__name__
        raise ValueError(f"{where}: expected a LongTensor (n, T), got {got}")
    if t.shape[0] and t.shape[1] < 2:
        raise ValueError(f"{where}: windows need T >= 2 tokens, got T={t.shape[1]}")


def _alternate(n: int) -> torch.Tensor:
    return torch.arange(n) % 2


def _kept(docs: int | None, kept: int, total: int) -> int:
    """Documents behind `kept` of `total` windows (`docs` None = one per window)."""
    if docs is None:
        return kept
    return docs if kept >= total else int(docs * kept // max(total, 1))


def _normalise(c, entry, cfg: RAPConfig) -> ProbeBatch | None:
    """`entry` (a LongTensor or a ProbeBatch) as a ProbeBatch with eval windows and halves
    resolved for `cfg`; None = no probe data for this cluster."""
    if entry is None:
        return None
    if torch.is_tensor(entry):
        _check_ids(c, "", entry)
        entry = ProbeBatch(adapt=entry)
    elif not isinstance(entry, ProbeBatch):
        raise ValueError(
            f"probe_batches[{c}]: expected a LongTensor (n, T) or a ProbeBatch, got {type(entry).__name__}"
        )
    _check_ids(c, "adapt", entry.adapt)
    adapt, ev, docs_a, docs_e = entry.adapt, entry.eval, entry.adapt_docs, entry.eval_docs
    if cfg.eval_split == "split" and ev is None:  # one tensor: rows alternate between the roles
        adapt, ev = entry.adapt[0::2], entry.adapt[1::2]
        n = entry.adapt_docs
        docs_a, docs_e = (None, None) if n is None else (-(-n // 2), n // 2)
    if adapt.shape[0] == 0:
        return None
    bs = cfg.batch_size or adapt.shape[0]
    docs_a = _kept(docs_a, min(bs, adapt.shape[0]), adapt.shape[0])
    adapt = adapt[:bs]
    if cfg.eval_split == "none":
        return ProbeBatch(adapt, adapt, _alternate(adapt.shape[0]), docs_a, docs_a)
    _check_ids(c, "eval", ev)
    if ev.shape[0] == 0:  # no evaluation document: flagged (too few documents), never probed
        return ProbeBatch(adapt, ev, torch.zeros(0, dtype=torch.long), docs_a, 0)
    half = _alternate(ev.shape[0]) if entry.eval_half is None else torch.as_tensor(entry.eval_half)
    if half.shape != (ev.shape[0],) or not bool(((half == 0) | (half == 1)).all()):
        raise ValueError(f"probe_batches[{c}].eval_half: expected ({ev.shape[0]},) zeros and ones")
    docs_e = _kept(docs_e, min(bs, ev.shape[0]), ev.shape[0])
    return ProbeBatch(adapt, ev[:bs], half[:bs].long(), docs_a, docs_e)


def _thin(pb: ProbeBatch, cfg: RAPConfig) -> bool:
    """Too few documents for a stable estimate: flagged, kept neutral."""
    return min(pb.adapt_docs, pb.eval_docs) < cfg.min_docs


def _as_dict(probe_batches, num_clusters, cfg: RAPConfig) -> tuple[dict[int, ProbeBatch | None], int]:
    if isinstance(probe_batches, Mapping):
        raw = {int(k): v for k, v in probe_batches.items()}
    elif isinstance(probe_batches, Sequence):
        raw = dict(enumerate(probe_batches))
    else:
        raise ValueError(
            f"probe_batches: expected a dict or list of LongTensors / ProbeBatches, got {type(probe_batches)}"
        )
    k_max = max(raw, default=-1) + 1
    k = k_max if num_clusters is None else int(num_clusters)
    if k < k_max or any(c < 0 for c in raw):
        raise ValueError(f"num_clusters: {num_clusters} does not cover cluster ids {sorted(raw)}")
    return {c: _normalise(c, v, cfg) for c, v in raw.items()}, k


def _calibration_tokens(batches: Sequence[ProbeBatch]) -> int:
    return int(sum(b.adapt.shape[1] for b in batches))


def _schedule(n: int, cfg: RAPConfig, seed: int) -> list[torch.Tensor]:
    """Window indices of every AdamW step: `epochs` shuffled passes in micro-batches (or
    `steps` steps cycling through such passes); full batch = every window every step."""
    total = cfg.num_steps(n)
    if cfg.micro_batch is None or cfg.micro_batch >= n:
        return [torch.arange(n)] * total
    gen = torch.Generator().manual_seed(seed)
    out: list[torch.Tensor] = []
    while len(out) < total:
        perm = torch.randperm(n, generator=gen)
        out += [perm[i : i + cfg.micro_batch] for i in range(0, n, cfg.micro_batch)]
    return out[:total]
