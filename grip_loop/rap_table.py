"""The Rapid Adaptation Probe's per-cluster table (`grip_loop.rap`): its rows (`_ROWS`: the
two halves' summed losses at theta_init, after adaptation and of the baseline, their token
counts, the learning rate, logit ceiling and FLOPs), its combination across ranks that each own
some clusters, and the `RAPResult` made from it (Delta L_k, split-half reliability)."""

from __future__ import annotations

import numpy as np
import torch

from grip_loop.rap_config import RAPConfig, RAPResult, spearman

_ROWS = ("init0", "init1", "final0", "final1", "base0", "base1", "n0", "n1", "lr", "ceiling", "flops")


def _result(table: np.ndarray, cfg: RAPConfig, flagged: np.ndarray, seconds: float) -> RAPResult:
    row = dict(zip(_ROWS, table, strict=True))
    n = row["n0"] + row["n1"]
    with np.errstate(invalid="ignore", divide="ignore"):
        loss_init = (row["init0"] + row["init1"]) / n
        loss_final = (row["final0"] + row["final1"]) / n
        if cfg.baseline == "init":
            base = (row["init0"], row["init1"])
        else:
            base = (row["base0"], row["base1"])
        loss_base = (base[0] + base[1]) / n
        delta_abs = loss_base - loss_final
        delta_rel = delta_abs / loss_base
        halves = []
        for h in (0, 1):
            nh = row[f"n{h}"]
            lb, lf = base[h] / nh, row[f"final{h}"] / nh
            halves.append((lb - lf) / lb if cfg.metric == "relative" else lb - lf)
    delta_half = np.array(halves)
    return RAPResult(
        delta=delta_rel if cfg.metric == "relative" else delta_abs,
        delta_abs=delta_abs,
        delta_rel=delta_rel,
        loss_init=loss_init,
        loss_final=loss_final,
        loss_base=loss_base,
        seconds=seconds,
        flops=float(np.sum(row["flops"])),
        delta_half=delta_half,
        reliability=spearman(delta_half[0], delta_half[1]),
        flagged=flagged,
        lr=row["lr"],
        ceiling=row["ceiling"],
    )


def _all_reduce_owned(table: np.ndarray, mine: list[int], device: torch.device) -> np.ndarray:
    """Combine per-rank tables where each cluster has exactly one owner (NaN = no data anywhere);
    the last row (FLOPs) is summed as is."""
    dist = torch.distributed
    k = table.shape[1]
    owned = np.zeros(k)
    owned[mine] = 1.0
    body = np.where(owned > 0, table[:-1], 0.0)
    packed = np.concatenate([body, table[-1:], owned[None]], axis=0)
    dev = device if dist.get_backend() == "nccl" else torch.device("cpu")
    t = torch.as_tensor(packed, dtype=torch.float64, device=dev)
    dist.all_reduce(t)
    out = t.cpu().numpy()
    have = out[-1] > 0
    return np.concatenate([np.where(have, out[:-2], np.nan), out[-2:-1]], axis=0)
