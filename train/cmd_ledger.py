"""`grip ledger RUN_DIR`: the data ledger of a run (finished or still running), from its files.

    grip ledger runs/quickstart               # the latest ledger (end of training, or last refresh)
    grip ledger runs/quickstart --all         # one table per refresh
    grip ledger runs/quickstart --json OUT    # the records as JSON

Per cluster: documents available, distinct documents read, tokens trained on, reads per
document (max, and mean over the cluster's documents = passes over its stream), planned vs
consumed token shares, and the decision that set the budget (n_k, r_k, Delta L_k, quality gate,
repetition cap, projected passes by the end of the run). Read from `grip_ledger.json` (rewritten
atomically at every refresh) and `grip_history.jsonl` in RUN_DIR, RUN_DIR/csv or below. A run
recorded before the ledger existed shows its budgets and probe values only.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path


def main(argv: list[str]) -> int:
    p = argparse.ArgumentParser(
        prog="grip ledger", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument(
        "run_dir", help="a training run's folder (trainer.default_root_dir or its csv/ log folder)"
    )
    p.add_argument("--all", action="store_true", help="one table per refresh, not only the latest")
    p.add_argument("--json", default=None, metavar="OUT", help="also write the records shown as JSON")
    # a user-fixable error (ValueError, FileNotFoundError) becomes one line and exit 2 in train.cli.main
    return run(p.parse_args(argv))


def _names(hist: list[dict], k: int) -> list[str]:
    for e in reversed(hist):
        if e.get("probe"):
            return [str(row.get("name", i)) for i, row in enumerate(e["probe"])]
    return [f"cluster {i}" for i in range(k)]


def _budget_only(e: dict) -> dict:
    """A ledger-shaped record of a history entry written before the ledger: budgets only."""
    k, b = len(e["n"]), float(sum(e["n"]))
    nan = [None] * k
    return {
        "docs": nan,
        "distinct": nan,
        "tokens": nan,
        "rep_max": nan,
        "rep_mean": nan,
        "planned_share": [x / b for x in e["n"]],
        "consumed_share": nan,
        "n": e["n"],
        "r": e["r"],
        "delta": e.get("delta"),
        "gate": nan,
        "capped": nan,
        "projected": nan,
        "shrink": e.get("shrink"),
    }


def run(a) -> int:
    from grip_loop.history import HISTORY, find_run_file, read_history
    from grip_loop.ledger import LEDGER_JSON, format_ledger

    run_dir = Path(a.run_dir)
    if not run_dir.exists():
        raise FileNotFoundError(f"{run_dir}: no such run folder")
    hist_path = find_run_file(run_dir, HISTORY)
    latest_path = find_run_file(run_dir, LEDGER_JSON)
    if hist_path is None and latest_path is None:
        raise FileNotFoundError(
            f"{run_dir}: no {HISTORY} or {LEDGER_JSON} here or below: not a GRIP run folder, or the run "
            "has not published its first budgets yet"
        )
    hist = read_history(hist_path) if hist_path is not None else []
    shown: list[tuple[int, str, dict, dict]] = []  # (step, event, record, extra)
    if a.all:
        for e in hist:
            rec = e.get("ledger") or _budget_only(e)
            shown.append((e["step"], "refresh", rec, e.get("rule") or {}))
    if latest_path is not None:
        try:
            doc = json.loads(latest_path.read_text())
        except json.JSONDecodeError as exc:
            raise ValueError(
                f"{latest_path}: not valid JSON ({exc.msg}); it is rewritten at every refresh"
            ) from exc
        if not a.all or doc.get("event") == "end":
            extra = {"max_repetition": doc.get("max_repetition"), "names": doc.get("names")}
            shown.append((doc["step"], doc.get("event", ""), doc["ledger"], extra))
    elif not a.all:
        e = hist[-1]
        rec = e.get("ledger") or _budget_only(e)
        shown.append((e["step"], "last refresh", rec, e.get("rule") or {}))
        if "ledger" not in e:
            print(
                f"{hist_path}: recorded before the ledger existed: budgets and probe values only",
                file=sys.stderr,
            )
    for step, event, rec, extra in shown:
        k = len(rec["n"])
        names = extra.get("names") or _names(hist, k)
        print(format_ledger(rec, names, step=step, event=event, max_repetition=extra.get("max_repetition")))
        print()
    if a.json:
        out = Path(a.json)
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(
            json.dumps([{"step": s, "event": ev, "ledger": r} for s, ev, r, _ in shown], indent=1) + "\n"
        )
        print(f"wrote {out}", file=sys.stderr)
    return 0
