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

With Geometric Influence Scores (`influence_scores`, `describe_clusters`; what `grip prepare`
uses), a cluster is named from its core, the more influential half of its members (at least
10, at most `sample`), instead of a uniform sample: the documents that make the cluster's
direction, not its outliers. The language part names two languages (``c+python``) when
neither has half of those documents but the two together have 80%, and a one-level path
prefix (``stdlib``) gets the top term appended (``python:stdlib~pty``).

Geometric Influence Score (GIS). The seed (GEM) names it without a formula; the definition
here: for cluster k with members x_i (unit vectors), resultant s_k = sum_i x_i, R_k = |s_k|
and mean direction mu_k = s_k / R_k, a document's influence is how much of the cluster's
resultant it supplies, measured by removing it:

    GIS_i = (N_k / R_k) (R_k - |s_k - x_i|),   |s_k - x_i| = sqrt(R_k^2 - 2 R_k cos_i + 1)

(cos_i = mu_k . x_i). Why this one: R_k / N_k is the cluster's mean resultant length, the
statistic the vMF concentration (kappa) and sigma_k (Eq. 3) are functions of, so GIS_i is the
document's leave-one-out effect on how tight the cluster is; the factor N_k / R_k makes it
comparable across clusters of any size and spread (the members' mean is ~1; 2 = twice an
average member's pull; < 0 = the document pulls against the direction, an outlier).
The other leave-one-out quantity, the angle the direction turns when a document is removed,
is largest for outliers (it grows with the component orthogonal to mu_k), so it would name a
cluster after its least typical documents. Within one cluster GIS is an increasing function
of cos_i: it ranks members like the cosine to the centroid does; what it adds is the scale.
"""

from __future__ import annotations

import re
import tempfile
from collections import Counter
from collections.abc import Sequence

import numpy as np

from grip_loop import blockwise, workdir

_WORD = re.compile(r"[A-Za-z_][A-Za-z0-9_]{2,}")
_STOP = frozenset(
    "the and for not none self def return import from class with this that int char const void "
    "static struct else elif true false null define include endif ifdef ifndef".split()
)


def _prefix(path: str, depth: int = 2) -> str:
    parts = [p for p in path.replace("\\", "/").split("/")[:-1] if p]
    return "/".join(parts[:depth])


def influence_scores(
    emb: np.ndarray, labels: np.ndarray, k: int, *, block: int = 65536, out: np.ndarray | None = None
) -> np.ndarray:
    """GIS of every row (module docstring): float64 (N,), NaN where `labels` < 0. `emb` and
    `labels` are read in blocks (memory maps are fine); `out`: the (N,) float64 array to fill
    (a memory map, say), returned."""
    n = len(labels)
    d = np.asarray(emb[:1]).shape[1]
    s = np.zeros((k, d))
    for lo in range(0, n, block):  # resultants, streamed
        xb = np.asarray(emb[lo : lo + block], np.float64)
        lb = np.asarray(labels[lo : lo + block])
        ok = lb >= 0
        np.add.at(s, lb[ok], xb[ok])
        workdir.trim_maps()
    sizes = blockwise.bincount(labels, k, block=block)
    r = np.linalg.norm(s, axis=1)
    mu = s / np.maximum(r, 1e-12)[:, None]
    gis = np.empty(n) if out is None else out
    gis[:] = np.nan
    for lo in range(0, n, block):
        xb = np.asarray(emb[lo : lo + block], np.float64)
        lb = np.asarray(labels[lo : lo + block])
        ok = np.flatnonzero(lb >= 0)
        c = lb[ok]
        cos = np.einsum("nd,nd->n", xb[ok], mu[c])
        rk = r[c]
        rest = np.sqrt(np.maximum(rk * rk - 2 * rk * cos + 1.0, 0.0))
        gis[lo + ok] = np.where(rk > 1e-12, sizes[c] / np.maximum(rk, 1e-12) * (rk - rest), 0.0)
        workdir.trim_maps()
    return gis


class CodedValues(Sequence):
    """Document i's value is `values[codes[i]]` (ingest's stratum codes, a memory map say): a
    `langs` for `describe_clusters` that counts a cluster's languages with one bincount instead
    of a metadata read per document."""

    def __init__(self, codes, values: Sequence[str]) -> None:
        self.codes, self.values = codes, list(values)

    def __len__(self) -> int:
        return len(self.codes)

    def __getitem__(self, i):
        if isinstance(i, slice):
            return [self.values[c] for c in np.asarray(self.codes[i])]
        return self.values[int(self.codes[int(i)])]

    def counts(self, rows: np.ndarray) -> Counter:
        """Counter(self[i] for i in rows), with its keys in the same (first-seen) order."""
        codes = np.asarray(workdir.take_rows(self.codes, np.asarray(rows, np.int64)), np.int64)
        present, first, n = np.unique(codes, return_index=True, return_counts=True)
        counts: Counter = Counter()
        for j in np.argsort(first, kind="stable"):
            counts[self.values[int(present[j])]] += int(n[j])
        return counts


def _language(langs) -> tuple[str, dict[str, float]]:
    counts = langs if isinstance(langs, Counter) else Counter(langs)
    total = sum(counts.values())
    shares = {lang: round(m / total, 4) for lang, m in counts.most_common()}
    top = counts.most_common(2)
    if top[0][1] >= total / 2:
        return top[0][0], shares
    if len(top) == 2 and top[0][1] + top[1][1] >= 0.8 * total:
        return "+".join(sorted((top[0][0], top[1][0]))), shares
    return "mixed", shares


def cluster_names(
    labels: np.ndarray, k: int, langs: Sequence[str], paths: Sequence[str], texts: Sequence[str], **kw
) -> list[str]:
    """One name per cluster id 0..k-1 (see the module docstring); `labels[i]` < 0 = unclustered.
    Keyword arguments (`min_prefix_share`, `sample`, `seed`, `gis`) as `describe_clusters`."""
    return [c["name"] for c in describe_clusters(labels, k, langs, paths, texts, **kw)]


def describe_clusters(
    labels: np.ndarray,
    k: int,
    langs: Sequence[str],
    paths: Sequence[str],
    texts: Sequence[str],
    *,
    min_prefix_share: float = 0.3,
    sample: int = 200,
    seed: int = 0,
    gis: np.ndarray | None = None,
    n_terms: int = 8,
    n_influential: int = 5,
    members: Sequence[np.ndarray] | None = None,
    spill_dir: str | None = None,
) -> list[dict]:
    """Per cluster id 0..k-1: {"name", "languages" (share of each language among all members),
    "top_terms" (the `n_terms` most distinctive identifiers of the named-from documents),
    "influential" (indices of the `n_influential` highest-GIS members; [] without `gis`)}.

    Documents named from: with `gis`, each cluster's `sample` highest-GIS members; without,
    a seeded uniform sample of `sample` members (the naming of issue 12). `members`: each
    cluster's rows in ascending order, when the caller has them (from `labels` otherwise).
    `spill_dir`: the folder of the temporary file of word counts (the system's temp folder by
    default; 8 bytes a distinct word of each cluster, removed when this returns)."""
    rng = np.random.default_rng(seed)
    if gis is not None and not isinstance(gis, np.ndarray):
        gis = np.asarray(gis, np.float64)
    if members is None:
        order, bounds = blockwise.group_by_label(labels, k)
        members = [order[bounds[c] : bounds[c + 1]] for c in range(k)]
    # One pass over the clusters reads the documents named from and keeps, per cluster, only
    # what the names need: its language and path prefix, its word document frequencies (a word
    # is counted once per document) as (id, count) int32 pairs in a temporary file, and df_all.
    # Held in memory per cluster these cost ~10 KB at 200 documents named from (+96 MB at
    # K = 10^4, 10^7 documents; docs/benchmarks.md 7f); a Counter of strings cost ~50 KB (7e).
    vocab: dict[str, int] = {}
    df_all = np.zeros(1024, np.int64)  # over every cluster's documents named from, grown as needed
    n_named = np.zeros(k, np.int64)
    bounds_df = np.zeros(k + 1, np.int64)  # cluster c's pairs: rows bounds_df[c]:bounds_df[c + 1]
    influential, languages, named_by = [], [], []  # named_by: (language, prefix, its documents)
    with tempfile.TemporaryFile(dir=spill_dir) as spill:
        for c, m in enumerate(members):
            if gis is not None:
                # GIS descending, ties by index; read, not mapped (a cluster's members are all over N)
                r = m[np.lexsort((m, -np.asarray(workdir.take_rows(gis, m), np.float64)))]
                influential.append([int(i) for i in r[:n_influential]])
                # the cluster's core: its more influential half (at least 10, at most `sample`)
                pick = np.sort(r[: min(sample, max(10, -(-len(r) // 2)))])
                del r
            else:
                influential.append([])
                pick = m if len(m) <= sample else np.sort(rng.choice(m, sample, replace=False))
            n_named[c] = len(pick)
            df: Counter = Counter()
            for i in pick:
                df.update(
                    {
                        vocab.setdefault(w, len(vocab))
                        for w in _WORD.findall(texts[i])
                        if w.lower() not in _STOP
                    }
                )
            pairs = np.empty((len(df), 2), np.int32)
            pairs[:, 0] = np.fromiter(df.keys(), np.int32, len(df))
            pairs[:, 1] = np.fromiter(df.values(), np.int32, len(df))
            spill.write(pairs.tobytes())
            bounds_df[c + 1] = bounds_df[c] + len(df)
            if len(vocab) > len(df_all):
                df_all = np.concatenate(
                    [df_all, np.zeros(max(len(vocab), 2 * len(df_all)) - len(df_all), np.int64)]
                )
            df_all[pairs[:, 0]] += pairs[:, 1]  # ids are distinct within a cluster
            del df, pairs
            if not len(m):
                languages.append({})
            else:
                languages.append(_language(_counts(langs, m))[1])
            if len(pick):
                lang = _language(_counts(langs, pick))[0] if gis is not None else _majority(langs, pick)
                prefix, n_prefix = Counter(_prefix(paths[i]) for i in pick).most_common(1)[0]
                named_by.append((lang, prefix, n_prefix))
            else:
                named_by.append(None)
            workdir.trim_maps()  # the members' slices of the scratch maps read so far
        words = list(vocab)  # id -> word
        del vocab
        n_all = max(1, int(n_named.sum()))
        spill.flush()
        pairs_all = _read_pairs(spill, int(bounds_df[-1]))  # the map outlives the file object

    def top_terms(c: int, n: int) -> list[str]:
        pc = pairs_all[bounds_df[c] : bounds_df[c + 1]]
        ids, counts = pc[:, 0], pc[:, 1]
        keep = counts >= 2
        ids, m = ids[keep].astype(np.int64), counts[keep].astype(np.float64)
        size = float(max(1, n_named[c]))
        # the same float operations, in the same order, as the scalar (m / size) / ((df + 1) / (n_all + 1))
        ratio = (m / size) / ((df_all[ids] + 1.0) / float(n_all + 1))
        return [w for _, w in sorted(zip((-ratio).tolist(), (words[i] for i in ids), strict=True))[:n]]

    names, terms = [], []
    for c in range(k):
        terms.append(top_terms(c, n_terms) if n_named[c] else [])
        workdir.trim_maps()  # the pairs' map, read cluster after cluster
        if named_by[c] is None:
            names.append(f"empty#{c}")
            continue
        lang, prefix, n_prefix = named_by[c]
        if prefix and n_prefix >= min_prefix_share * n_named[c]:
            # a one-level prefix ("stdlib") says little: with GIS, its top term is added
            one_level = gis is not None and "/" not in prefix and terms[c]
            names.append(f"{lang}:{prefix}~{terms[c][0]}" if one_level else f"{lang}:{prefix}")
        else:
            names.append(f"{lang}:{'/'.join(terms[c][:2]) or 'misc'}")
    # clusters that share a path prefix are told apart by their most distinctive term
    seen = Counter(names)
    names = [f"{n}~{terms[c][0]}" if seen[n] > 1 and terms[c] else n for c, n in enumerate(names)]
    seen = Counter(names)
    names = [f"{n}#{c}" if seen[n] > 1 else n for c, n in enumerate(names)]
    return [
        {
            "name": names[c],
            "languages": languages[c],
            "top_terms": terms[c],
            "influential": influential[c],
        }
        for c in range(k)
    ]


def _read_pairs(fh, n: int) -> np.ndarray:
    """The (n, 2) int32 pairs written to the temporary file `fh`, memory-mapped (read-only)."""
    if n == 0:
        return np.zeros((0, 2), np.int32)
    fh.seek(0)
    return np.memmap(fh, np.int32, "r", shape=(n, 2))


def _counts(langs: Sequence[str], rows) -> Counter:
    """Counter(langs[i] for i in rows), keys in first-seen order; one read of the codes for
    `CodedValues` (a lookup per document would map the page-cache folio around each)."""
    return langs.counts(rows) if isinstance(langs, CodedValues) else Counter(langs[i] for i in rows)


def _majority(langs: Sequence[str], pick) -> str:
    lang, n_lang = _counts(langs, pick).most_common(1)[0]
    return lang if n_lang >= len(pick) / 2 else "mixed"
