"""GRASP validation by subset retraining: does the predicted utility of an allocation rank the
real change of the target loss? (issue 18, docs/benchmarks.md section "Attribution")

From one checkpoint and a prepared corpus:

1. sketch every cluster and the target once per seed (`grip_loop.attribution.sketch`, the
   projection seeded by the seed), fit the surrogate (gamma from the line search at the
   uniform allocation: nothing here is fitted to the retrainings);
2. draw M allocations per seed (token shares ~ Dirichlet(1) over the K clusters);
3. for each, retrain a copy of the checkpoint (all parameters; AdamW with the checkpoint's moments and
   parameter groups, i.e. continuing the run, at the lr its schedule ended with; `steps`
   steps of `batch` windows of `seq_len` tokens: equal tokens for every allocation; the
   windows of cluster k apportioned to w_k exactly, in a seeded order) on windows of each
   cluster's *training* documents, and measure the real utility = L_t(before) - L_t(after)
   on the target windows (the same windows the target sketch was built from);
4. report per seed Spearman(predicted, real) of GRASP (a.w - gamma w^T C w) and the additive
   baseline (a.w), and two diagnostics: "fit" = the best a.w - g w^T C w with g fitted by
   least squares on the *other* half of the retrainings (two-fold; what a hand-tuned gamma
   could reach) and "top-LCB real rank" = where the allocation with the best GRASP LCB lands
   among the M real utilities (1 = the best).

    python benchmarks/attribution.py --ckpt CKPT --data DIR --target heldout [--allocations 24 --seeds 3]
"""

from __future__ import annotations

import copy
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import numpy as np  # noqa: E402
import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402
from common import ROOT, emit, parser  # noqa: E402

# made by `./launch/ablation.sh testbed` (which prepares runs/testbed/data first)
TESTBED_CKPT = str(ROOT / "runs/ablation-testbed/6-grip/seed-0/checkpoints/last.ckpt")
TESTBED_DATA = str(ROOT / "runs/testbed/data")


def training_windows(m, data: Path, k: int, seq_len: int, eos: int, limit: int, seed: int) -> torch.Tensor:
    """Up to `limit` windows from cluster k's training shards (the "random" order)."""
    from grip_loop.probeset import _pieces, pack_windows
    from grip_loop.shards import iter_shard

    c = m.clusters[k]
    order = "random" if "random" in c.shards else next(iter(c.shards))
    rng = np.random.default_rng([seed, 5, k])
    pieces = []
    for s in c.shards[order]:
        for d in iter_shard(data / s.path, m.tokenizer["token_dtype"], with_text=False):
            pieces += _pieces(d.tokens.astype(np.int64), seq_len, eos, 4, rng)
    w = pack_windows(pieces, seq_len, eos)
    idx = np.random.default_rng([seed, 6, k]).permutation(len(w))[:limit]
    return w[torch.as_tensor(idx)]


def mean_loss(model, windows: torch.Tensor, pad: int, mb: int = 32) -> float:
    tot, n = 0.0, 0
    with torch.no_grad():
        for i in range(0, windows.shape[0], mb):
            ids = windows[i : i + mb]
            tgt = ids[:, 1:].clone()
            tgt[tgt == pad] = -100
            logits = model(input_ids=ids).logits[:, :-1].float()
            tot += float(
                F.cross_entropy(
                    logits.reshape(-1, logits.shape[-1]), tgt.reshape(-1), ignore_index=-100, reduction="sum"
                )
            )
            n += int((tgt != -100).sum())
    return tot / n


def checkpoint_optimizer(ckpt: str):
    """(AdamW state dict, weight decay, betas) of a Lightning checkpoint of train.module.MoELM,
    or None (a Hugging Face folder: retraining then starts a fresh AdamW)."""
    path = Path(ckpt)
    if not path.is_file():
        return None
    state = torch.load(path, map_location="cpu", weights_only=False)
    opts = state.get("optimizer_states") or []
    hp = state.get("hyper_parameters", {})
    if not opts:
        return None
    return opts[0], float(hp.get("weight_decay", 0.0)), tuple(hp.get("betas", (0.9, 0.95)))


