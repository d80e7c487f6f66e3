"""`grip attribute`: does an allocation of the cluster budgets help a target? (GRASP, issue 18)

    grip attribute --ckpt CKPT --data DIR --target heldout|humaneval|PATH [--json OUT]

CKPT is a Lightning checkpoint of `train.module.MoELM` or a Hugging Face causal-LM folder; DIR
a corpus prepared by `grip prepare`. TARGET is what the budgets should serve:

* `heldout`: DIR's held-out documents (never trained on);
* `humaneval`: the HumanEval prompts with their canonical solutions, tokenized with DIR's tokenizer;
* PATH: another prepared folder with the same tokenizer: its held-out documents, or its probe
  documents when it has none.

Sketches every cluster's training signal (its probe documents) and the target's
(`grip_loop.attribution`), then prints per-cluster alignment with the target, the most
redundant and complementary cluster pairs, and the predicted utility with its lower
confidence bound of candidate allocations: GRIP's current budgets (the checkpoint's callback
state, or Eq. 5/8 from the manifest with neutral replay when the checkpoint has none), the
static budgets (Eq. 5), proportional to cluster size (random sampling), uniform over
clusters, and seeded perturbations of the current budgets. The recommendation keeps the
current budgets unless another candidate's paired gain has a positive lower confidence bound.
Utilities are in sketch units (a gradient inner product per unit step): compare them within
one run only. `--json` writes the same, atomically.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

from train.helpfmt import RawDefaultsFormatter


def main(argv: list[str]) -> int:
    p = argparse.ArgumentParser(
        prog="grip attribute", description=__doc__, formatter_class=RawDefaultsFormatter
    )
    p.add_argument("--ckpt", required=True, help="Lightning checkpoint file or Hugging Face model folder")
    p.add_argument("--data", required=True, help="prepared corpus (the folder with manifest.json)")
    p.add_argument("--target", required=True, help="heldout, humaneval, or a prepared folder")
    p.add_argument("--json", default=None, metavar="OUT", help="also write the report as JSON here")
    p.add_argument("--dim", type=int, default=256, help="sketch dimension (default 256)")
    p.add_argument(
        "--layers", type=int, default=1, help="upper decoder blocks sketched with the head (default 1)"
    )
    p.add_argument("--splits", type=int, default=4, help="independent sketches per cluster (default 4)")
    p.add_argument("--seq-len", type=int, default=128, help="tokens per window (default 128)")
    p.add_argument("--docs", type=int, default=64, help="probe documents per cluster (default 64)")
    p.add_argument("--target-docs", type=int, default=256, help="at most this many target documents")
    p.add_argument("--target-windows", type=int, default=2, help="windows per long target document")
    p.add_argument("--perturbations", type=int, default=8, help="seeded perturbations of the current budgets")
    p.add_argument("--z", type=float, default=1.645, help="LCB = U - z * se (default 1.645, one-sided 95%%)")
    p.add_argument("--mode", default="grip", help="sampler mode of the manifest fallback (default grip)")
    p.add_argument("--seed", type=int, default=0, help="projection, windows and perturbations seed")
    p.add_argument("--device", default="auto", help="auto (cuda if available), cpu or cuda[:i]")
    # a user-fixable error (ValueError, FileNotFoundError) becomes one line and exit 2 in train.cli.main
    return run(p.parse_args(argv))


# ----------------------------------------------------------------------------- target documents


def target_documents(target: str, data: Path, manifest, limit: int, seed: int) -> tuple[str, list]:
    """(description, token arrays) of the target set; raises ValueError naming what is missing."""
    import numpy as np

    if target == "heldout":
        from train.eval import heldout_documents

        docs = [d for ds in heldout_documents(data).values() for d in ds]
        what = f"heldout ({data})"
    elif target == "humaneval":
        from train.eval import load_tokenizer
        from train.humaneval import load_problems

        tok, _ = load_tokenizer(data)
        docs = [
            np.asarray(tok.encode(q["prompt"] + q["canonical_solution"]).ids, np.int64)
            for q in load_problems()
        ]
        what = "humaneval"
    else:
        docs = folder_documents(Path(target), manifest)
        what = str(target)
    docs = [d for d in docs if len(d) >= 1]
    if not docs:
        raise ValueError(f"--target {target}: the target set has no documents")
    if len(docs) > limit:
        keep = np.sort(np.random.default_rng([seed, 7]).choice(len(docs), limit, replace=False))
        docs = [docs[i] for i in keep]
    return what, docs


def folder_documents(folder: Path, manifest) -> list:
    """A prepared folder's held-out documents (its probe documents when it has none), after
    checking it uses the same tokenizer as the corpus being attributed."""
    import numpy as np

    from grip_loop.manifest import MANIFEST_NAME, check_shard_sha256, load_manifest
    from grip_loop.shards import iter_shard

    if not (folder / MANIFEST_NAME).is_file():
        raise ValueError(
            f"--target {folder}: expected heldout, humaneval or a prepared folder with {MANIFEST_NAME}"
        )
    m = load_manifest(folder)
    if m.tokenizer.get("sha256") != manifest.tokenizer.get("sha256"):
        raise ValueError(
            f"--target {folder}: prepared with another tokenizer than --data (tokenizer.sha256 differs in "
            f"{folder / MANIFEST_NAME}); prepare the target with the same tokenizer"
        )
    shards = list(m.heldout) or [s for c in m.clusters for s in c.probe_shards]
    docs = []
    for s in shards:
        check_shard_sha256(folder, s)
        for d in iter_shard(folder / s.path, m.tokenizer["token_dtype"], with_text=False):
            docs.append(d.tokens.astype(np.int64))
    return docs


def target_groups(
    docs: list, splits: int, seq_len: int, eos: int, per_doc: int, vocab: int, seed: int, what: str
):
    """Documents dealt round robin into `splits` groups, each packed into windows."""
    import numpy as np

    from grip_loop.probeset import _pieces, pack_windows

    groups = []
    for s in range(splits):
        rng = np.random.default_rng([seed, 11, s])
        pieces = [p for d in docs[s::splits] for p in _pieces(d, seq_len, eos, per_doc, rng)]
        if pieces and max(int(p.max()) for p in pieces) >= vocab:
            raise ValueError(f"target {what}: token ids >= the model's vocabulary ({vocab})")
        groups.append(pack_windows(pieces, seq_len, eos) if pieces else None)
    if any(g is None for g in groups):
        raise ValueError(
            f"target {what}: {len(docs)} documents, fewer than the {splits} independent groups needed (--splits)"
        )
    return groups


# ----------------------------------------------------------------------------- candidates


def current_budgets(ckpt: str, manifest, mode_name: str):
    """(source, n_k): the last budgets in a Lightning checkpoint's GripCallback state, else Eq. 5/8
    of `mode_name` from the manifest with neutral replay."""
    import numpy as np
    import torch

    from grip_loop.modes import BudgetConfig, base_budget, budgets, get_mode, replay_for

    path = Path(ckpt)
    if path.is_file():
        state = torch.load(path, map_location="cpu", weights_only=False)
        for key, cb in (state.get("callbacks") or {}).items():
            hist = cb.get("history") if isinstance(cb, dict) else None
            if key.startswith("GripCallback") and hist and len(hist[-1].get("n", [])) == manifest.k:
                return f"{path.name}: GripCallback budgets at step {hist[-1].get('step')}", np.asarray(
                    hist[-1]["n"], np.float64
                )
    sizes, cfg = np.array(manifest.sizes), BudgetConfig()
    q = np.array([c.quality for c in manifest.clusters])
    sigma = np.array([c.sigma for c in manifest.clusters])
    mode = get_mode(mode_name)
    base = base_budget(mode, sizes, sigma, q, cfg)
    n = budgets(base, replay_for(mode, q, cfg), int(sizes.sum()))
    return f"manifest: mode {mode_name}, neutral replay (the checkpoint holds no GRIP budgets)", n.astype(
        float
    )


def candidate_budgets(current, manifest, perturbations: int, seed: int) -> dict:
    """{name: documents per cluster} of the candidate allocations."""
    import numpy as np

    from grip_loop.modes import BudgetConfig, base_budget, budgets, get_mode

    sizes, cfg = np.array(manifest.sizes, np.float64), BudgetConfig()
    q = np.array([c.quality for c in manifest.clusters])
    sigma = np.array([c.sigma for c in manifest.clusters])
    static = budgets(
        base_budget(get_mode("static-budget"), sizes, sigma, q, cfg), np.ones(len(q)), int(sizes.sum())
    )
    out = {
        "current": np.asarray(current, np.float64),
        "static": static.astype(float),
        "proportional": sizes,
        "uniform": np.ones_like(sizes),
    }
    rng = np.random.default_rng([seed, 3])
    for i in range(perturbations):
        out[f"perturbed-{i}"] = out["current"] * np.exp(0.5 * rng.standard_normal(len(sizes)))
    return out


def token_shares(n_docs, manifest):
    """Documents per cluster -> token shares (training signal is per token)."""
    import numpy as np

    per_doc = np.array([c.n_tokens / max(c.n_docs, 1) for c in manifest.clusters])
    t = np.asarray(n_docs, np.float64) * per_doc
    return t / t.sum() if t.sum() > 0 else t


# ----------------------------------------------------------------------------- run


def write_json_atomic(path: Path, doc: dict) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "w") as fh:
        fh.write(json.dumps(doc, indent=1) + "\n")
        fh.flush()
        os.fsync(fh.fileno())
    os.replace(tmp, path)


def run(a) -> int:
    import time

    import torch

    from grip_loop import attribution as A
    from grip_loop.manifest import load_manifest
    from grip_loop.probeset import check_model_fits, probe_set
    from train.cmd_export import load_causal_lm

    t0 = time.perf_counter()
    cfg_kw = dict(dim=a.dim, layers=a.layers, splits=a.splits, seed=a.seed)
    data = Path(a.data)
    m = load_manifest(data)
    eos = int(m.tokenizer["eos_id"])
    cfg = A.SketchConfig(**cfg_kw, pad_id=eos)
    for name in ("seq_len", "docs", "target_docs", "target_windows"):
        if getattr(a, name) < (2 if name == "seq_len" else 1):
            raise ValueError(f"--{name.replace('_', '-')}: must be >= {2 if name == 'seq_len' else 1}")
    if a.perturbations < 0:
        raise ValueError("--perturbations: must be >= 0")
    what, docs = target_documents(a.target, data, m, a.target_docs, a.seed)
    model = load_causal_lm(a.ckpt)
    check_model_fits(model, m, data, a.ckpt)
    vocab = int(model.config.vocab_size)
    tgroups = target_groups(docs, a.splits, a.seq_len, eos, a.target_windows, vocab, a.seed, what)
    device = ("cuda" if torch.cuda.is_available() else "cpu") if a.device == "auto" else a.device
    model = model.to(device)
    ps = probe_set(m, data, seq_len=a.seq_len, max_docs=a.docs, eval_split="none", seed=a.seed)
    cluster_windows = {c: b.adapt for c, b in ps.items()}
    if not cluster_windows:
        raise ValueError(f"{data / 'manifest.json'}: no cluster has probe documents; re-run `grip prepare`")
    n_groups = a.splits * (len(cluster_windows) + 1)
    print(
        f"sketching {len(cluster_windows)} of {m.k} clusters and the target {what} ({len(docs)} documents) "
        f"with {a.ckpt} on {device}: {n_groups} gradients",
        file=sys.stderr,
    )
    last = [time.perf_counter()]

    def progress(done, total):
        if time.perf_counter() - last[0] > 10 or done == total:
            last[0] = time.perf_counter()
            print(f"  gradients {done}/{total}", file=sys.stderr)

    sk = A.sketch(model, cluster_windows, tgroups, cfg, num_clusters=m.k, progress=progress)
    source, current = current_budgets(a.ckpt, m, a.mode)
    docs_by = candidate_budgets(current, m, a.perturbations, a.seed)
    shares = {k: token_shares(v, m) for k, v in docs_by.items()}
    surrogate, cands = A.evaluate(sk, shares, reference="current", z=a.z)
    decision = A.select(cands, "current")
    report = A.allocation_report(sk, surrogate, m.names)
    cur_w = dict(zip(range(m.k), next(c.w for c in cands if c.name == "current"), strict=True))
    for row in report["clusters"]:
        row["current_share"] = float(cur_w[row["cluster"]])

    print(_cluster_table(report["clusters"]))
    for title, key in (
        ("most redundant pairs", "redundant_pairs"),
        ("most complementary pairs", "complementary_pairs"),
    ):
        print(f"\n{title} (cosine of the sketches):")
        for pr in report[key]:
            print(f"  {pr['cosine']:+.3f}  {pr['a']}  &  {pr['b']}")
    print(f"\ncurrent budgets: {source}")
    print(f"gamma (redundancy scale, line search at the uniform allocation): {surrogate.gamma:.4g}")
    print(_candidate_table(cands))
    print(
        f"\nbest LCB: {decision['best_lcb']}; recommendation: {decision['recommend']} ({decision['reason']})"
    )
    seconds = time.perf_counter() - t0
    print(
        f"attribute: {seconds:.1f} s (sketches {sk.seconds:.1f} s, {sk.params:,} parameters sketched)",
        file=sys.stderr,
    )
    if a.json:
        doc = {
            "ckpt": str(a.ckpt),
            "data": str(data),
            "target": what,
            "target_docs": len(docs),
            "sketch": {**cfg_kw, "params": sk.params, "seq_len": a.seq_len, "docs": a.docs},
            "gamma": surrogate.gamma,
            "z": a.z,
            "current_source": source,
            **report,
            "candidates": [
                {
                    "name": c.name,
                    "documents": [float(x) for x in docs_by[c.name]],
                    "token_shares": [float(x) for x in c.w],
                    "utility": c.utility,
                    "se": c.se,
                    "lcb": c.lcb,
                    "additive": c.additive,
                    "additive_se": c.additive_se,
                    "gain_over_current": c.gain,
                    "gain_lcb": c.gain_lcb,
                }
                for c in cands
            ],
            **decision,
            "seconds": seconds,
        }
        write_json_atomic(Path(a.json), doc)
        print(f"wrote {a.json}", file=sys.stderr)
    return 0


def _cluster_table(rows: list[dict]) -> str:
    width = max(len(r["name"]) for r in rows)
    out = [f"{'cluster':<{width}}  {'tokens':>7}  {'share':>6}  {'align':>10}  {'se':>9}  {'cos(t)':>7}"]
    for r in rows:
        if not r["sketched"]:
            out.append(
                f"{r['name']:<{width}}  {r['tokens']:>7}  {r['current_share']:>6.3f}  (no probe documents)"
            )
            continue
        out.append(
            f"{r['name']:<{width}}  {r['tokens']:>7}  {r['current_share']:>6.3f}  {r['alignment']:>10.4g}  "
            f"{r['alignment_se']:>9.3g}  {r['cosine_to_target']:>+7.3f}"
        )
    return "\n".join(out)


def _candidate_table(cands) -> str:
    out = [
        f"\n{'candidate':<14}  {'U (GRASP)':>10}  {'se':>9}  {'LCB':>10}  {'additive':>10}  {'gain':>10}  {'gain LCB':>10}"
    ]
    for c in cands:
        out.append(
            f"{c.name:<14}  {c.utility:>10.4g}  {c.se:>9.3g}  {c.lcb:>10.4g}  {c.additive:>10.4g}  "
            f"{c.gain:>10.4g}  {c.gain_lcb:>10.4g}"
        )
    return "\n".join(out)
