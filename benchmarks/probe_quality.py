"""Probe quality: does the Rapid Adaptation Probe rank clusters by learnability, reproducibly,
and does Eq. 7 then move budget the way it should?

On the controlled testbed (`grip testbed`: clusters of known, ordered learnability, prepared
with one cluster per group) the tiny MoE is trained with a uniform sampler and probed at the
given steps under several probe settings. For each (seed, step, setting):

* `spearman_truth`: Spearman of the cluster ranking by Delta L against the true order;
* `split_half`: the probe's own reliability (Spearman of Delta L between the two halves of the
  evaluation documents), what the callback logs and shrinks Eq. 7 by;
* `retest`: Spearman between this probe and a second one with the roles of the adaptation and
  evaluation documents swapped and a new theta_init (a re-draw of everything the probe draws);
* `cv`: spread of Delta L across clusters (std / |mean|); `ceiling_use`: the largest drop as a
  fraction of the logit ceiling lr x steps x |h|_1.

For the default setting it also prints, per cluster, Q_k, whether the Eq. 7 gate is open,
Delta L, r_k and the budget share before (Eq. 5, neutral replay) and after this probe: the
direction the loop moves each cluster. With `--data DIR` (any prepared corpus, e.g. the quick
start's) there is no truth: only the reliability columns.

    python benchmarks/probe_quality.py                                    # testbed, seeds 0 1 2
    python benchmarks/probe_quality.py --data runs/quickstart/data --steps 100 --settings default
    python benchmarks/probe_quality.py --quick                            # smoke (a minute)
"""

from __future__ import annotations

import dataclasses
import json
import subprocess
import sys
import time
import warnings
from pathlib import Path

import numpy as np
from common import DATA, ROOT, emit, markdown, parser

SETTINGS = {
    # the defaults (docs/rap.md): split, null baseline, 10 epochs of micro-batches of 8, lr auto
    "default": {},
    "init-baseline": {"baseline": "init"},
    "unigram-baseline": {"baseline": "unigram"},
    "depth1": {"reset_depth": 1},
    "literal": "literal",  # the paper's text: same batch, 10 full-batch steps, lr 3e-4, from L_init
}


def rap_config(name: str, eos: int):
    from grip_loop.rap import RAPConfig

    spec = SETTINGS[name]
    cfg = RAPConfig.literal() if spec == "literal" else RAPConfig(**spec)
    return dataclasses.replace(cfg, pad_id=eos)


def ensure_testbed(folder: Path, docs_per_group: int, doc_chars: int) -> Path:
    """The testbed corpus and its prepared folder (built once, then reused)."""
    from grip_loop.testbed import build_testbed

    if not (folder / "truth.json").is_file():
        build_testbed(folder, docs_per_group=docs_per_group, doc_chars=doc_chars)
    data = folder / "data"
    if not (data / "manifest.json").is_file():
        subprocess.run(
            [
                sys.executable,
                "-m",
                "train",
                "prepare",
                "--corpus",
                str(folder / "corpus.jsonl"),
                "--out",
                str(data),
                "--config",
                str(ROOT / "configs" / "prepare" / "testbed.yaml"),
                "--no-progress",
            ],
            check=True,
            cwd=ROOT,
        )
    return data


def swapped(ps: dict) -> dict:
    """The same probe documents with the adaptation and evaluation roles exchanged."""
    import torch

    from grip_loop.rap import ProbeBatch

    return {
        k: ProbeBatch(
            adapt=b.eval,
            eval=b.adapt,
            eval_half=torch.arange(len(b.adapt)) % 2,
            adapt_docs=b.eval_docs,
            eval_docs=b.adapt_docs,
        )
        for k, b in ps.items()
    }


def budget_moves(m, res, shrink: float) -> list[dict]:
    """Per cluster: the grip mode's budget share before (Eq. 5, neutral replay) and after this probe."""
    from grip_loop.budget import DEFAULT_QUALITY_THRESHOLD
    from grip_loop.modes import BudgetConfig, base_budget, budgets, get_mode, replay_for

    mode, cfg = get_mode("grip"), BudgetConfig()
    sizes = np.array(m.sizes)
    q = np.array([c.quality for c in m.clusters])
    base = base_budget(mode, sizes, np.array([c.sigma for c in m.clusters]), q, cfg)
    b = int(sizes.sum())
    before = budgets(base, replay_for(mode, q, cfg), b)
    r = replay_for(mode, q, cfg, delta=res.delta, shrink=shrink)
    after = budgets(base, r, b)
    return [
        {
            "cluster": c.label,
            "quality": float(c.quality),
            "gate_open": bool(c.quality > DEFAULT_QUALITY_THRESHOLD),
            "delta": float(res.delta[c.id]),
            "r": float(r[c.id]),
            "share_before": float(before[c.id] / b),
            "share_after": float(after[c.id] / b),
        }
        for c in m.clusters
    ]