def make_optimizer(model, opt_state, lr: float):
    """AdamW with train.module.MoELM's parameter groups, its moments restored from the
    checkpoint (continuing the run), at a fixed lr; a fresh AdamW without a checkpoint state."""
    if opt_state is None:
        return torch.optim.AdamW(model.parameters(), lr=lr, betas=(0.9, 0.95), weight_decay=0.0)
    sd, wd, betas = opt_state
    decay, no_decay = [], []
    for name, p in model.named_parameters():
        (no_decay if p.ndim < 2 or "embed_tokens" in name else decay).append(p)
    opt = torch.optim.AdamW(
        [{"params": decay, "weight_decay": wd}, {"params": no_decay, "weight_decay": 0.0}], lr=lr, betas=betas
    )
    opt.load_state_dict(copy.deepcopy(sd))
    for g in opt.param_groups:
        g["lr"] = lr
    return opt


def retrain(base, state, pools, w, steps, batch, lr, pad, seed, opt_state=None) -> torch.nn.Module:
    """A copy of `base` (weights `state`) trained `steps` AdamW steps on the mixture w."""
    from grip_loop.budget import apportion

    model = copy.deepcopy(base)
    model.load_state_dict(state)
    model.train()
    total = steps * batch
    counts = apportion(w, total)
    rng = np.random.default_rng([seed, 9])
    rows = []
    for k, n in enumerate(counts):
        if n:
            pool = pools[k]
            rows.append(pool[torch.as_tensor(rng.integers(0, len(pool), int(n)))])
    data = torch.cat(rows)[torch.as_tensor(rng.permutation(total))]
    opt = make_optimizer(model, opt_state, lr)
    for s in range(steps):
        ids = data[s * batch : (s + 1) * batch]
        tgt = ids[:, 1:].clone()
        tgt[tgt == pad] = -100
        logits = model(input_ids=ids).logits[:, :-1].float()
        loss = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), tgt.reshape(-1), ignore_index=-100)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
    model.eval()
    return model


def fit_two_fold(a_w: np.ndarray, q_w: np.ndarray, real: np.ndarray) -> float:
    """Spearman on each half of real ~ x a.w - y w^T C w + c fitted on the other half (least
    squares), averaged: what a gamma tuned on retrainings could reach."""
    from grip_loop.rap import spearman

    idx = np.arange(len(real))
    out = []
    for fold in (idx % 2 == 0, idx % 2 == 1):
        x = np.stack([a_w[~fold], -q_w[~fold], np.ones((~fold).sum())], 1)
        coef, *_ = np.linalg.lstsq(x, real[~fold], rcond=None)
        pred = coef[0] * a_w[fold] - coef[1] * q_w[fold]
        out.append(spearman(pred, real[fold]))
    return float(np.mean(out))


