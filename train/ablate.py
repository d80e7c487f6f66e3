"""`grip ablate`: train and evaluate every sampler row, then tabulate and plot.

Each row is a training YAML (configs/ablation/*.yaml: identical except for GripCallback.mode).
For every (row, seed) the runner writes `DIR/<row>/seed-S/config.yaml`: the row's config
with every run folder redirected there (trainer.default_root_dir, each logger's save_dir,
ModelCheckpoint.dirpath), the seed set (seed_everything, the dataset's seed, the model's init
seed) and `--set` overrides applied. It then trains it in a fresh process
(`python -m train.main fit --config ...`, or under torchrun with `nproc > 1`), so rows cannot
share state, and evaluates the last checkpoint with `train.eval.evaluate`.

A (row, seed) whose training finished (`train_done.json`) is not retrained, and one with an
`eval.json` is not re-evaluated: re-running resumes an interrupted ablation. A finished run is
reused only if its `config.yaml` is the one this invocation would write (same seed, `--set`
overrides and row file); otherwise `grip ablate` stops naming the folder (`run_folder`). Cost: a row's training is restarted from scratch if it was interrupted
(no mid-row resume).

Outputs: `results.csv` (one line per run), `results.md` (per-run table and, with several
seeds, mean ± half-range per row), `results.png` (held-out loss per language and overall,
HumanEval loss, one bar group per row; error bars = min/max over seeds).
"""

from __future__ import annotations

import csv
import json
import math
import os
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import yaml

from grip_loop._checks import check_int
from train.eval import EvalConfig, evaluate
from train.overrides import parse_value

ROOT = Path(__file__).resolve().parent.parent


@dataclass(kw_only=True)
class AblateConfig:
    """What `grip ablate` runs: which rows, seeds and overrides, where, and how each is evaluated."""

    rows: str = "configs/ablation"
    """A folder of row YAMLs (run in name order) or one YAML."""
    out: str = "runs/ablation"
    """Output folder: one run folder per row and seed, results.csv/.md/.png."""
    seeds: list[int] = field(default_factory=lambda: [0])
    """Seeds every row is trained with."""
    overrides: list[str] = field(default_factory=list)
    """Dotted KEY=VALUE (a YAML value) applied to every row, e.g. trainer.max_steps=50."""
    only: list[str] = field(default_factory=list)
    """Row names to run (default: all)."""
    nproc: int = 1
    """> 1: each row is its own torchrun job with this many processes on this node."""
    eval: EvalConfig = field(default_factory=EvalConfig)
    """How each finished row is evaluated (`grip eval`'s settings)."""

    def __post_init__(self) -> None:
        if not self.seeds:
            raise ValueError(f"seeds: expected at least one seed, got {self.seeds!r}")
        check_int("nproc", self.nproc, 1)
        for o in self.overrides:
            if "=" not in o or not o.split("=", 1)[0]:
                raise ValueError(f"overrides: expected KEY=VALUE (e.g. trainer.max_steps=50), got {o!r}")


def row_files(rows: str | Path) -> list[Path]:
    rows = Path(rows)
    files = sorted(rows.glob("*.yaml")) if rows.is_dir() else [rows]
    if not files or not all(f.is_file() for f in files):
        raise ValueError(f"rows: no row YAMLs found at {rows}")
    return files


def _set(cfg: dict, dotted: str, value) -> None:
    """Set `a.b.0.c` = value; integer parts index lists (e.g. trainer.callbacks.1.init_args.x)."""
    keys = dotted.split(".")
    d = cfg
    for k in keys[:-1]:
        if isinstance(d, list) and k.isdigit() and int(k) < len(d):
            d = d[int(k)]
        elif isinstance(d, dict):
            d = d.setdefault(k, {})
        else:
            raise ValueError(f"overrides: {dotted!r}: cannot descend into {k!r} of the row config")
    last = keys[-1]
    if isinstance(d, list) and last.isdigit() and int(last) < len(d):
        d[int(last)] = value
    elif isinstance(d, dict):
        d[last] = value
    else:
        raise ValueError(f"overrides: {dotted!r}: cannot set {last!r} in the row config")


def row_config(base: dict, run_dir: Path, seed: int, overrides: list[str], name: str) -> dict:
    """The row config with every output path moved into `run_dir` and the seed applied."""
    import copy

    cfg = copy.deepcopy(base)
    tr = cfg.setdefault("trainer", {})
    tr["default_root_dir"] = str(run_dir)
    loggers = tr.get("logger") or []
    for lg in loggers if isinstance(loggers, list) else [loggers]:
        if isinstance(lg, dict):
            args = lg.setdefault("init_args", {})
            args["save_dir"] = str(run_dir)
            if "Wandb" in lg.get("class_path", ""):
                args["name"] = name
    for cb in tr.get("callbacks") or []:
        if isinstance(cb, dict) and cb.get("class_path", "").endswith("ModelCheckpoint"):
            cb.setdefault("init_args", {})["dirpath"] = str(run_dir / "checkpoints")
    cfg["seed_everything"] = int(seed)
    model = cfg.setdefault("model", {})
    model["seed"] = int(seed)
    ds = cfg.get("data", {}).get("dataset")
    if isinstance(ds, dict):
        ds.setdefault("init_args", {})["seed"] = int(seed)
    for o in overrides:
        key, raw = o.split("=", 1)
        _set(cfg, key, parse_value(raw))
    return cfg


