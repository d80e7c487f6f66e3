"""What the GRIP loop reports, without Lightning: the metrics of a refresh, the W&B payloads and
the run's files (`grip_history.jsonl`, `grip_probe.csv`, the ledger's CSV and JSON,
`grip_budget_share.png`).

`grip_loop.loop.GripLoop` calls these; `grip_loop.callback`'s module docstring says what each
file holds and how a fresh or resumed run starts them.
"""

from __future__ import annotations

import csv
import io
import json
import logging
from pathlib import Path

import numpy as np

from grip_loop import ledger as ledger_mod
from grip_loop.history import HISTORY
from grip_loop.probe_report import COLUMNS, format_table

log = logging.getLogger("grip_loop.callback")  # the loop's messages keep the callback's logger

PROBE_CSV = "grip_probe.csv"
BUDGET_PNG = "grip_budget_share.png"

# at most this many clusters are drawn as lines (10 colours x 2 line styles, each told
# apart); more become a heatmap, one row per cluster
MAX_LINES = 20


# ---------------------------------------------------------------------- metrics and W&B
def refresh_metrics(e: dict, *, consumed, planned, interval: int | None, quality=None) -> dict[str, float]:
    """The scalars a refresh logs to every Lightning logger (`grip/...`); `quality` (Q_k) is
    logged with the first publication only (pass None after it)."""
    metrics = {"grip/version": float(e["version"]), "grip/drift": e["drift"], "grip/rap_failed": 0.0}
    for k, (nk, rk) in enumerate(zip(e["n"], e["r"], strict=True)):
        metrics[f"grip/n/{k:03d}"] = float(nk)
        metrics[f"grip/r/{k:03d}"] = float(rk)
        if "delta" in e and np.isfinite(e["delta"][k]):
            metrics[f"grip/delta/{k:03d}"] = float(e["delta"][k])
    if consumed is not None and consumed.sum() > 0:
        share_c = consumed / consumed.sum()
        share_p = planned / planned.sum()
        for k in range(len(share_c)):
            metrics[f"grip/consumed_share/{k:03d}"] = float(share_c[k])
            metrics[f"grip/planned_share/{k:03d}"] = float(share_p[k])
    for key in ("seconds", "cost_fraction", "reliability", "shrink", "lr", "ceiling", "ceiling_use"):
        if e.get(key) is not None:
            metrics[f"grip/rap_{key}" if key in ("seconds", "cost_fraction", "lr") else f"grip/{key}"] = (
                float(e[key])
            )
    if interval is not None:
        metrics["grip/refresh_interval"] = float(interval)
    if quality is not None:
        for k, q in enumerate(quality):
            metrics[f"grip/quality/{k:03d}"] = float(q)
    led = e.get("ledger")
    if led is not None:
        for k in range(len(e["n"])):
            metrics[f"grip/rep_max/{k:03d}"] = float(led["rep_max"][k])
            metrics[f"grip/rep_mean/{k:03d}"] = float(led["rep_mean"][k])
            metrics[f"grip/distinct/{k:03d}"] = float(led["distinct"][k])
            metrics[f"grip/capped/{k:03d}"] = float(led["capped"][k])
    return metrics


def ledger_wandb_table(wandb, step: int, names, rec: dict):
    cols = ["step", "cluster", "name", *ledger_mod.COLUMNS]
    data = [
        [step, k, names[k], *[row[c] for c in ledger_mod.COLUMNS]]
        for k, row in enumerate(ledger_mod.rows(rec))
    ]
    return wandb.Table(columns=cols, data=data)


def wandb_refresh_payload(wandb, names, e: dict, rows: list[dict] | None) -> dict:
    """W&B only: a refresh's series keyed by cluster name (readable chart legends), its ledger
    and probe tables."""
    b = float(sum(e["n"]))
    named = {f"grip/share_by_name/{name}": nk / b for name, nk in zip(names, e["n"], strict=True)}
    if "delta" in e:
        named.update(
            {
                f"grip/delta_by_name/{name}": d
                for name, d in zip(names, e["delta"], strict=True)
                if np.isfinite(d)
            }
        )
    if e.get("ledger") is not None:
        named["grip/ledger_table"] = ledger_wandb_table(wandb, e["step"], names, e["ledger"])
    if rows is not None:
        named["grip/probe_table"] = wandb.Table(
            columns=["step", *COLUMNS], data=[[e["step"], *[row[c] for c in COLUMNS]] for row in rows]
        )
    return {**named, "trainer/global_step": e["step"]}