def main() -> None:
    p = parser(__doc__.split("\n\n")[0])
    p.add_argument("--ckpt", default=TESTBED_CKPT)
    p.add_argument("--data", default=TESTBED_DATA)
    p.add_argument("--target", default="heldout", help="heldout, humaneval or a prepared folder")
    p.add_argument("--allocations", type=int, default=24, help="M retrainings per seed")
    p.add_argument("--seeds", type=int, default=3)
    p.add_argument("--steps", type=int, default=16, help="AdamW steps per retraining")
    p.add_argument("--batch", type=int, default=8, help="windows per step")
    p.add_argument("--seq-len", type=int, default=128)
    p.add_argument(
        "--lr",
        type=float,
        default=None,
        help="default: the checkpoint's last lr (where its schedule ended); 1e-3 without one",
    )
    p.add_argument("--threads", type=int, default=1, help="torch threads (1: the machine is shared)")
    p.add_argument("--dim", type=int, default=256)
    p.add_argument("--layers", type=int, default=1)
    p.add_argument("--splits", type=int, default=4)
    p.add_argument("--docs", type=int, default=64, help="probe documents per cluster sketched")
    p.add_argument("--target-docs", type=int, default=128)
    a = p.parse_args()
    if a.quick:
        a.allocations, a.seeds, a.steps, a.batch, a.docs, a.target_docs, a.dim = 6, 1, 2, 4, 16, 16, 32

    from grip_loop import attribution as A
    from grip_loop.manifest import load_manifest
    from grip_loop.probeset import check_model_fits, probe_set
    from grip_loop.rap import spearman
    from train.cmd_attribute import target_documents, target_groups
    from train.cmd_export import load_causal_lm

    t0 = time.perf_counter()
    data = Path(a.data)
    m = load_manifest(data)
    eos = int(m.tokenizer["eos_id"])
    model = load_causal_lm(a.ckpt)
    check_model_fits(model, m, data, a.ckpt)
    state = copy.deepcopy(model.state_dict())
    opt_state = checkpoint_optimizer(a.ckpt)
    if a.lr is None:
        a.lr = float(opt_state[0]["param_groups"][0]["lr"]) if opt_state else 1e-3
    torch.set_num_threads(a.threads)
    what, docs = target_documents(a.target, data, m, a.target_docs, 0)
    groups = target_groups(docs, a.splits, a.seq_len, eos, 1, int(model.config.vocab_size), 0, what)
    target = torch.cat(groups)
    ps = probe_set(m, data, seq_len=a.seq_len, max_docs=a.docs, eval_split="none", seed=0)
    cluster_windows = {c: b.adapt for c, b in ps.items()}
    k = m.k
    pools = [training_windows(m, data, c, a.seq_len, eos, 512, 0) for c in range(k)]
    l0 = mean_loss(model, target, eos)
    print(f"target {what}: {len(docs)} docs, {target.shape[0]} windows, L_t = {l0:.4f}", file=sys.stderr)

    rows, seeds_out = [], []
    for seed in range(a.seeds):
        cfg = A.SketchConfig(dim=a.dim, layers=a.layers, splits=a.splits, seed=seed, pad_id=eos)
        sk = A.sketch(model, cluster_windows, groups, cfg, num_clusters=k)
        rng = np.random.default_rng([seed, 1])
        allocs = {f"s{seed}-{i}": rng.dirichlet(np.ones(k)) for i in range(a.allocations)}
        sur, cands = A.evaluate(sk, allocs)
        real = []
        for i, c in enumerate(cands):
            t1 = time.perf_counter()
            trained = retrain(
                model, state, pools, c.w, a.steps, a.batch, a.lr, eos, seed * 1000 + i, opt_state
            )
            real.append(l0 - mean_loss(trained, target, eos))
            del trained
            print(
                f"seed {seed} allocation {i + 1}/{len(cands)}: real {real[-1]:+.4f} GRASP {c.utility:+.4g} "
                f"additive {c.additive:+.4g} ({time.perf_counter() - t1:.1f} s)",
                file=sys.stderr,
            )
        real = np.array(real)
        u = np.array([c.utility for c in cands])
        add = np.array([c.additive for c in cands])
        q = np.array([c.w @ sur.c @ c.w for c in cands])
        best = int(np.argmax([c.lcb for c in cands]))
        real_rank = int((real > real[best]).sum()) + 1
        for c, r in zip(cands, real, strict=True):
            rows.append(
                {
                    "seed": seed,
                    "allocation": c.name,
                    "real": float(r),
                    "grasp": c.utility,
                    "lcb": c.lcb,
                    "additive": c.additive,
                }
            )
        seeds_out.append(
            {
                "seed": seed,
                "spearman_grasp": spearman(u, real),
                "spearman_additive": spearman(add, real),
                "spearman_fit_two_fold": fit_two_fold(add, q, real),
                "spearman_penalty_only": spearman(-q, real),
                "gamma": sur.gamma,
                "top_lcb_real_rank": real_rank,
                "real_mean": float(real.mean()),
                "real_std": float(real.std()),
                "sketch_s": sk.seconds,
            }
        )
    summary = {}
    for key in ("spearman_grasp", "spearman_additive", "spearman_fit_two_fold", "spearman_penalty_only"):
        v = np.array([s[key] for s in seeds_out])
        summary[key] = {"mean": float(np.nanmean(v)), "std": float(np.nanstd(v)), "per_seed": v.tolist()}
    emit(
        "attribution",
        seeds_out,
        a,
        columns=[
            "seed",
            "spearman_grasp",
            "spearman_additive",
            "spearman_fit_two_fold",
            "spearman_penalty_only",
            "gamma",
            "top_lcb_real_rank",
            "real_mean",
            "real_std",
        ],
        summary=summary,
        allocations=rows,
        settings={
            "ckpt": a.ckpt,
            "data": a.data,
            "target": what,
            "target_windows": int(target.shape[0]),
            "L_t": l0,
            "M": a.allocations,
            "steps": a.steps,
            "batch": a.batch,
            "seq_len": a.seq_len,
            "lr": a.lr,
            "optimizer": "AdamW, moments from the checkpoint" if opt_state else "fresh AdamW",
            "dim": a.dim,
            "layers": a.layers,
            "splits": a.splits,
            "seconds": time.perf_counter() - t0,
        },
    )
    for key, s in summary.items():
        print(f"{key}: {s['mean']:+.3f} +- {s['std']:.3f} over {a.seeds} seeds", file=sys.stderr)


if __name__ == "__main__":
    main()
