"""Prepare-stage scaling: docs/s and peak memory per document of each `grip prepare` stage vs N and K.

Every (stage, N, K) runs in a fresh subprocess, so its peak RSS (ru_maxrss) is its own; memory
per document = (peak RSS - RSS after imports) / N.

* tokenize: BPE training (vocab 8192) + encoding of real text (CPython stdlib sources, cut to
  4 KiB a document and cycled to reach N).
* embed: the bundled all-MiniLM-L6-v2 (2 windows x 128 tokens a document, as configs/prepare/tiny.yaml).
* kmeans: `spherical_kmeans` (faiss, 200k-sample fit + assignment of all N) on synthetic 384-d
  unit embeddings (a mixture of 2K Gaussian blobs).
* density+order: per cluster Eq. 9 kNN density (exact faiss flat, k = 10), Eq. 10 weights and the
  Efraimidis–Spirakis order; cost ~ N^2 / K, so pairs with N^2/K > `--max-pairs` are not run.
* write: ShardWriter of N documents of 300 tokens (uint16) into 10k-doc shards.

Tokenize and embed at 10^5-10^6 real documents do not fit this machine's time budget: they are
measured at small N and the linear fit (seconds = a + b N) is reported *as an extrapolation*.
"""

from __future__ import annotations

import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import numpy as np  # noqa: E402
from common import emit, parser, peak_rss_mb, rss_mb  # noqa: E402


def _texts(n: int) -> list[str]:
    import sysconfig

    files = sorted(Path(sysconfig.get_paths()["stdlib"]).glob("*.py"))
    base = [f.read_text(errors="ignore")[:4096] for f in files if f.stat().st_size > 512]
    return [base[i % len(base)] + f"\n# {i}\n" for i in range(n)]


