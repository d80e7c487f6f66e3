"""`grip inspect DIR`: the manifest as a table, and a PNG of the length pathology (paper Fig. 2).
`grip inspect DIR --cluster K` prints one cluster's card instead (K: its id or its name)."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np


def table(manifest, top: int = 3) -> str:
    """One row per cluster: size, tokens, sigma, Q, mean length, first documents of the first order."""
    width = max([len("name")] + [len(c.label) for c in manifest.clusters])
    rows = [
        f"{'k':>4} {'name':<{width}} {'N_k':>8} {'tokens':>10} {'sigma':>6} {'Q':>5} {'mean_len':>9} "
        f"{'probe':>5} {'eval':>4}  examples"
    ]
    for c in manifest.clusters:
        rows.append(
            f"{c.id:>4} {c.label:<{width}} {c.n_docs:>8} {c.n_tokens:>10} {c.sigma:>6.3f} {c.quality:>5.2f} "
            f"{c.mean_length:>9.1f} {len(c.probe_ids):>5} {len(c.eval_ids):>4}  {', '.join(c.examples[:top])}"
        )
    s = manifest.stats
    rows.append(
        f"total {manifest.n_docs} documents, {s.get('n_tokens', '?')} tokens, K={manifest.k}, "
        f"orders {manifest.orders}, encoder {manifest.encoder.get('name')}, "
        f"tokenizer vocab {manifest.tokenizer.get('vocab_size')}"
    )
    how = s.get("clustering") or {}
    if how.get("method") == "gem":
        rows.append(
            f"clusters: GEM (balance {how.get('balance')}, kappa {how.get('kappa')}, "
            f"{how.get('mm_iterations')} MM iterations on {how.get('sample_size')} documents; "
            f"student-teacher agreement {how.get('student_agreement')} on {how.get('student_heldout_points')} "
            f"held-out sample points), size entropy {how.get('size_entropy')}"
        )
    elif how.get("method"):
        extra = f", size entropy {how['size_entropy']}" if "size_entropy" in how else ""
        rows.append(f"clusters: {how['method']}{extra}")
    return "\n".join(rows)


def find_cluster(manifest, which: str):
    """The cluster whose id (an integer) or name is `which`; ValueError listing the choices."""
    for c in manifest.clusters:
        if which.strip() == str(c.id) or which == c.name:
            return c
    raise ValueError(
        f"--cluster: no cluster {which!r}; use an id 0..{manifest.k - 1} or one of the names "
        f"(grip inspect DIR lists them)"
    )


def card(manifest, c) -> str:
    """Name, size, sigma_k, Q_k, languages, most influential documents, top terms of one cluster."""
    langs = ", ".join(f"{lang} {share:.0%}" for lang, share in c.languages.items()) or "-"
    lines = [
        f"cluster {c.id}: {c.label}",
        f"  size        {c.n_docs} documents, {c.n_tokens} tokens "
        f"({c.n_docs / max(1, manifest.n_docs):.1%} of the corpus), mean length {c.mean_length:.1f}",
        f"  sigma_k     {c.sigma:.4f}   (Eq. 3: RMS distance to the centroid)",
        f"  Q_k         {c.quality:.3f}   "
        + " ".join(f"{dim} {v:.1f}" for dim, v in c.quality_scores.items()),
        f"  languages   {langs}",
        f"  top terms   {', '.join(c.top_terms) or '-'}",
        "  most influential documents (Geometric Influence Score, highest first):",
    ]
    lines += [f"    {p}" for p in c.influential] or ["    - (not recorded: prepared before GIS existed)"]
    lines.append(f"  probe       {len(c.probe_ids)} documents ({len(c.eval_ids)} evaluation)")
    return "\n".join(lines)


def plot_pathology(directory: Path, png: Path, bins: int = 12) -> Path:
    """Scatter of mean kNN distance (normalised by its median) against token length, log x, with binned medians."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    d = np.load(directory / "stats" / "length_knn.npz")
    length = np.maximum(d["length"], 1)
    dist = d["knn_distance"] / max(float(np.median(d["knn_distance"])), 1e-12)
    fig, ax = plt.subplots(1, 2, figsize=(10, 4))
    ax[0].scatter(length, dist, s=6, alpha=0.4)
    edges = np.unique(np.geomspace(length.min(), length.max() + 1, bins + 1))
    which = np.digitize(length, edges) - 1
    mids = [
        (np.sqrt(edges[b] * edges[b + 1]), np.median(dist[which == b]))
        for b in range(len(edges) - 1)
        if (which == b).any()
    ]
    if mids:
        ax[0].plot(*zip(*mids, strict=True), color="C3", marker="o", label="binned median")
        ax[0].legend()
    ax[0].set(
        xscale="log",
        xlabel="length l(x) (tokens)",
        ylabel="kNN distance / median",
        title="length vs kNN distance",
    )
    ax[1].hist(length, bins=np.geomspace(length.min(), length.max() + 1, 30))
    ax[1].set(
        xscale="log",
        yscale="log",
        xlabel="length l(x) (tokens)",
        ylabel="documents",
        title="length distribution",
    )
    fig.tight_layout()
    fig.savefig(png, dpi=110)
    plt.close(fig)
    return png


def main(argv: list[str]) -> int:
    p = argparse.ArgumentParser(prog="grip inspect", description=__doc__)
    p.add_argument("dir", help="a prepared corpus (the --out of grip prepare)")
    p.add_argument(
        "--png",
        default=None,
        help="where to write the length-pathology plot (default: DIR/length_pathology.png)",
    )
    p.add_argument("--top", type=int, default=3, help="example paths shown per cluster")
    p.add_argument(
        "--cluster",
        default=None,
        metavar="K",
        help="print the card of one cluster (its id or name): name, size, sigma_k, Q_k, languages, "
        "most influential documents, top terms; no table, no plot",
    )
    a = p.parse_args(argv)

    from grip_loop.manifest import load_manifest

    directory = Path(a.dir)
    m = load_manifest(directory)
    if a.cluster is not None:
        try:
            c = find_cluster(m, a.cluster)
        except ValueError as exc:
            print(f"grip inspect: error: {exc}", file=sys.stderr)
            return 2
        print(card(m, c))
        return 0
    print(table(m, a.top))
    png = plot_pathology(directory, Path(a.png) if a.png else directory / "length_pathology.png")
    print(f"wrote {png}")
    return 0
