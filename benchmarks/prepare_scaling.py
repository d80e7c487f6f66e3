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

`--end-to-end N [N ...]` (with `--nproc 1 [2]`) instead runs the whole `grip prepare` command
(`python -m train prepare`, or `torchrun --nproc_per_node P -m train prepare`) on N small
synthetic JSONL documents (5-40 words of one of 8 topics) with the hashed encoder
(`E2E_CONFIG`: dim 64, K = N / 1000 so clusters stay ~1000 documents, one order), and reports
the wall time, each stage's seconds from `manifest.stats.timings`, and the peak RSS of the
largest process (ru_maxrss over every descendant, torchrun's workers included), and the largest RssAnon
(private anonymous memory, without the memmaps' file-backed pages) of any process, polled from /proc,
overall and per stage (`<stage>_anon_mb`: the samples taken while the stage ran, delimited by rank 0's
"grip prepare: <stage> done" lines), and likewise the largest VmRSS sampled (`peak_vmrss_mb`,
`<stage>_rss_mb`: anonymous and file-backed pages, the memory maps' included).

`--write-ab N --before-root DIR [--nproc P ...]` times the write stage alone, side by side in
one run: this checkout against another checkout of grip-loop (e.g. `git worktree add
/tmp/before main`), each on its own `grip prepare` folder of the same N documents
(`E2E_CONFIG`, prepared once, untimed). Every repeat removes the shards and the write stage's
records and re-runs `grip prepare` (every other stage is taken from OUT/work), alternating the
two checkouts; the write stage's seconds come from `manifest.stats.timings`, the median of
`--repeats` is reported. The shards of both checkouts are compared byte for byte.
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


E2E_CONFIG = {
    "encoder": {"kind": "hashed", "dim": 64, "hash_buckets": 16384, "block_size": 4096},
    "vocab_size": 4096,
    "tokenizer_train_docs": 20_000,
    "kmeans_niter": 10,
    "kmeans_sample": 50_000,
    "probe_min_per_cluster": 4,
    "orders": ["grip"],
    "progress": True,  # rank 0's "<stage> done" lines mark the stages for the per-stage memory
}


def synthetic_jsonl(path: Path, n: int, seed: int = 0) -> Path:
    """n small documents: 5-40 words drawn from one of 8 overlapping topic vocabularies."""
    rng = np.random.default_rng(seed)
    words = np.array([f"tok{i}" for i in range(2000)])
    langs = ["python", "c", "go", "rust"]
    with open(path, "w") as fh:
        for lo in range(0, n, 10_000):
            m = min(10_000, n - lo)
            topics = rng.integers(0, 8, m)
            lens = rng.integers(5, 41, m)
            lines = []
            for j in range(m):
                t = int(topics[j])
                body = " ".join(words[rng.integers(t * 200, t * 200 + 400, lens[j])])
                lines.append(json.dumps({"id": f"d{lo + j}", "text": body, "lang": langs[t % 4]}))
            fh.write("\n".join(lines) + "\n")
    return path


def _e2e_inputs(scratch: Path, n: int, docs_per_cluster: int = 1000) -> tuple[Path, Path]:
    """The synthetic corpus of n documents (made once per scratch folder) and its E2E_CONFIG file
    with K = n / docs_per_cluster."""
    import yaml

    corpus = scratch / f"corpus-{n}.jsonl"
    if not corpus.exists():  # written aside, then renamed: a cut-short corpus is never reused
        synthetic_jsonl(corpus.with_suffix(".partial"), n).rename(corpus)
    cfg = scratch / f"e2e-{n}.yaml"
    cfg.write_text(yaml.safe_dump({**E2E_CONFIG, "k": max(2, n // docs_per_cluster)}))
    return corpus, cfg


def _prepare_command(root: Path, nproc: int, corpus: Path, out: Path, cfg: Path, *extra: str):
    """(argv, env) of `grip prepare` from the checkout `root`, under torchrun when nproc > 1."""
    launch = [sys.executable, "-m", "train"]
    if nproc > 1:
        launch = [
            sys.executable,
            "-m",
            "torch.distributed.run",
            "--standalone",
            "--nproc_per_node",
            str(nproc),
        ]
        launch += ["-m", "train"]
    cmd = launch + ["prepare", "--corpus", str(corpus), "--out", str(out), "--config", str(cfg), *extra]
    return cmd, {**_env(), "PYTHONPATH": str(root), "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}


def end_to_end(n: int, nproc: int, scratch: Path, docs_per_cluster: int = 1000) -> dict:
    """One `grip prepare` run in a child process (tree); see the module docstring."""
    import os
    import resource

    corpus, cfg = _e2e_inputs(scratch, n, docs_per_cluster)
    out = scratch / f"out-{n}-{nproc}"
    root = Path(__file__).resolve().parents[1]
    cmd, env = _prepare_command(root, nproc, corpus, out, cfg, "--restart")
    t0 = time.perf_counter()
    proc = subprocess.Popen(
        cmd, cwd=root, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True
    )
    anon = _AnonPeak(proc.pid)
    ends, lines = [], []  # (time, stage) of rank 0's "grip prepare: <stage> done" lines
    for line in proc.stdout:  # text mode: tqdm's "\r" ends a line too
        lines.append(line)
        if line.startswith("grip prepare: ") and " done: " in line:
            ends.append((time.monotonic(), line.split()[2]))
            print(  # a long run's progress, on the benchmark's stderr
                f"  N={n} nproc={nproc}: {ends[-1][1]} done at {time.perf_counter() - t0:.0f} s, "
                f"largest RssAnon so far {anon.peak_kib / 1024:.0f} MB, "
                f"VmRSS {anon.peak_rss_kib / 1024:.0f} MB",
                file=sys.stderr,
                flush=True,
            )
    proc.wait()
    log = "".join(lines[-200:])
    wall = time.perf_counter() - t0
    anon.stop()
    if proc.returncode != 0:
        raise RuntimeError(f"grip prepare N={n} nproc={nproc} failed:\n{log[-3000:]}")
    peak = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024  # KiB -> MiB, the largest so far
    m = json.loads((out / "manifest.json").read_text())
    row = {"N": n, "nproc": nproc, "K": m["k"], "wall_s": wall, "docs_per_s": n / wall, "peak_rss_mb": peak}
    row["peak_anon_mb"] = anon.peak_kib / 1024
    row["peak_vmrss_mb"] = anon.peak_rss_kib / 1024
    row.update({f"{st}_anon_mb": kib / 1024 for st, kib in anon.per_stage(ends).items()})
    row.update({f"{st}_rss_mb": kib / 1024 for st, kib in anon.per_stage(ends, rss=True).items()})
    row.update({f"{k}_s": v["seconds"] for k, v in m["stats"]["timings"].items()})
    row["work_bytes_per_doc"] = sum(f.stat().st_size for f in (out / "work").rglob("*") if f.is_file()) / n
    row["shard_bytes_per_doc"] = sum(f.stat().st_size for f in (out / "shards").rglob("*") if f.is_file()) / n
    os.sync()
    return row


class _AnonPeak:
    """The largest RssAnon (private, anonymous memory: heap, arrays) of any process in a tree,
    polled from /proc every 0.2 s. Unlike ru_maxrss it leaves out file-backed pages (the memmaps'
    page cache, which the kernel reclaims under pressure). Linux only; 0 elsewhere."""

    def __init__(self, root_pid: int):
        import threading

        self.root, self.peak_kib, self._done = root_pid, 0, threading.Event()
        self.peak_rss_kib = 0  # the largest VmRSS (anonymous + file-backed + shared) sampled
        self.samples: list[tuple[float, int]] = []  # (time.monotonic(), largest RssAnon KiB)
        self.rss_samples: list[tuple[float, int]] = []  # (time.monotonic(), largest VmRSS KiB)
        self._thread = threading.Thread(target=self._poll, daemon=True)
        self._thread.start()

    def _tree(self) -> list[int]:
        parents: dict[int, int] = {}
        for d in Path("/proc").iterdir():
            if d.name.isdigit():
                try:
                    parents[int(d.name)] = int((d / "stat").read_text().rsplit(")", 1)[1].split()[1])
                except (OSError, IndexError, ValueError):
                    pass
        tree, frontier = [self.root], [self.root]
        while frontier:
            frontier = [p for p, pp in parents.items() if pp in frontier]
            tree += frontier
        return tree

    def _poll(self) -> None:
        while not self._done.wait(0.2):
            now = rss = 0
            for pid in self._tree():
                try:
                    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
                        if line.startswith("RssAnon:"):
                            now = max(now, int(line.split()[1]))
                        elif line.startswith("VmRSS:"):
                            rss = max(rss, int(line.split()[1]))
                except OSError:
                    pass
            self.peak_kib = max(self.peak_kib, now)
            self.peak_rss_kib = max(self.peak_rss_kib, rss)
            t = time.monotonic()
            self.samples.append((t, now))
            self.rss_samples.append((t, rss))

    def per_stage(self, ends: list[tuple[float, str]], rss: bool = False) -> dict[str, int]:
        """The largest RssAnon (VmRSS if `rss`) sampled while each stage ran: between the end of the
        previous stage's line and the end of its own (rank 0's clock; the first stage from the start)."""
        out, lo = {}, float("-inf")
        samples = self.rss_samples if rss else self.samples
        for t, stage in ends:
            inside = [kib for ts, kib in samples if lo < ts <= t]
            after = next((kib for ts, kib in samples if ts > t), 0)  # a stage under 0.2 s
            out[stage] = max(inside) if inside else after
            lo = t
        return out

    def stop(self) -> None:
        self._done.set()
        self._thread.join()


def _write_once(root: Path, n: int, nproc: int, scratch: Path) -> dict:
    """One timed write stage of the checkout `root` (see the module docstring)."""
    import shutil

    corpus, cfg = _e2e_inputs(scratch, n)
    out = scratch / f"ab-{root.name}-{n}"
    cmd, env = _prepare_command(root, nproc, corpus, out, cfg)
    for d in ("shards", "probe", "heldout", "work/write"):
        shutil.rmtree(out / d, ignore_errors=True)
    r = subprocess.run(cmd, cwd=root, env=env, capture_output=True, text=True)
    if r.returncode != 0:
        raise RuntimeError(f"{root}: grip prepare N={n} failed:\n{r.stdout[-2000:]}{r.stderr[-2000:]}")
    m = json.loads((out / "manifest.json").read_text())
    return {"out": str(out), **m["stats"]["timings"]["write"]}


def _main_write_ab(args) -> int:
    import statistics

    roots = {"before": Path(args.before_root).resolve(), "after": Path(__file__).resolve().parents[1]}
    scratch = Path(tempfile.mkdtemp(prefix="grip-write-ab-"))
    n = 1000 if args.quick else args.write_ab
    rows = []
    for nproc in args.nproc:
        runs: dict[str, list[dict]] = {k: [] for k in roots}
        for rep in range(args.repeats + 1):  # the first round prepares both folders: not timed
            for name, root in roots.items():
                r = _write_once(root, n, nproc, scratch)
                if rep:
                    runs[name].append(r)
                print(
                    f"  {name} nproc={nproc} repeat {rep}: write {r['seconds']:.2f}s",
                    file=sys.stderr,
                    flush=True,
                )
        shards = {}
        for name in roots:
            out = Path(runs[name][-1]["out"])
            shards[name] = {
                str(f.relative_to(out)): f.read_bytes() for f in sorted((out / "shards").rglob("*.tar"))
            }
        for name in roots:
            secs = [r["seconds"] for r in runs[name]]
            rows.append(
                {
                    "code": name,
                    "N": n,
                    "nproc": nproc,
                    "write_docs": runs[name][0]["docs"],
                    "write_s": statistics.median(secs),
                    "write_docs_per_s": runs[name][0]["docs"] / statistics.median(secs),
                    "all_s": " ".join(f"{x:.2f}" for x in secs),
                    "same_shards": shards["before"] == shards["after"],
                }
            )
    emit(
        "prepare_write_ab",
        rows,
        args,
        columns=["code", "N", "nproc", "write_docs", "write_s", "write_docs_per_s", "all_s", "same_shards"],
        roots={k: str(v) for k, v in roots.items()},
        scratch=str(scratch),
        config=E2E_CONFIG,
    )
    return 0


def main(argv=None) -> int:
    p = parser(__doc__.split("\n")[0])
    p.add_argument("--one", nargs=3, metavar=("STAGE", "N", "K"), help=argparse_help())
    p.add_argument("--stages", nargs="+", default=list(PLAN_FULL), help="stages to run")
    p.add_argument("--max-pairs", type=float, default=5e9, help="skip density when N^2/K exceeds this")
    p.add_argument("--extrapolate-to", type=int, nargs="+", default=[100_000, 1_000_000], help="N for fits")
    p.add_argument("--end-to-end", type=int, nargs="+", metavar="N", help="whole `grip prepare` runs instead")
    p.add_argument("--nproc", type=int, nargs="+", default=[1], help="processes of the --end-to-end runs")
    p.add_argument(
        "--scratch",
        type=Path,
        help="folder of the --end-to-end corpora and outputs (kept; a corpus there is reused); default a new temp dir",
    )
    p.add_argument(
        "--docs-per-cluster",
        type=int,
        default=1000,
        help="--end-to-end: K = N / this (default %(default)s; 100 gives K = 10^4 at N = 10^6)",
    )
    p.add_argument("--e2e-one", nargs=3, metavar=("N", "NPROC", "SCRATCH"), help="internal: one e2e run")
    p.add_argument(
        "--write-ab", type=int, metavar="N", help="time the write stage: this checkout vs --before-root"
    )
    p.add_argument("--before-root", help="--write-ab: the other checkout (e.g. a `git worktree` of main)")
    args = p.parse_args(argv)
    if args.docs_per_cluster < 1:
        p.error(f"--docs-per-cluster must be >= 1, got {args.docs_per_cluster}")
    if args.write_ab or (args.quick and args.before_root):
        if not args.before_root:
            p.error("--write-ab needs --before-root")
        return _main_write_ab(args)
    if args.e2e_one:
        n, nproc, scratch = int(args.e2e_one[0]), int(args.e2e_one[1]), Path(args.e2e_one[2])
        print(json.dumps(end_to_end(n, nproc, scratch, args.docs_per_cluster)))
        return 0
    if args.end_to_end or (args.quick and args.end_to_end is not None):
        return _main_e2e(args)
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


def _main_e2e(args) -> int:
    """Each (N, nproc) from a fresh driver process, so ru_maxrss of its children is that run's."""
    scratch = args.scratch or Path(tempfile.mkdtemp(prefix="grip-e2e-"))
    scratch.mkdir(parents=True, exist_ok=True)
    ns = [1000] if args.quick else args.end_to_end
    rows = []
    for n in ns:
        for nproc in args.nproc:
            out = subprocess.run(
                [sys.executable, __file__, "--e2e-one", str(n), str(nproc), str(scratch)]
                + ["--docs-per-cluster", str(args.docs_per_cluster)],
                stdout=subprocess.PIPE,  # its stderr (each stage's end, the error) goes through
                text=True,
            )
            if out.returncode != 0:
                raise RuntimeError(f"N={n} nproc={nproc} failed (its stderr is above)")
            rows.append(json.loads(out.stdout.strip().splitlines()[-1]))
            print(f"  N={n} nproc={nproc}: {rows[-1]['wall_s']:.1f}s", file=sys.stderr, flush=True)
    stages = ("ingest", "tokenize", "embed", "cluster", "geometry", "judge", "write")
    cols = ["N", "nproc", "K", "wall_s", "docs_per_s", "peak_rss_mb", "peak_anon_mb"]
    cols.insert(cols.index("peak_anon_mb"), "peak_vmrss_mb")
    cols += [f"{s}_s" for s in stages] + [f"{s}_anon_mb" for s in stages] + [f"{s}_rss_mb" for s in stages]
    cols += ["work_bytes_per_doc", "shard_bytes_per_doc"]
    config = {**E2E_CONFIG, "k": f"N // {args.docs_per_cluster}"}
    emit("prepare_end_to_end", rows, args, columns=cols, scratch=str(scratch), config=config)
    return 0


def argparse_help() -> str:
    return "internal: run one (stage, N, K) measurement and print its JSON"


def _env() -> dict:
    import os

    return dict(os.environ)


if __name__ == "__main__":
    raise SystemExit(main())