def _embeddings(n: int, k: int, d: int = 384, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    centers = rng.standard_normal((2 * k, d)).astype(np.float32)
    out = np.empty((n, d), dtype=np.float32)
    step = 100_000
    for s in range(0, n, step):
        m = min(step, n - s)
        out[s : s + m] = centers[rng.integers(0, 2 * k, m)] + 0.5 * rng.standard_normal(
            (m, d), dtype=np.float32
        )
    out /= np.linalg.norm(out, axis=1, keepdims=True)
    return out


def run_one(stage: str, n: int, k: int) -> dict:
    """Runs in the subprocess: prepares inputs (untimed), times the stage, reports memory."""
    import faiss  # noqa: F401 - import cost outside the timing and the baseline

    import grip_loop  # noqa: F401

    if stage == "tokenize":
        texts = _texts(n)
    elif stage == "embed":
        from grip_loop.embed import Encoder, EncoderConfig

        texts = _texts(n)
        enc = Encoder(EncoderConfig(max_tokens=128, max_chunks=2, batch_size=64, device="cpu"))
    elif stage in ("kmeans", "density+order"):
        emb = _embeddings(n, k)
        if stage == "density+order":
            from grip_loop.cluster import spherical_kmeans

            _, labels = spherical_kmeans(emb, k, seed=0)
    base = rss_mb()
    t0 = time.perf_counter()
    if stage == "tokenize":
        from grip_loop.tokenizer import encode, train_tokenizer

        tok = train_tokenizer(texts, vocab_size=8192)
        encode(tok, texts)
    elif stage == "embed":
        enc.embed(texts)
    elif stage == "kmeans":
        from grip_loop.cluster import spherical_kmeans

        spherical_kmeans(emb, k, seed=0)
    elif stage == "density+order":
        from grip_loop.selection import kernel_density, selection_order, selection_weights

        lengths = np.random.default_rng(1).integers(50, 3000, n)
        for c in range(k):
            idx = np.flatnonzero(labels == c)
            if len(idx) == 0:
                continue
            rho = kernel_density(emb[idx], k=10)
            selection_order(selection_weights(rho, lengths[idx], beta=0.3), seed=c)
    elif stage == "write":
        from grip_loop.shards import ShardWriter

        rng = np.random.default_rng(0)
        toks = rng.integers(1, 32000, size=300, dtype=np.uint16)
        with tempfile.TemporaryDirectory() as tmp, ShardWriter(tmp, max_docs=10_000) as w:
            for i in range(n):
                w.write(f"{i:09d}", toks, "", {"i": i})
    secs = time.perf_counter() - t0
    peak = peak_rss_mb()
    return {
        "seconds": secs,
        "peak_rss_mb": peak,
        "base_rss_mb": base,
        "bytes_per_doc": (peak - base) * 2**20 / n,
    }


PLAN_FULL = {
    "tokenize": ([1_000, 3_000, 10_000], [16]),
    "embed": ([32, 128], [16]),
    "kmeans": ([10_000, 100_000, 1_000_000], [16, 256]),
    "density+order": ([10_000, 100_000, 1_000_000], [16, 256]),
    "write": ([10_000, 100_000], [16]),
}
PLAN_QUICK = {
    "tokenize": ([200], [4]),
    "kmeans": ([2_000], [4]),
    "density+order": ([2_000], [4]),
    "write": ([1_000], [4]),
}


def main(argv=None) -> int:
    p = parser(__doc__.split("\n")[0])
    p.add_argument("--one", nargs=3, metavar=("STAGE", "N", "K"), help=argparse_help())
    p.add_argument("--stages", nargs="+", default=list(PLAN_FULL), help="stages to run")
    p.add_argument("--max-pairs", type=float, default=5e9, help="skip density when N^2/K exceeds this")
    p.add_argument("--extrapolate-to", type=int, nargs="+", default=[100_000, 1_000_000], help="N for fits")
    args = p.parse_args(argv)
    if args.one:
        stage, n, k = args.one[0], int(args.one[1]), int(args.one[2])
        print(json.dumps(run_one(stage, n, k)))
        return 0
    plan = PLAN_QUICK if args.quick else PLAN_FULL
    rows = []
    for stage in args.stages:
        if stage not in plan:
            continue
        ns, ks = plan[stage]
        for k in ks:
            for n in ns:
                if stage == "density+order" and n * n / k > args.max_pairs:
                    rows.append(
                        {"stage": stage, "N": n, "K": k, "note": f"not run: N^2/K > {args.max_pairs:.0e}"}
                    )
                    continue
                out = subprocess.run(
                    [sys.executable, __file__, "--one", stage, str(n), str(k)],
                    capture_output=True,
                    text=True,
                    env={"HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "true", **_env()},
                )
                if out.returncode != 0:
                    raise RuntimeError(f"{stage} N={n} K={k} failed:\n{out.stderr[-3000:]}")
                r = json.loads(out.stdout.strip().splitlines()[-1])
                rows.append(
                    {
                        "stage": stage,
                        "N": n,
                        "K": k,
                        "seconds": r["seconds"],
                        "docs_per_s": n / r["seconds"],
                        "peak_rss_mb": r["peak_rss_mb"],
                        "bytes_per_doc": r["bytes_per_doc"],
                        "note": "measured",
                    }
                )
                print(f"  {stage} N={n} K={k}: {r['seconds']:.2f}s", file=sys.stderr, flush=True)
    # linear fits (seconds = a + b N) for stages measured at small N only
    fits = {}
    for stage in ("tokenize", "embed", "write"):
        pts = [(r["N"], r["seconds"]) for r in rows if r["stage"] == stage and "seconds" in r]
        if len(pts) >= 2:
            b, a = np.polyfit([x for x, _ in pts], [y for _, y in pts], 1)
            fits[stage] = {"a_s": float(a), "b_s_per_doc": float(b)}
            for n in args.extrapolate_to:
                if all(n > x for x, _ in pts):
                    rows.append(
                        {
                            "stage": stage,
                            "N": n,
                            "K": 16,
                            "seconds": float(a + b * n),
                            "docs_per_s": n / float(a + b * n),
                            "note": "EXTRAPOLATED (linear fit)",
                        }
                    )
    emit(
        "prepare_scaling",
        rows,
        args,
        columns=["stage", "N", "K", "seconds", "docs_per_s", "peak_rss_mb", "bytes_per_doc", "note"],
        fits=fits,
    )
    return 0


def argparse_help() -> str:
    return "internal: run one (stage, N, K) measurement and print its JSON"


def _env() -> dict:
    import os

    return dict(os.environ)


if __name__ == "__main__":
    raise SystemExit(main())
