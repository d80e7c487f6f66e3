"""The data ledger: what a GRIP run has read, per cluster, and why its budgets are what they are.

At every refresh and at the end of training `GripCallback` records, per cluster:

* `docs`: documents available (N_k, the cluster's training stream);
* `distinct`: distinct documents read at least once;
* `tokens`: tokens trained on (EOS included);
* `rep_max` / `rep_mean`: reads of a document, the most-read one and the mean over the N_k
  documents (the mean is the number of passes over the cluster's stream);
* `planned_share` / `consumed_share`: token shares the budgets planned vs those trained on;
* the decision that set the budget: `n` (documents per pass, Eq. 8), `r` (Eq. 7), `delta`
  (the probe's Delta L_k, None before a probe or for a flagged cluster), `gate` (Q_k > tau_th:
  replay allowed), the probe's `shrink` (reliability; one value per refresh), `capped` (the
  repetition guard's cap binds) and `projected` (passes over the stream by the end of the run
  if these budgets held: what the guard bounds).

Which documents are read: the dataset's draw i of cluster k reads position
(i mod n_k) mod min(n_k, N_k) of the cluster's stream (docs/sampler.md: one partition; with G
partitions every pass still reads each position once). The ledger replays that rule from the
number of documents trained on per cluster and budget version: a document counts when its
EOS token is in a consumed batch, under the budget version of the block it ends in. With one
partition (one rank, `num_workers: 0`) this is the dataset's exact read pattern, except that a
document drawn just before a budget switch and finished after it counts under the new
version; with G partitions the counts per full pass are exact and a partial pass is laid out
as one sweep. Per-document counts are one uint16 array over the corpus (2 bytes a document,
saturating at 65535), in the checkpoint as a byte tensor: resuming restores them exactly.

Under DDP every rank counts its own batches; the counts are summed over ranks at each refresh
and at the end (`flush`, a collective all ranks call together). What a rank counted after the
last refresh and before a checkpoint is in rank 0's checkpoint only (rank 0's own counts).
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import torch

#: per-cluster columns of a ledger record, in table order
COLUMNS = (
    "docs",
    "distinct",
    "tokens",
    "rep_max",
    "rep_mean",
    "planned_share",
    "consumed_share",
    "n",
    "r",
    "delta",
    "gate",
    "capped",
    "projected",
)
SEEN_MAX = np.iinfo(np.uint16).max


def positions_read(start: int, count: int, n: int, size: int) -> np.ndarray:
    """Reads of each position p in [0, size) by draws start .. start+count-1 of a cluster with
    budget n: draw i reads (i mod n) mod min(n, size). O(size), whatever `count` is."""
    out = np.zeros(size, dtype=np.int64)
    if count <= 0 or n <= 0 or size <= 0:
        return out
    lim = min(n, size)
    full, rem = divmod(int(count), int(n))
    p = np.arange(lim)
    if full:
        # one cycle v = 0 .. n-1 reads p (v mod lim) n // lim times, +1 for p < n mod lim
        out[:lim] += full * (n // lim + (p < n % lim))
    if rem:
        a = int(start) % n
        b = a + rem  # v in [a, b), wrapping at n
        segs = [(a, b)] if b <= n else [(a, n), (0, b - n)]
        for lo, hi in segs:
            # number of v in [lo, hi) with v = p (mod lim)
            out[:lim] += (hi - 1 - p) // lim - (lo - 1 - p) // lim
    return out


class Ledger:
    """Counts of what a run read (see the module docstring). `sizes`: N_k per cluster."""

    def __init__(self, sizes) -> None:
        self.sizes = np.asarray(sizes, dtype=np.int64)
        self.k = len(self.sizes)
        self.offsets = np.concatenate([[0], np.cumsum(self.sizes)])
        self.seen = np.zeros(int(self.offsets[-1]), dtype=np.uint16)  # reads per document
        self.draws = np.zeros(self.k, dtype=np.int64)  # documents drawn per cluster (the cursor)
        self.tokens = np.zeros(self.k, dtype=np.float64)
        self.planned = np.zeros(self.k, dtype=np.float64)
        # counted since the last flush: version -> [documents (K), tokens (K), planned tokens (K)]
        self.pending: dict[int, np.ndarray] = {}

    # ------------------------------------------------------------------ counting
    def observe(self, token_cluster_ids, input_ids, versions, eos_id: int, plan=None) -> None:
        """Count one consumed batch: tokens per cluster, documents ending in it (their EOS), per
        budget version of each block; `plan` (K) adds the tokens the budgets planned."""
        # counted where the batch lives (GPU in training): only K-vectors come to the host
        vs_t = torch.as_tensor(versions).reshape(-1)
        tc = torch.as_tensor(token_cluster_ids).reshape(len(vs_t), -1)
        ids = torch.as_tensor(input_ids).reshape(tc.shape)
        vs = vs_t.tolist()
        for v in sorted(set(vs)):
            rows = vs_t.to(tc.device) == v if len(set(vs)) > 1 else slice(None)
            t, d = tc[rows].reshape(-1), ids[rows].reshape(-1)
            acc = self.pending.setdefault(int(v), np.zeros((3, self.k)))
            acc[1] += torch.bincount(t, minlength=self.k)[: self.k].cpu().numpy()
            acc[0] += torch.bincount(t[d == eos_id], minlength=self.k)[: self.k].cpu().numpy()
        if plan is not None:
            first = self.pending.setdefault(int(vs[0]), np.zeros((3, self.k)))
            first[2] += np.asarray(plan, dtype=np.float64)

    def flush(self, budgets_of, world_size: int = 1) -> None:
        """Apply the pending counts (summed over ranks when world_size > 1: a collective).
        `budgets_of(version)` gives the budgets n of a version."""
        if world_size > 1 and torch.distributed.is_available() and torch.distributed.is_initialized():
            mine = {int(v): a.tolist() for v, a in self.pending.items()}
            gathered: list = [None] * world_size
            torch.distributed.all_gather_object(gathered, mine)
            merged: dict[int, np.ndarray] = {}
            for d in gathered:
                for v, a in d.items():
                    merged.setdefault(int(v), np.zeros((3, self.k)))
                    merged[int(v)] += np.asarray(a)
            self.pending = merged
        for v in sorted(self.pending):
            docs, toks, plan = self.pending[v]
            n = np.asarray(budgets_of(v), dtype=np.int64)
            for k in np.flatnonzero(docs > 0):
                reads = positions_read(int(self.draws[k]), int(docs[k]), int(n[k]), int(self.sizes[k]))
                sl = slice(int(self.offsets[k]), int(self.offsets[k + 1]))
                self.seen[sl] = np.minimum(self.seen[sl].astype(np.int64) + reads, SEEN_MAX).astype(np.uint16)
                self.draws[k] += int(docs[k])
            self.tokens += toks
            self.planned += plan
        self.pending = {}

    # ------------------------------------------------------------------ reporting
    def record(self, *, n, r, delta, gate, capped, projected, shrink) -> dict:
        """The per-cluster ledger now (call after `flush`), with the decision that set `n`."""
        distinct, rep_max, rep_mean = [], [], []
        for k in range(self.k):
            s = self.seen[int(self.offsets[k]) : int(self.offsets[k + 1])]
            distinct.append(int(np.count_nonzero(s)))
            rep_max.append(int(s.max()) if len(s) else 0)
            rep_mean.append(float(s.sum(dtype=np.int64) / len(s)) if len(s) else 0.0)

        def share(x):
            t = float(np.sum(x))
            return [float(v / t) if t > 0 else 0.0 for v in x]

        return {
            "docs": self.sizes.tolist(),
            "distinct": distinct,
            "tokens": [int(x) for x in self.tokens],
            "rep_max": rep_max,
            "rep_mean": rep_mean,
            "planned_share": share(self.planned),
            "consumed_share": share(self.tokens),
            "n": [int(x) for x in n],
            "r": [float(x) for x in r],
            "delta": None if delta is None else [float(x) if np.isfinite(x) else None for x in delta],
            "gate": [bool(x) for x in gate],
            "capped": [bool(x) for x in capped],
            "projected": None if projected is None else [float(x) for x in projected],
            "shrink": None if shrink is None else float(shrink),
        }

    # ------------------------------------------------------------------ checkpointing
    def state_dict(self) -> dict:
        return {
            "seen": torch.from_numpy(self.seen.view(np.uint8).copy()),
            "draws": self.draws.tolist(),
            "tokens": self.tokens.tolist(),
            "planned": self.planned.tolist(),
            "pending": {str(v): a.tolist() for v, a in self.pending.items()},
        }

    def load_state_dict(self, state: dict) -> None:
        seen = np.asarray(torch.as_tensor(state["seen"]).numpy(), dtype=np.uint8).view(np.uint16)
        if seen.shape != self.seen.shape:
            raise ValueError(
                f"ledger: the checkpoint counts {seen.size} documents, this corpus has {self.seen.size}"
            )
        self.seen = seen.copy()
        self.draws = np.asarray(state["draws"], dtype=np.int64)
        self.tokens = np.asarray(state["tokens"], dtype=np.float64)
        self.planned = np.asarray(state["planned"], dtype=np.float64)
        self.pending = {int(v): np.asarray(a, dtype=np.float64) for v, a in state["pending"].items()}


# ---------------------------------------------------------------------- files and tables
LEDGER_JSON = "grip_ledger.json"
LEDGER_CSV = "grip_ledger.csv"


def write_json_atomic(path: Path, doc) -> None:
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    tmp.write_text(json.dumps(doc) + "\n")
    os.replace(tmp, path)


def append_csv(path: Path, step: int, event: str, names, rec: dict) -> None:
    """One row per cluster: step, event (refresh / end), cluster, name, the COLUMNS."""
    import csv

    new = not path.exists()
    with open(path, "a", newline="") as fh:
        w = csv.writer(fh)
        if new:
            w.writerow(["step", "event", "cluster", "name", *COLUMNS, "shrink"])
        for k, row in enumerate(rows(rec)):
            w.writerow(
                [step, event, k, names[k], *["" if row[c] is None else row[c] for c in COLUMNS]]
                + ["" if rec.get("shrink") is None else rec["shrink"]]
            )


def rows(rec: dict) -> list[dict]:
    """Per-cluster dicts of a ledger record (missing columns: None)."""
    k = len(rec["n"])
    out = []
    for i in range(k):
        row = {}
        for c in COLUMNS:
            v = rec.get(c)
            row[c] = None if v is None else v[i]
        out.append(row)
    return out


def format_ledger(rec: dict, names, *, step=None, event: str = "", max_repetition=None) -> str:
    """The ledger as a fixed-width table, one row per cluster."""
    width = max([4] + [len(str(x)) for x in names])

    def f(v, spec):
        return "-" if v is None else format(v, spec)

    head = (
        f"{'k':>3} {'name':<{width}} {'docs':>7} {'distinct':>8} {'tokens':>11} {'rep_max':>7} "
        f"{'rep_mean':>8} {'plan%':>6} {'used%':>6} {'n_k':>7} {'r_k':>5} {'dL':>7} {'gate':>4} "
        f"{'cap':>3} {'proj':>5}"
    )
    lines = []
    if step is not None:
        lines.append(
            f"GRIP ledger at step {step}{f' ({event})' if event else ''}"
            + (f", max_repetition {max_repetition:g}" if max_repetition else ", repetition guard off")
            + (f", probe shrink {rec['shrink']:.2f}" if rec.get("shrink") is not None else "")
        )
    lines.append(head)
    for k, row in enumerate(rows(rec)):
        lines.append(
            f"{k:>3} {str(names[k]):<{width}} {f(row['docs'], 'd'):>7} {f(row['distinct'], 'd'):>8} "
            f"{f(row['tokens'], 'd'):>11} {f(row['rep_max'], 'd'):>7} {f(row['rep_mean'], '.2f'):>8} "
            f"{f(None if row['planned_share'] is None else 100 * row['planned_share'], '.1f'):>6} "
            f"{f(None if row['consumed_share'] is None else 100 * row['consumed_share'], '.1f'):>6} "
            f"{f(row['n'], 'd'):>7} {f(row['r'], '.2f'):>5} {f(row['delta'], '.4f'):>7} "
            f"{('open' if row['gate'] else 'shut') if row['gate'] is not None else '-':>4} "
            f"{('yes' if row['capped'] else '') if row['capped'] is not None else '-':>3} "
            f"{f(row['projected'], '.2f'):>5}"
        )
    return "\n".join(lines)
