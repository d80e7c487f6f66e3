"""Reading a run's GRIP files back: `grip_history.jsonl`, `grip_ledger.json` and the run's
`config.yaml`, with errors that name the file, the line and the fix.

Histories written before the ledger (no `ledger`, `rule` or `capped` fields) are read as they
are: `rule_of` then takes the budget settings from the `config.yaml` that LightningCLI saved
next to the history (the GripCallback's init_args), and a run recorded before the repetition
guard replays with the guard off.
"""

from __future__ import annotations

import json
from pathlib import Path

HISTORY = "grip_history.jsonl"


class HistoryError(ValueError):
    """A history or run folder that cannot be read; the message names the file and the fix."""


def find_run_file(run_dir: str | Path, name: str) -> Path | None:
    """`name` in RUN_DIR, RUN_DIR/csv, or below RUN_DIR (the most recently written one)."""
    d = Path(run_dir)
    if d.is_file():
        return d if d.name == name else None
    for cand in (d / name, d / "csv" / name):
        if cand.is_file():
            return cand
    found = sorted(d.rglob(name), key=lambda p: p.stat().st_mtime) if d.is_dir() else []
    return found[-1] if found else None


def read_history(path: str | Path) -> list[dict]:
    """Every entry of a grip_history.jsonl. A line that is not JSON raises HistoryError naming
    the file and line, except a partial last line of a run that is still writing (no newline
    at the end), which is skipped."""
    p = Path(path)
    try:
        text = p.read_text()
    except OSError as exc:
        raise HistoryError(f"{p}: cannot read ({exc})") from exc
    lines = text.split("\n")
    out = []
    for i, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            e = json.loads(line)
        except json.JSONDecodeError as exc:
            if i == len(lines):  # no newline after it: being written right now
                continue
            raise HistoryError(
                f"{p}: line {i} is not a complete JSON record ({exc.msg} at column {exc.colno}); the file "
                "is truncated or corrupt: restore it, or cut it before that line"
            ) from exc
        for key in ("step", "version", "n", "r"):
            if key not in e:
                raise HistoryError(f"{p}: line {i} has no {key!r}: not a GRIP history record")
        out.append(e)
    if not out:
        raise HistoryError(f"{p}: no history records (has the run published its first budgets?)")
    return out


def rule_of(entry: dict, history_path: Path) -> dict:
    """The budget rule that produced `entry`: its own `rule` field, or (older histories) the
    GripCallback settings in the config.yaml next to the history, else the defaults."""
    if "rule" in entry:
        return dict(entry["rule"])
    cfg = history_path.parent / "config.yaml"
    rule: dict = {"mode": "grip", "max_repetition": None, "run_tokens": None}
    if cfg.is_file():
        import yaml

        try:
            doc = yaml.safe_load(cfg.read_text()) or {}
        except yaml.YAMLError as exc:
            raise HistoryError(f"{cfg}: not valid YAML ({exc})") from exc
        for cb in (doc.get("trainer") or {}).get("callbacks") or []:
            if isinstance(cb, dict) and str(cb.get("class_path", "")).endswith("GripCallback"):
                args = cb.get("init_args") or {}
                rule["mode"] = args.get("mode", "grip")
                rule.update({k: v for k, v in (args.get("budget") or {}).items()})
                rule["max_repetition"] = (args.get("budget") or {}).get("max_repetition")
                rule["reliability_threshold"] = (args.get("rap") or {}).get("reliability_threshold", 0.5)
                rule["refresh_every_n_steps"] = args.get("refresh_every_n_steps")
                rule["first_refresh_after_steps"] = args.get("first_refresh_after_steps")
        tr, data = doc.get("trainer") or {}, doc.get("data") or {}
        seq = ((data.get("dataset") or {}).get("init_args") or {}).get("seq_len")
        devices = tr.get("devices")
        world = (devices if isinstance(devices, int) and devices > 0 else 1) * int(tr.get("num_nodes") or 1)
        if isinstance(tr.get("max_steps"), int) and tr["max_steps"] > 0:
            rule["max_steps"] = tr["max_steps"]
        if data.get("batch_size") and seq:
            rule["tokens_per_step"] = float(
                data["batch_size"] * seq * world * int(tr.get("accumulate_grad_batches") or 1)
            )
    return rule
