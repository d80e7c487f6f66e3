"""Summarise a `grip ablate` folder over seeds: held-out loss per cluster group, how far each row
moved its budgets from row 2, and the probe's reliability per refresh.

    python benchmarks/ablation_report.py --runs runs/ablation-testbed --truth runs/testbed/truth.json
    python benchmarks/ablation_report.py --runs runs/ablation

Reads every `<row>/seed-S/eval/eval.json` (and the older layout's `<row>/eval/eval.json`) and
`<row>/.../csv/grip_history.jsonl`. With `--truth` (the testbed's truth.json) clusters are grouped
into the clean (real code: the Eq. 7 gate is open) and corrupted groups (token-weighted held-out
loss of each group) and every seed's difference between each row and row 1 (random) on the clean
group is listed, so "GRIP beats random on the learnable clusters in every seed" can be read off
directly. Prints markdown.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from pathlib import Path

import numpy as np
import yaml

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import ROOT  # noqa: E402

sys.path.insert(0, str(ROOT))


def _seed(run: Path) -> int:
    """The seed a run was trained with: its config.yaml's seed_everything (the folder name of the
    older single-seed layout, `<row>`, says nothing)."""
    try:
        return int(yaml.safe_load((run / "config.yaml").read_text())["seed_everything"])
    except (OSError, KeyError, TypeError, ValueError, yaml.YAMLError):
        return int(run.name.split("-")[1]) if run.name.startswith("seed-") else 0


def runs_of(folder: Path) -> list[tuple[str, int, Path]]:
    """(row, seed, folder) of every evaluated run: `<row>/seed-S/` and the older `<row>/`."""
    out = []
    for row in sorted(p for p in folder.iterdir() if p.is_dir()):
        for s in [*sorted(row.glob("seed-*")), row]:
            if (s / "eval" / "eval.json").is_file():
                out.append((row.name, _seed(s), s))
    return sorted(out, key=lambda r: (r[0], r[1]))


def group_loss(ev: dict, names: list[str]) -> float:
    cl = ev.get("heldout_cluster", {})
    nll = sum(cl[n]["loss"] * cl[n]["tokens"] for n in names if n in cl)
    tok = sum(cl[n]["tokens"] for n in names if n in cl)
    return nll / tok if tok else math.nan


def history(run: Path) -> list[dict]:
    f = run / "csv" / "grip_history.jsonl"
    return [json.loads(x) for x in f.read_text().splitlines() if x.strip()] if f.is_file() else []


def pm(xs) -> str:
    xs = np.asarray([x for x in xs if x == x], dtype=float)
    if not len(xs):
        return "-"
    return f"{xs.mean():.4f} ± {(xs.max() - xs.min()) / 2:.4f}"


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--runs", type=Path, required=True, help="a `grip ablate --out` folder")
    p.add_argument("--truth", type=Path, default=None, help="the testbed's truth.json (cluster groups)")
    a = p.parse_args()
    from grip_loop.manifest import load_manifest
    from train.ablate import static_shares

    runs = runs_of(a.runs)
    if not runs:
        print(f"{a.runs}: no evaluated runs", file=sys.stderr)
        return 2
    truth = json.loads(a.truth.read_text()) if a.truth else None
    rows: dict[str, list[dict]] = {}
    for row, seed, path in runs:
        ev = json.loads((path / "eval" / "eval.json").read_text())
        rc = yaml.safe_load((path / "config.yaml").read_text())
        static = static_shares(rc)
        hist = history(path)
        shares = [np.asarray(h["n"], float) / sum(h["n"]) for h in hist]
        rec = {
            "seed": seed,
            "overall": ev["heldout_overall"]["loss"],
            "humaneval": ev.get("humaneval", {}).get("loss", math.nan),
            "clusters": {k: v["loss"] for k, v in ev.get("heldout_cluster", {}).items()},
            "moved": [0.5 * float(np.abs(s - static).sum()) for s in shares],
            "reliability": [h["reliability"] for h in hist if h.get("reliability") is not None],
            "shares_last": shares[-1].tolist() if shares else static.tolist(),
            "static": static.tolist(),
        }
        if truth:
            rec["clean"] = group_loss(ev, truth["clean"])
            rec["corrupted"] = group_loss(ev, truth["corrupted"])
        rows.setdefault(row, []).append(rec)
        root = rc["data"]["dataset"]["init_args"]["root"]
        manifest_names = load_manifest(
            ROOT / root if not Path(root).is_absolute() else root, check_files=False
        ).names

    names = manifest_names  # cluster id order
    print(f"## {a.runs}: {len(runs)} evaluated runs\n")
    cols = (
        ["row", "seeds"]
        + (["clean", "corrupted"] if truth else [])
        + ["overall", "humaneval", "moved (mean)"]
    )
    cols += ["moved (end)"]
    print("| " + " | ".join(cols) + " |")
    print("|" + "|".join("---" if c == "row" else "---:" for c in cols) + "|")
    for row, rs in rows.items():
        cells = [row, str(len(rs))]
        if truth:
            cells += [pm([r["clean"] for r in rs]), pm([r["corrupted"] for r in rs])]
        cells += [pm([r["overall"] for r in rs]), pm([r["humaneval"] for r in rs])]
        cells += [pm([np.mean(r["moved"]) if r["moved"] else 0.0 for r in rs])]
        cells += [pm([r["moved"][-1] if r["moved"] else 0.0 for r in rs])]
        print("| " + " | ".join(cells) + " |")

    print("\nHeld-out loss per cluster (mean ± half-range over seeds):\n")
    print("| row | " + " | ".join(names) + " |")
    print("|---|" + "---:|" * len(names))
    for row, rs in rows.items():
        print(
            f"| {row} | " + " | ".join(pm([r["clusters"].get(n, math.nan) for r in rs]) for n in names) + " |"
        )

    first = next(iter(rows))
    if truth:
        print(
            f"\nLearnable-cluster held-out loss minus {first}'s, per seed (negative = better than {first}):\n"
        )
        seeds = sorted({r["seed"] for rs in rows.values() for r in rs})
        print("| row | " + " | ".join(f"seed {s}" for s in seeds) + " |")
        print("|---|" + "---:|" * len(seeds))
        ref = {r["seed"]: r["clean"] for r in rows[first]}
        for row, rs in rows.items():
            by = {r["seed"]: r["clean"] - ref.get(r["seed"], math.nan) for r in rs}
            print(f"| {row} | " + " | ".join(f"{by.get(s, math.nan):+.4f}" for s in seeds) + " |")

    print("\nProbe reliability per refresh (split-half Spearman; rows that probe):\n")
    print("| row | seed | reliability per refresh |")
    print("|---|---:|---|")
    for row, rs in rows.items():
        for r in rs:
            if r["reliability"]:
                print(f"| {row} | {r['seed']} | {' '.join(f'{x:.2f}' for x in r['reliability'])} |")

    for row, rs in rows.items():
        if rs and row.endswith("grip"):
            print(f"\nBudget share per cluster, row 2 (static) vs {row} at the end (mean over seeds):\n")
            hdr = names
            print("| | " + " | ".join(hdr) + " |")
            print("|---|" + "---:|" * len(hdr))
            print("| static | " + " | ".join(f"{x:.3f}" for x in rs[0]["static"]) + " |")
            end = np.mean([r["shares_last"] for r in rs], axis=0)
            print(f"| {row} | " + " | ".join(f"{x:.3f}" for x in end) + " |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