def wandb_end_payload(
    wandb, history: list[dict], b_total: int, names, rec: dict | None, step: int, png: Path
):
    """W&B at the end of training: the final ledger table and the budget shares as a line series
    and as the chart's image."""
    steps = [h["step"] for h in history]
    ys = [[h["n"][k] / b_total for h in history] for k in range(len(names))]
    return {
        **({"grip/ledger_final": ledger_wandb_table(wandb, step, names, rec)} if rec is not None else {}),
        "grip/budget_share": wandb.plot.line_series(
            xs=steps,
            ys=ys,
            keys=list(names),
            title="GRIP budget share per cluster",
            xname="step",
        ),
        "grip/budget_share_png": wandb.Image(str(png)),
    }


# ---------------------------------------------------------------------- the run's files
def atomic_write(path: Path, text: str) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(text)
    tmp.replace(path)


def _rewrite_csv(path: Path, keep) -> None:
    """Keep the header and the rows `keep(row)` accepts (atomically)."""
    with open(path, newline="") as fh:
        rows = list(csv.reader(fh))
    buf = io.StringIO()
    csv.writer(buf).writerows(rows[:1] + [r for r in rows[1:] if keep(r)])
    atomic_write(path, buf.getvalue())


def start_fresh(d: Path) -> None:
    """A fresh run into `d`: another run's history, probe table and ledger move aside (*.prev)."""
    moved = []
    for name in (HISTORY, PROBE_CSV, ledger_mod.LEDGER_CSV, ledger_mod.LEDGER_JSON):
        f = d / name
        if f.exists():
            f.replace(f.with_name(f.name + ".prev"))
            moved.append(f.name)
    if moved:
        log.warning(
            "grip: %s held a previous run's %s; moved to *.prev, this run starts new files "
            "(resume with --ckpt_path to continue that run)",
            d,
            " and ".join(moved),
        )


def rewrite_to_checkpoint(d: Path, history: list[dict], refreshes: int) -> None:
    """A resumed run: the files cut back to the checkpoint's `history`. The history file keeps its
    first len(history) lines where they match the checkpoint's entries (they carry the probe
    tables), else gets the checkpoint's entries themselves."""
    hist, probe, ledger_csv = d / HISTORY, d / PROBE_CSV, d / ledger_mod.LEDGER_CSV
    old = []
    if hist.exists():
        for line in hist.read_text().splitlines():
            try:
                old.append(json.loads(line))
            except json.JSONDecodeError:
                break  # a torn last line
    keep = []
    for i, h in enumerate(history):
        o = old[i] if i < len(old) else None
        same = o is not None and o.get("step") == h["step"] and o.get("version") == h["version"]
        keep.append(o if same else h)
    atomic_write(hist, "".join(json.dumps(e) + "\n" for e in keep))
    last = history[-1]["step"] if history else -1
    if probe.exists():
        _rewrite_csv(probe, lambda r: r and r[0].isdigit() and int(r[0]) <= last and int(r[1]) <= refreshes)
    if ledger_csv.exists():  # the ledger's rows up to the checkpoint (refreshes, not an "end")
        _rewrite_csv(ledger_csv, lambda r: r and r[0].isdigit() and int(r[0]) <= last and r[1] != "end")