def mode_of(cfg: dict) -> str:
    for cb in cfg.get("trainer", {}).get("callbacks") or []:
        if isinstance(cb, dict) and cb.get("class_path", "").endswith("GripCallback"):
            return cb.get("init_args", {}).get("mode", "grip")
    raise ValueError("row config: no grip_loop.callback.GripCallback among trainer.callbacks")


def tokens_per_step(cfg: dict) -> int:
    data = cfg.get("data", {})
    seq = data.get("dataset", {}).get("init_args", {}).get("seq_len", 0)
    tr = cfg.get("trainer", {})
    devices = tr.get("devices", 1)
    devices = devices if isinstance(devices, int) and devices > 0 else 1
    return int(data.get("batch_size", 8)) * int(seq) * devices * int(tr.get("accumulate_grad_batches", 1))


def static_shares(rc: dict) -> np.ndarray:
    """Budget shares of row 2 (static budget, Eq. 5 with r = 1) for this row's corpus and budget
    settings: what rows 3-6 are compared with."""
    from grip_loop.manifest import load_manifest
    from grip_loop.modes import BudgetConfig, base_budget, budgets, get_mode

    root = rc["data"]["dataset"]["init_args"]["root"]
    m = load_manifest(ROOT / root if not Path(root).is_absolute() else root, check_files=False)
    budget = {}
    for cb in rc.get("trainer", {}).get("callbacks") or []:
        if isinstance(cb, dict) and cb.get("class_path", "").endswith("GripCallback"):
            budget = dict(cb.get("init_args", {}).get("budget") or {})
    cfg = BudgetConfig(**budget)
    sizes = np.array(m.sizes)
    q = np.array([c.quality for c in m.clusters])
    base = base_budget(get_mode("static-budget"), sizes, np.array([c.sigma for c in m.clusters]), q, cfg)
    n = budgets(base, np.ones(len(sizes)), int(cfg.b_total or sizes.sum()))
    return n / n.sum()


def drift_summary(history: Path, static: np.ndarray | None = None) -> dict:
    """From `grip_history.jsonl`: budget refreshes after the initial publish, RAP probes, mean/max
    drift; with `static` (row 2's shares) how far the budgets sit from it (total variation
    distance, 0.5 ||share - static||_1: the fraction of B moved) at the end and on average over
    the published budgets; and the probes' split-half reliability (mean, min, every value)."""
    if not history.is_file():
        return {"refreshes": 0, "probes": 0, "drift_mean": float("nan"), "drift_max": float("nan")}
    hist = [json.loads(line) for line in history.read_text().splitlines() if line.strip()]
    drift = np.array([h["drift"] for h in hist[1:]], dtype=np.float64)
    out = {
        "refreshes": len(hist) - 1,
        "probes": sum("delta" in h for h in hist),
        "drift_mean": float(drift.mean()) if len(drift) else 0.0,
        "drift_max": float(drift.max()) if len(drift) else 0.0,
    }
    if static is not None and len(static) == len(hist[0]["n"]):
        tv = [0.5 * float(np.abs(np.asarray(h["n"]) / sum(h["n"]) - static).sum()) for h in hist]
        out["moved_final"] = tv[-1]
        out["moved_mean"] = float(np.mean(tv))
    rel = [h["reliability"] for h in hist if h.get("reliability") is not None]
    if any("delta" in h for h in hist):
        out["reliability_mean"] = float(np.mean(rel)) if rel else float("nan")
        out["reliability_min"] = float(np.min(rel)) if rel else float("nan")
        out["reliabilities"] = " ".join(f"{x:.2f}" for x in rel)
    return out


