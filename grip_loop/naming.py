"""Human-readable cluster names, so tables and charts never say only "cluster 7".

A k-means cluster is named ``<language>:<what its documents share>``:

* the dominant language of its documents (``python``, ``c``, ...; ``mixed`` when no
  language has half of them);
* the most common leading path (its first two directories, e.g. ``stdlib/asyncio``) when at
  least `min_prefix_share` of the documents live under it;
* otherwise its two most distinctive identifiers: words of 3+ characters ranked by how much
  more often they occur in the cluster than in the whole corpus (frequency ratio, add-one
  smoothed, counted once per document, over a seeded sample of `sample` documents per
  cluster).

Clusters that would share a name are told apart by their most distinctive identifier
(``python:stdlib/encodings~codec``), and by ``#<id>`` if that is not enough. Clusters
from `grip prepare --cluster-by FIELD` are named by their field value instead.
"""

from __future__ import annotations

import re
from collections import Counter
from collections.abc import Sequence

import numpy as np

_WORD = re.compile(r"[A-Za-z_][A-Za-z0-9_]{2,}")
_STOP = frozenset(
    "the and for not none self def return import from class with this that int char const void "
    "static struct else elif true false null define include endif ifdef ifndef".split()
)


def _prefix(path: str, depth: int = 2) -> str:
    parts = [p for p in path.replace("\\", "/").split("/")[:-1] if p]
    return "/".join(parts[:depth])


def cluster_names(
    labels: np.ndarray,
    k: int,
    langs: Sequence[str],
    paths: Sequence[str],
    texts: Sequence[str],
    *,
    min_prefix_share: float = 0.3,
    sample: int = 200,
    seed: int = 0,
) -> list[str]:
    """One name per cluster id 0..k-1 (see the module docstring); `labels[i]` < 0 = unclustered."""
    labels = np.asarray(labels)
    rng = np.random.default_rng(seed)
    members = [np.flatnonzero(labels == c) for c in range(k)]
    picks = [m if len(m) <= sample else np.sort(rng.choice(m, sample, replace=False)) for m in members]
    df_cluster: list[Counter] = []
    df_all: Counter = Counter()
    for pick in picks:
        df = Counter()
        for i in pick:
            df.update({w for w in _WORD.findall(texts[i]) if w.lower() not in _STOP})
        df_cluster.append(df)
        df_all.update(df)
    n_all = max(1, sum(len(p) for p in picks))

    def top_terms(c: int, n: int) -> list[str]:
        df, size = df_cluster[c], max(1, len(picks[c]))
        ratio = {w: (m / size) / ((df_all[w] + 1) / (n_all + 1)) for w, m in df.items() if m >= 2}
        return sorted(ratio, key=lambda w: (-ratio[w], w))[:n]

    names, terms = [], []
    for c, pick in enumerate(picks):
        terms.append(top_terms(c, 2) if len(pick) else [])
        if not len(pick):
            names.append(f"empty#{c}")
            continue
        lang, n_lang = Counter(langs[i] for i in pick).most_common(1)[0]
        lang = lang if n_lang >= len(pick) / 2 else "mixed"
        prefix, n_prefix = Counter(_prefix(paths[i]) for i in pick).most_common(1)[0]
        if prefix and n_prefix >= min_prefix_share * len(pick):
            names.append(f"{lang}:{prefix}")
        else:
            names.append(f"{lang}:{'/'.join(terms[c]) or 'misc'}")
    # clusters that share a path prefix are told apart by their most distinctive term
    seen = Counter(names)
    names = [f"{n}~{terms[c][0]}" if seen[n] > 1 and terms[c] else n for c, n in enumerate(names)]
    seen = Counter(names)
    return [f"{n}#{c}" if seen[n] > 1 else n for c, n in enumerate(names)]