def append_refresh(d: Path, e: dict, rows: list[dict] | None, refreshes: int) -> None:
    """One publication: a history line (with the probe's per-cluster table, which the
    checkpointed history leaves out), and after a probe its rows in grip_probe.csv and the log."""
    with open(d / HISTORY, "a") as fh:
        fh.write(json.dumps(e if rows is None else {**e, "probe": rows}) + "\n")
    if rows is None:
        return
    path = d / PROBE_CSV
    new = not path.exists()
    with open(path, "a", newline="") as fh:
        w = csv.writer(fh)
        if new:
            w.writerow(["step", "refresh", *COLUMNS, "reliability", "shrink"])
        for row in rows:
            w.writerow(
                [e["step"], refreshes, *["" if row[c] is None else row[c] for c in COLUMNS]]
                + ["" if e.get("reliability") is None else e["reliability"], e.get("shrink", "")]
            )
    log.info(
        "grip: probe at step %d\n%s",
        e["step"],
        format_table(rows, float("nan") if e.get("reliability") is None else e["reliability"], e["shrink"]),
    )


def write_ledger(d: Path, step: int, event: str, names, rec: dict, *, max_repetition, run_tokens) -> None:
    """The ledger's rows in grip_ledger.csv and the latest ledger in grip_ledger.json (atomic)."""
    ledger_mod.append_csv(d / ledger_mod.LEDGER_CSV, step, event, names, rec)
    ledger_mod.write_json_atomic(
        d / ledger_mod.LEDGER_JSON,
        {
            "step": int(step),
            "event": event,
            "names": list(names),
            "max_repetition": max_repetition,
            "run_tokens": run_tokens,
            "ledger": rec,
        },
    )


def plot_budget_share(
    path: Path, history: list[dict], b_total: int, names, *, title: str, not_changed_why: str
) -> None:
    """Budget share of each cluster over steps, labelled with cluster names. Up to MAX_LINES
    clusters: a step plot (budgets change at refreshes), y from 0, every line its own colour
    and style pair. More clusters: a heatmap (cluster x refresh). A run with no budget change
    yet (shorter than one refresh): the current shares as bars, saying why (`not_changed_why`)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    steps = [h["step"] for h in history]
    shares = np.array([np.asarray(h["n"]) / b_total for h in history])
    k = shares.shape[1]
    names = list(names or [f"cluster {i}" for i in range(k)])
    changed = len(history) > 1 and not all(h["n"] == history[0]["n"] for h in history)
    if not changed:  # nothing to draw over time yet
        fig, ax = plt.subplots(figsize=(9, max(3.0, 0.25 * k + 1.2)))
        ax.barh(range(k), shares[-1], color="C0")
        ax.set_yticks(range(k), names, fontsize=7 if k > 20 else 9)
        ax.invert_yaxis()
        ax.set_xlim(0, max(float(shares[-1].max()) * 1.1, 1e-9))
        ax.set_xlabel("budget share n_k / B")
        ax.set_title(
            f"{title}\nat step {steps[-1]}: budgets not changed yet ({not_changed_why})", fontsize=10
        )
    elif k > MAX_LINES:
        fig, ax = plt.subplots(figsize=(10, max(3.5, 0.18 * k + 1.5)))
        im = ax.imshow(shares.T, aspect="auto", cmap="viridis", vmin=0, interpolation="nearest")
        ax.set_yticks(range(k), names, fontsize=6)
        ticks = range(0, len(steps), max(1, len(steps) // 12))
        ax.set_xticks(list(ticks), [str(steps[i]) for i in ticks])
        ax.set_xlabel("refresh (at step)")
        fig.colorbar(im, ax=ax, label="budget share n_k / B")
        ax.set_title(title)
    else:
        fig, ax = plt.subplots(figsize=(10, 4.8))
        styles = ["-", "--"]
        for i in range(k):
            ax.step(
                steps,
                shares[:, i],
                where="post",
                label=names[i],
                color=f"C{i % 10}",
                linestyle=styles[(i // 10) % 2],
                linewidth=1.4,
            )
        ax.set_ylim(0, float(shares.max()) * 1.1)  # from 0: a small drift looks small
        ax.set_xlabel("step")
        ax.set_ylabel("budget share n_k / B")
        ax.set_title(title)
        ax.legend(fontsize=7, ncol=1 if k <= 10 else 2, loc="upper left", bbox_to_anchor=(1.01, 1.0))
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