def _train(config: Path, nproc: int, log: Path) -> None:
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")])}
    env.setdefault("WANDB_MODE", "offline")
    env.setdefault("HF_HUB_OFFLINE", "1")
    launcher = [sys.executable]
    if nproc > 1:
        launcher += ["-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(nproc)]
    cmd = [*launcher, "-m", "train.main", "fit", "--config", str(config)]
    with open(log, "w") as fh:
        r = subprocess.run(cmd, cwd=ROOT, env=env, stdout=fh, stderr=subprocess.STDOUT)
    if r.returncode != 0:
        tail = log.read_text()[-3000:]
        raise RuntimeError(f"training failed ({' '.join(cmd)}), see {log}:\n{tail}")


def _normalised(rc: dict) -> dict:
    return yaml.safe_load(yaml.safe_dump(rc, sort_keys=False))


def run_folder(out: Path, row: str, seed: int, base: dict, overrides: list[str]) -> tuple[Path, dict]:
    """(run folder, its config) of (row, seed): `OUT/<row>/seed-S`.

    A finished run (train_done.json) is reused only when its config.yaml is the config this call
    would write: a finished run made with another seed, other `--set` overrides or another row
    file is a ValueError naming the folder and what differs, never silently reported as this one.
    A folder of the older single-seed layout, `OUT/<row>`, is reused when its config matches
    (same seed and settings) and ignored otherwise."""
    folder, legacy = out / row / f"seed-{seed}", out / row
    for cand, name in ((folder, f"{row}-seed-{seed}"), (legacy, row)):
        rc = row_config(base, cand, seed, overrides, name)
        if not (cand / "train_done.json").is_file():
            continue
        try:
            saved = yaml.safe_load((cand / "config.yaml").read_text())
        except (OSError, yaml.YAMLError):
            saved = None
        if saved == _normalised(rc):
            return cand, rc
        if cand == folder:
            diff = sorted(
                k for k in set(rc) | set(saved or {}) if (saved or {}).get(k) != _normalised(rc).get(k)
            )
            raise ValueError(
                f"{cand}: a finished run made with other settings (config.yaml differs in {diff or 'its content'}); "
                "use another --out, or delete that folder to retrain it"
            )
    return folder, row_config(base, folder, seed, overrides, f"{row}-seed-{seed}")


def run(cfg: AblateConfig) -> list[dict]:
    """Train + evaluate every (row, seed); write results.{csv,md,png}; return the result rows."""
    out = Path(cfg.out)
    out.mkdir(parents=True, exist_ok=True)
    files = [f for f in row_files(cfg.rows) if not cfg.only or f.stem in cfg.only]
    if cfg.only and len(files) != len(cfg.only):
        raise ValueError(f"only: unknown row(s) {sorted(set(cfg.only) - {f.stem for f in files})}")
    results = []
    for i, f in enumerate(files):
        base = yaml.safe_load(f.read_text())
        for seed in cfg.seeds:
            run_dir, rc = run_folder(out, f.stem, seed, base, cfg.overrides)
            name = str(run_dir.relative_to(out))
            config = run_dir / "config.yaml"
            done = run_dir / "train_done.json"
            if not done.is_file():  # a finished run's config.yaml is its record: never rewritten
                run_dir.mkdir(parents=True, exist_ok=True)
                config.write_text(yaml.safe_dump(rc, sort_keys=False))
            print(f"== [{i + 1}/{len(files)}] {name} (mode {mode_of(rc)}, seed {seed})", flush=True)
            if not done.is_file():
                t0 = time.perf_counter()
                _train(config, cfg.nproc, run_dir / "train.log")
                done.write_text(json.dumps({"wall_s": round(time.perf_counter() - t0, 2)}))
            wall = json.loads(done.read_text())["wall_s"]
            ev_dir = run_dir / "eval"
            if (ev_dir / "eval.json").is_file():
                ev = json.loads((ev_dir / "eval.json").read_text())
            else:
                ckpt = run_dir / "checkpoints" / "last.ckpt"
                if not ckpt.is_file():
                    raise FileNotFoundError(f"{ckpt}: no last checkpoint; the row config must save_last")
                data = rc["data"]["dataset"]["init_args"]["root"]
                ev = evaluate(ckpt, data, ev_dir, cfg.eval)
            steps = int(rc["trainer"]["max_steps"])
            results.append(
                {
                    "row": f.stem,
                    "mode": mode_of(rc),
                    "seed": seed,
                    "steps": steps,
                    "tokens": steps * tokens_per_step(rc),
                    "wall_s": wall,
                    **{f"heldout_{k}": v["loss"] for k, v in sorted(ev["heldout"].items())},
                    "heldout_overall": ev["heldout_overall"]["loss"],
                    **({"humaneval": ev["humaneval"]["loss"]} if "humaneval" in ev else {}),
                    **({"pass@1": ev["pass_at_1"]["pass@1"]} if "pass_at_1" in ev else {}),
                    **{f"cluster:{k}": v["loss"] for k, v in ev.get("heldout_cluster", {}).items()},
                    **drift_summary(run_dir / "csv" / "grip_history.jsonl", static_shares(rc)),
                }
            )
            write_results(results, out)
    return results


LOSS_PREFIXES = ("heldout_", "humaneval", "cluster:")
MAX_CLUSTER_COLUMNS = 8  # per-cluster held-out losses go to results.md up to this many clusters


def loss_columns(results: list[dict], clusters: bool = False) -> list[str]:
    cols: list[str] = []
    for r in results:
        cols += [k for k in r if k.startswith(LOSS_PREFIXES) and k not in cols]
    lang = sorted(c for c in cols if c.startswith("heldout_") and c != "heldout_overall")
    per_cluster = [c for c in cols if c.startswith("cluster:")]
    extra = per_cluster if clusters and len(per_cluster) <= MAX_CLUSTER_COLUMNS else []
    return lang + extra + [c for c in ("heldout_overall", "humaneval") if c in cols]


def aggregate(results: list[dict]) -> list[dict]:
    """Per row: mean and half-range (max - min) / 2 of every numeric column over seeds."""
    out = []
    for row in dict.fromkeys(r["row"] for r in results):
        rs = [r for r in results if r["row"] == row]
        agg = {"row": row, "mode": rs[0]["mode"], "n_seeds": len(rs)}
        for k, v in rs[0].items():
            if k in ("row", "mode", "seed") or not isinstance(v, int | float):
                continue
            xs = np.array([r.get(k, math.nan) for r in rs], dtype=np.float64)
            agg[k] = float(xs.mean())
            agg[k + "_pm"] = float((xs.max() - xs.min()) / 2)
        out.append(agg)
    return out


def write_results(results: list[dict], out: Path) -> None:
    cols = list(dict.fromkeys(k for r in results for k in r))
    with open(out / "results.csv", "w", newline="") as fh:
        w = csv.DictWriter(fh, fieldnames=cols)
        w.writeheader()
        for r in results:
            w.writerow(r)
    (out / "results.md").write_text(results_markdown(results))
    plot_results(results, out / "results.png")


def _fmt(v) -> str:
    if isinstance(v, float):
        return f"{v:.4f}" if abs(v) < 100 else f"{v:.1f}"
    return str(v)


def results_markdown(results: list[dict]) -> str:
    losses = loss_columns(results, clusters=True)
    extra = [c for c in ("pass@1",) if any(c in r for r in results)]
    cols = ["row", "mode", "seed", "steps", "tokens", "wall_s", *losses, *extra]
    cols += ["refreshes", "drift_mean", "drift_max"]
    cols += [c for c in ("moved_mean", "moved_final", "reliabilities") if any(c in r for r in results)]
    lines = [
        "Held-out next-token loss in nats (lower is better), per language, per cluster (`cluster:NAME`, "
        "up to 8 clusters) and overall; drift = ||n(t) - n(t-1)||_1 / B per refresh; moved = the fraction "
        "of B away from row 2's static budget (0.5 ||share - share_static||_1, mean over the published "
        "budgets and at the end); reliabilities = each probe's split-half reliability.",
        "",
        "| " + " | ".join(cols) + " |",
        "|" + "|".join("---" if c in ("row", "mode") else "---:" for c in cols) + "|",
    ]
    lines += ["| " + " | ".join(_fmt(r.get(c, "")) for c in cols) + " |" for r in results]
    agg = aggregate(results)
    if any(a["n_seeds"] > 1 for a in agg):
        lines += ["", "Mean ± half-range over seeds:", ""]
        acols = ["row", "mode", "n_seeds", *losses, "drift_mean"]
        acols += [c for c in ("moved_mean", "reliability_mean") if any(c in a for a in agg)]
        lines += ["| " + " | ".join(acols) + " |", "|" + "|".join("---:" for _ in acols) + "|"]
        for a in agg:
            cells = [a["row"], a["mode"], str(a["n_seeds"])]
            cells += [f"{a[c]:.4f} ± {a[c + '_pm']:.4f}" if c in a else "" for c in acols[3:]]
            lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def plot_results(results: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    agg = aggregate(results)
    cols = loss_columns(results)
    fig, ax = plt.subplots(figsize=(max(6, 1.6 * len(agg) + 2), 4.5))
    width = 0.8 / max(1, len(cols))
    x = np.arange(len(agg))
    for j, c in enumerate(cols):
        ys = [a.get(c, np.nan) for a in agg]
        err = [a.get(c + "_pm", 0.0) for a in agg]
        ax.bar(x + (j - (len(cols) - 1) / 2) * width, ys, width, yerr=err, capsize=2, label=c)
    vals = [a.get(c, np.nan) for a in agg for c in cols]
    lo, hi = np.nanmin(vals), np.nanmax(vals)
    ax.set_ylim(max(0.0, lo - 0.15 * (hi - lo + 1e-3) - 0.05), hi + 0.1 * (hi - lo + 1e-3) + 0.05)
    ax.set_xticks(x, [a["row"] for a in agg], rotation=20, ha="right")
    ax.set_ylabel("held-out loss (nats)")
    ax.set_title("Sampler ablation (Table 1, Panel B rows), small scale")
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
