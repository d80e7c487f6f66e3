"""One probe refresh as a table: what `grip probe` prints and writes, and what the callback logs
(`grip_probe.csv`, a W&B table per refresh).

`probe_rows` turns a `RAPResult` and the budgets before and after it into one row per cluster;
`probe_json` is the `grip probe --json` document:

    {"reliability": float, "shrink": float, "clusters": [{"id", "name", "size", "quality",
     "loss_init", "loss_final", "loss_base", "delta", "delta_abs", "delta_rel", "r",
     "n_before", "n_after", "share_before", "share_after", "flagged"}, ...]}

where `delta` is the value that fed Eq. 7 under the probe's settings (`RAPConfig.metric`).
Non-finite numbers (clusters without probe data) are written as null.
"""

from __future__ import annotations

import math

import numpy as np

from grip_loop.manifest import Manifest

COLUMNS = (
    "id",
    "name",
    "size",
    "quality",
    "loss_init",
    "loss_final",
    "loss_base",
    "delta",
    "delta_abs",
    "delta_rel",
    "r",
    "n_before",
    "n_after",
    "share_before",
    "share_after",
    "flagged",
)


def _num(x) -> float | None:
    x = float(x)
    return x if math.isfinite(x) else None


def probe_rows(manifest: Manifest, res, r, n_before, n_after) -> list[dict]:
    """One dict per cluster with the COLUMNS keys (numbers, or None where not finite)."""
    nb, na = np.asarray(n_before, np.float64), np.asarray(n_after, np.float64)
    rows = []
    for c in manifest.clusters:
        k = c.id
        rows.append(
            {
                "id": k,
                "name": c.label,
                "size": c.n_docs,
                "quality": _num(c.quality),
                "loss_init": _num(res.loss_init[k]),
                "loss_final": _num(res.loss_final[k]),
                "loss_base": _num(res.loss_base[k]),
                "delta": _num(res.delta[k]),
                "delta_abs": _num(res.delta_abs[k]),
                "delta_rel": _num(res.delta_rel[k]),
                "r": _num(r[k]),
                "n_before": int(nb[k]),
                "n_after": int(na[k]),
                "share_before": _num(nb[k] / max(nb.sum(), 1)),
                "share_after": _num(na[k] / max(na.sum(), 1)),
                "flagged": bool(res.flagged[k]) if len(res.flagged) > k else False,
            }
        )
    return rows


def probe_json(rows: list[dict], res, shrink: float) -> dict:
    return {"reliability": _num(res.reliability), "shrink": float(shrink), "clusters": rows}


def format_table(rows: list[dict], reliability: float, shrink: float) -> str:
    """A fixed-width text table of `probe_rows` plus the reliability line."""

    def f(v, spec):
        return "-" if v is None else format(v, spec)

    width = max([4] + [len(r["name"]) for r in rows])
    head = (
        f"{'k':>3} {'name':<{width}} {'N_k':>7} {'Q_k':>5} {'L_init':>7} {'L_base':>7} {'L_final':>7} "
        f"{'Delta':>8} {'rel':>7} {'r_k':>5} {'n_before':>9} {'n_after':>9} {'share':>13}"
    )
    lines = [head]
    for r in rows:
        share = f"{f(r['share_before'], '.3f')}->{f(r['share_after'], '.3f')}"
        lines.append(
            f"{r['id']:>3} {r['name']:<{width}} {r['size']:>7} {f(r['quality'], '.2f'):>5} "
            f"{f(r['loss_init'], '.3f'):>7} {f(r['loss_base'], '.3f'):>7} {f(r['loss_final'], '.3f'):>7} "
            f"{f(r['delta_abs'], '.4f'):>8} {f(r['delta_rel'], '.4f'):>7} {f(r['r'], '.2f'):>5} "
            f"{r['n_before']:>9} {r['n_after']:>9} {share:>13}"
            + ("  (flagged: too few docs)" if r["flagged"] else "")
        )
    rel = "n/a (fewer than 3 probed clusters)" if not math.isfinite(reliability) else f"{reliability:.3f}"
    lines.append(
        f"split-half reliability (Spearman of Delta L between evaluation halves): {rel}; shrink {shrink:.2f}"
    )
    return "\n".join(lines)
