"""`grip inspect DIR`: the manifest as a table, and a PNG of the length pathology (paper Fig. 2)."""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np

from train.helpfmt import RawDefaultsFormatter

COLUMNS_HELP = """columns:
  k         cluster id
  name      cluster name (language + path prefix or distinctive terms)
  N_k       training documents of the cluster
  tokens    their tokens
  sigma     geometric spread (Eq. 3): RMS distance of the embeddings to the centroid (0: one document)
  Q         static quality Q_k in [0, 1] (the judge)
  mean_len  tokens per document
  probe     probe documents of the cluster (adaptation + evaluation)
  eval      of those, evaluation-only documents (never trained on)
  examples  the first example paths
the PNG: kNN distance vs length (paper Fig. 2); a binned median rising above the median line
means inverse-density sampling over-picks long documents (Eq. 10's beta corrects it)"""


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
    return "\n".join(rows)


def plot_pathology(directory: Path, png: Path, bins: int = 12) -> Path:
    """Scatter of mean kNN distance (normalised by its median) against token length, log x, with
    binned medians, a reference line at the median and a title saying what to look for."""
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
    ax[0].axhline(1.0, color="0.3", linestyle="--", linewidth=1, label="corpus median (no pathology)")
    if mids:
        ax[0].plot(*zip(*mids, strict=True), color="C3", marker="o", label="binned median")
    ax[0].legend(fontsize=8)
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
    fig.suptitle(
        "Length pathology (paper Fig. 2): a binned median rising above the dashed line means long "
        "documents sit in sparse regions,\nso inverse-density (Eq. 9) sampling over-picks them; "
        "Eq. 10's length exponent beta corrects it",
        fontsize=9,
    )
    fig.tight_layout()
    fig.savefig(png, dpi=110)
    plt.close(fig)
    return png


def main(argv: list[str]) -> int:
    p = argparse.ArgumentParser(
        formatter_class=RawDefaultsFormatter,
        prog="grip inspect",
        description=__doc__,
        epilog=COLUMNS_HELP,
    )
    p.add_argument("dir", help="a prepared corpus (the --out of grip prepare)")
    p.add_argument(
        "--png",
        default=None,
        help="where to write the length-pathology plot (default: DIR/length_pathology.png)",
    )
    p.add_argument("--top", type=int, default=3, help="example paths shown per cluster")
    a = p.parse_args(argv)

    from grip_loop.manifest import load_manifest

    directory = Path(a.dir)
    m = load_manifest(directory)
    print(table(m, a.top))
    png = plot_pathology(directory, Path(a.png) if a.png else directory / "length_pathology.png")
    print(f"wrote {png}")
    return 0
