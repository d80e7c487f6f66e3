"""GEM (balanced vMF mixture, `grip_loop.cluster.gem_cluster`) vs spherical k-means at equal K.

Two data sets:

* `synthetic`: anisotropic embeddings in a narrow cone with planted groups of unequal size.
  x = normalise(cone * e_0 + m_g + A eps): e_0 the shared direction, m_g the group offset
  (N(0, I / (d - 1)) * `sep` in dims 1..d-1, so |m_g| ~ sep), eps ~ N(0, I) and A a diagonal with
  a power-law profile k^-alpha scaled to total variance 1 (a few directions carry most of the
  within-group variance: the anisotropy); group sizes proportional to `ratio`^g. With the
  defaults (cone 8, sep 1.5) pairs of points have cosine >= 0.80, 0.96 on average (the JSON records the
  minimum and mean over 500 points): a narrow cone.
* `real` (`--real DIR`, optional): a prepared corpus's `work/embeddings.npy` (e.g. a copy of the
  quick start's). There is no planted truth: `ari` is against the documents' language, a
  weak reference (clusters may rightly split a language), and is reported only as a hint.

Per (data set, method, seed): normalised entropy of the cluster sizes (1 = all equal),
fraction of clusters under 1% of N, mean within-cluster cosine (each point to its cluster's
centroid: the normalised mean of its members), adjusted Rand index against the planted groups,
and the fit time (wall, this process, the machine shared).

    python benchmarks/clustering.py                                    # synthetic, seeds 0 1 2
    python benchmarks/clustering.py --real /tmp/i17-qs                 # + a corpus's embeddings
    python benchmarks/clustering.py --quick                            # smoke (seconds)
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import numpy as np
from common import emit, parser


def synthetic(n: int, d: int, groups: int, *, ratio: float, cone: float, sep: float, alpha: float, seed: int):
    """(unit rows (n, d) float32, planted group of each row)."""
    rng = np.random.default_rng([seed, 17])
    p = ratio ** np.arange(groups)
    sizes = np.maximum(1, np.round(n * p / p.sum()).astype(int))
    truth = np.repeat(np.arange(groups), sizes)
    means = np.zeros((groups, d))
    means[:, 1:] = rng.normal(size=(groups, d - 1)) * sep / np.sqrt(d - 1)  # |m_g| ~ sep
    scale = np.zeros(d)
    scale[1:] = np.arange(1, d) ** -alpha
    scale[1:] /= np.sqrt((scale[1:] ** 2).sum())  # total within-group variance 1
    x = means[truth] + rng.normal(size=(len(truth), d)) * scale
    x[:, 0] += cone
    x /= np.linalg.norm(x, axis=1, keepdims=True)
    perm = rng.permutation(len(truth))
    return x[perm].astype(np.float32), truth[perm]


def ari(a: np.ndarray, b: np.ndarray) -> float:
    """Adjusted Rand index (Hubert & Arabie) from the contingency table."""
    _, ai = np.unique(a, return_inverse=True)
    _, bi = np.unique(b, return_inverse=True)
    table = np.zeros((ai.max() + 1, bi.max() + 1))
    np.add.at(table, (ai, bi), 1)

    def c2(v):
        return (v * (v - 1) / 2).sum()

    index, rows, cols, total = c2(table), c2(table.sum(1)), c2(table.sum(0)), c2(np.array([len(a)]))
    expected = rows * cols / total
    top = 0.5 * (rows + cols) - expected
    return float((index - expected) / top) if top > 0 else 1.0


def metrics(x: np.ndarray, labels: np.ndarray, k: int, truth) -> dict:
    from grip_loop.cluster import normalised_entropy

    sizes = np.bincount(labels, minlength=k)
    cos = np.empty(len(x))
    for c in range(k):
        m = labels == c
        if m.any():
            s = x[m].sum(0)
            cos[m] = x[m] @ (s / max(np.linalg.norm(s), 1e-12))
    return {
        "size_entropy": normalised_entropy(sizes),
        "frac_under_1pct": float(np.mean(sizes < 0.01 * len(x))),
        "empty": int((sizes == 0).sum()),
        "within_cos": float(cos.mean()),
        "ari": ari(truth, labels) if truth is not None else None,
        "largest_share": float(sizes.max() / len(x)),
    }


def run_methods(name: str, x, truth, k: int, seeds, balances, sample: int) -> list[dict]:
    from grip_loop.cluster import fit_gem, spherical_kmeans

    rows = []
    for seed in seeds:
        t0, c0 = time.perf_counter(), time.process_time()
        _, labels = spherical_kmeans(x, k, seed=seed, niter=25, sample_size=sample)
        rows.append(
            {
                "data": name,
                "method": "kmeans",
                "K": k,
                "seed": seed,
                "fit_s": time.perf_counter() - t0,
                "cpu_s": time.process_time() - c0,
            }
            | metrics(x, labels, k, truth)
        )
        for lam in balances:
            t0, c0 = time.perf_counter(), time.process_time()
            r = fit_gem(x, k, seed=seed, balance=lam, sample_size=sample)
            rows.append(
                {
                    "data": name,
                    "method": f"gem(balance={lam:g})",
                    "K": k,
                    "seed": seed,
                    "fit_s": time.perf_counter() - t0,
                    "cpu_s": time.process_time() - c0,
                }
                | metrics(x, r.labels, k, truth)
                | {"mm_iter": r.teacher.n_iter, "agreement": r.agreement, "kappa": r.teacher.kappa}
            )
    return rows


# the per-(data, method, K) means; the table shows all but cpu_s (the JSON has it)
SUMMARY_KEYS = (
    "size_entropy",
    "frac_under_1pct",
    "within_cos",
    "ari",
    "largest_share",
    "fit_s",
    "cpu_s",
    "agreement",
)


def summarise(rows: list[dict]) -> list[dict]:
    """Mean over seeds per (data, method, K)."""
    groups: dict[tuple, list[dict]] = {}
    for r in rows:
        groups.setdefault((r["data"], r["method"], r["K"]), []).append(r)
    out = []
    for (data, method, k), rs in groups.items():
        row = {"data": data, "method": method, "K": k, "seeds": len(rs)}
        for key in SUMMARY_KEYS:
            vals = [r[key] for r in rs if r.get(key) is not None]
            row[key] = float(np.mean(vals)) if vals else None
        out.append(row)
    return out


def main() -> None:
    p = parser(__doc__.split("\n\n")[0])
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    p.add_argument("--n", type=int, default=6000)
    p.add_argument("--d", type=int, default=64)
    p.add_argument("--groups", type=int, default=8)
    p.add_argument("--ratio", type=float, default=0.6, help="group g has size proportional to ratio^g")
    p.add_argument("--cone", type=float, default=8.0)
    p.add_argument("--sep", type=float, default=1.5)
    p.add_argument("--alpha", type=float, default=1.0, help="power-law exponent of the noise profile")
    p.add_argument("--ks", type=int, nargs="+", default=None, help="K values (default: groups, 2 x groups)")
    p.add_argument("--balances", type=float, nargs="+", default=[0.0, 1.0])
    p.add_argument("--sample", type=int, default=50_000)
    p.add_argument(
        "--real", type=Path, default=None, help="dir with embeddings.npy (+ meta.jsonl or docs.jsonl)"
    )
    p.add_argument("--real-k", type=int, default=16)
    args = p.parse_args()
    if args.quick:
        args.n, args.d, args.groups, args.seeds, args.real = 600, 16, 4, [0], None
    ks = args.ks or [args.groups, 2 * args.groups]
    x, truth = synthetic(
        args.n, args.d, args.groups, ratio=args.ratio, cone=args.cone, sep=args.sep, alpha=args.alpha, seed=0
    )
    from grip_loop.cluster import normalised_entropy

    pair_cos = x[:500] @ x[:500].T
    rows = []
    for k in ks:
        rows += run_methods("synthetic", x, truth, k, args.seeds, args.balances, args.sample)
    real_info = None
    if args.real is not None:
        emb = np.load(args.real / "embeddings.npy").astype(np.float32)
        meta = args.real / "meta.jsonl" if (args.real / "meta.jsonl").exists() else args.real / "docs.jsonl"
        langs = (
            [json.loads(line)["lang"] for line in meta.read_text().splitlines()] if meta.exists() else None
        )
        real_info = {"dir": str(args.real), "n": len(emb), "d": emb.shape[1]}
        rows += run_methods(
            "real",
            emb,
            np.array(langs) if langs else None,
            args.real_k,
            args.seeds,
            args.balances,
            args.sample,
        )
    emit(
        "clustering",
        summarise(rows),
        args,
        columns=["data", "method", "K", "seeds", *(key for key in SUMMARY_KEYS if key != "cpu_s")],
        synthetic={
            "n": len(x),
            "d": args.d,
            "groups": args.groups,
            "group_sizes": np.bincount(truth).tolist(),
            "ratio": args.ratio,
            "cone": args.cone,
            "sep": args.sep,
            "alpha": args.alpha,
            "planted_size_entropy": normalised_entropy(np.bincount(truth)),
            "min_pair_cos": float(pair_cos.min()),
            "mean_pair_cos": float(pair_cos.mean()),
        },
        real=real_info,
        per_seed=rows,
    )


if __name__ == "__main__":
    main()