def probe_point(model, m, root, truth, settings, seq_len, docs, seed):
    from grip_loop.probeset import probe_set
    from grip_loop.rap import rapid_adaptation_probe, spearman

    eos = int(m.tokenizer["eos_id"])
    rows, moves = [], None
    truth_vec = None if truth is None else np.array([-truth["rank"][n] for n in m.names], float)
    for name in settings:
        cfg = rap_config(name, eos)
        ps = probe_set(m, root, seq_len=seq_len, max_docs=docs, eval_split=cfg.eval_split, seed=cfg.seed)
        t0 = time.perf_counter()
        res = rapid_adaptation_probe(model, ps, cfg, refresh_index=0, num_clusters=m.k)
        seconds = time.perf_counter() - t0
        other = swapped(ps) if cfg.eval_split == "split" else ps
        again = rapid_adaptation_probe(model, other, cfg, refresh_index=1, num_clusters=m.k)
        d = res.delta
        row = {
            "setting": name,
            "split_half": res.reliability,
            "retest": spearman(d, again.delta),
            "cv": float(np.nanstd(d) / max(abs(np.nanmean(d)), 1e-12)),
            "ceiling_use": float(np.nanmax((res.loss_init - res.loss_final) / res.ceiling)),
            "probe_s": seconds,
        }
        if truth_vec is not None:
            row["spearman_truth"] = spearman(d, truth_vec)
            row["spearman_truth_retest"] = spearman(again.delta, truth_vec)
        row["delta"] = {n: float(x) for n, x in zip(m.names, d, strict=True)}
        rows.append(row)
        if name == "default":
            moves = budget_moves(m, res, res.shrink(cfg.reliability_threshold))
    return rows, moves


def run_seed(root: Path, truth, seed: int, steps: list[int], args) -> tuple[list[dict], list[dict]]:
    import lightning as L

    from grip_loop.dataset import GripIterableDataset
    from grip_loop.manifest import load_manifest
    from train.data import GripDataModule
    from train.module import MoELM

    m = load_manifest(root)
    rows, moves = [], []

    class ProbeAt(L.Callback):
        def on_train_batch_end(self, trainer, pl_module, *a):
            step = trainer.global_step
            if step in steps:
                pts, mv = probe_point(
                    pl_module.model, m, root, truth, args.settings, args.seq_len, args.docs, seed
                )
                for r in pts:
                    rows.append({"seed": seed, "step": step, **r})
                    print(json.dumps(rows[-1], default=float), file=sys.stderr, flush=True)
                if mv is not None:
                    moves.extend({"seed": seed, "step": step, **x} for x in mv)

    L.seed_everything(seed)
    ds = GripIterableDataset(root, seq_len=256, seed=seed, order="random")
    model = MoELM(
        model="tiny",
        vocab_size=int(m.tokenizer["vocab_size"]),
        lr=2e-3,
        min_lr_ratio=0.1,
        warmup_steps=20,
        weight_decay=0.1,
        seed=seed,
    )
    trainer = L.Trainer(
        accelerator="cpu",
        max_steps=max(steps),
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        gradient_clip_val=1.0,
        callbacks=[ProbeAt()],
    )
    trainer.fit(model, datamodule=GripDataModule(ds, batch_size=args.batch_size, num_workers=0))
    return rows, moves


def main() -> int:
    p = parser(__doc__.split("\n\n")[0])
    p.add_argument("--testbed", type=Path, default=None, help="testbed folder (default: .bench-data/testbed)")
    p.add_argument("--data", type=Path, default=None, help="probe this prepared corpus instead (no truth)")
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    p.add_argument("--steps", type=int, nargs="+", default=[100, 200, 300], help="probe after these steps")
    p.add_argument("--settings", nargs="+", default=list(SETTINGS), choices=list(SETTINGS))
    p.add_argument("--seq-len", type=int, default=128, help="probe window length")
    p.add_argument("--docs", type=int, default=32, help="probe documents per role and cluster")
    p.add_argument("--batch-size", type=int, default=8, help="training blocks of 256 tokens per step")
    args = p.parse_args()
    warnings.filterwarnings("ignore")
    if args.quick:
        args.seeds, args.steps, args.settings = [0], [40], ["default", "init-baseline"]
        args.docs, args.batch_size = 8, 4
    truth = None
    if args.data is None:
        folder = args.testbed or DATA / ("testbed-quick" if args.quick else "testbed")
        root = ensure_testbed(folder, 24 if args.quick else 160, 500 if args.quick else 1500)
        truth = json.loads((folder / "truth.json").read_text())
    else:
        root = args.data
    rows, moves = [], []
    for seed in args.seeds:
        r, mv = run_seed(root, truth, seed, sorted(set(args.steps)), args)
        rows += r
        moves += mv
    table = [{k: v for k, v in r.items() if k != "delta"} for r in rows]
    cols = [
        "seed",
        "step",
        "setting",
        "spearman_truth",
        "spearman_truth_retest",
        "split_half",
        "retest",
        "cv",
    ]
    cols += ["ceiling_use", "probe_s"]
    emit(
        "probe_quality",
        table,
        args,
        columns=[c for c in cols if any(c in r for r in table)],
        corpus=str(root),
        truth=truth,
        moves=moves,
        deltas=[{k: r[k] for k in ("seed", "step", "setting", "delta")} for r in rows],
    )
    if moves:
        print()
        print("Budget moves of the default probe (grip mode; share of B before -> after):")
        print(
            markdown(
                moves,
                [
                    "seed",
                    "step",
                    "cluster",
                    "quality",
                    "gate_open",
                    "delta",
                    "r",
                    "share_before",
                    "share_after",
                ],
            )
        )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
