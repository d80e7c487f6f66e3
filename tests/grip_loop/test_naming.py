"""Geometric Influence Score against a naive leave-one-out recomputation, and the names and
cluster descriptions built from it."""

import numpy as np
import pytest

from grip_loop.naming import cluster_names, describe_clusters, influence_scores
from tests.conftest import unit_rows


def _naive_gis(x, labels, k):
    out = np.full(len(x), np.nan)
    for c in range(k):
        m = np.flatnonzero(labels == c)
        s = x[m].astype(np.float64).sum(0)
        r = np.linalg.norm(s)
        for i in m:
            out[i] = len(m) / r * (r - np.linalg.norm(s - x[i]))  # remove the document, re-measure
    return out


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_gis_equals_leave_one_out_and_streams_in_blocks(seed):
    rng = np.random.default_rng(seed)
    x = unit_rows(rng.normal(size=(90, 6)) + np.array([3.0, 0, 0, 0, 0, 0]))
    labels = rng.integers(0, 4, size=90)
    labels[:5] = -1  # unclustered (held out)
    g = influence_scores(x, labels, 4, block=7)
    assert np.isnan(g[:5]).all()
    assert np.allclose(g[5:], _naive_gis(x, labels, 4)[5:], atol=1e-9)
    for c in range(4):  # normalised: an average member scores ~1 in every cluster
        assert np.nanmean(g[labels == c]) == pytest.approx(1.0, abs=0.05)
    # an outlier pulls against its cluster's direction: the lowest score of its cluster
    x2 = x.copy()
    x2[10] = -x2[11]
    labels2 = labels.copy()
    labels2[10] = labels2[11]
    g2 = influence_scores(x2, labels2, 4)
    members = np.flatnonzero(labels2 == labels2[10])
    assert g2[10] < 0 and g2[10] == g2[members].min()


def test_gis_of_a_singleton_and_an_empty_cluster():
    x = unit_rows(np.eye(3))
    g = influence_scores(x, np.array([0, 1, 1]), 3)  # cluster 2 is empty
    assert g[0] == pytest.approx(1.0) and np.all(np.isfinite(g))


def test_descriptions_come_from_the_influential_core():
    rng = np.random.default_rng(0)
    # cluster 0: a tight core under pkg/core and loose members scattered around it elsewhere;
    # cluster 1: C files
    core = unit_rows(np.array([1.0, 0, 0]) + 0.01 * rng.normal(size=(12, 3)))
    loose = unit_rows(np.array([1.0, 0, 0]) + 0.6 * rng.normal(size=(12, 3)))
    other = unit_rows(np.array([0, 0, 1.0]) + 0.05 * rng.normal(size=(10, 3)))
    x = np.vstack([core, loose, other])
    labels = np.array([0] * 24 + [1] * 10)
    paths = [f"pkg/core/m{i}.py" for i in range(12)] + [f"misc/a{i}/x.py" for i in range(12)]
    paths += [f"native/src/f{i}.c" for i in range(10)]
    langs = ["python"] * 24 + ["c", "cpp"] * 4 + ["python"] * 2
    texts = ["def tensor_kernel(): pass"] * 12 + ["def random_helper(): pass"] * 12
    texts += ["int fast_loop(void);"] * 10
    gis = influence_scores(x, labels, 2)
    d = describe_clusters(labels, 2, langs, paths, texts, gis=gis)
    assert d[0]["name"] == "python:pkg/core"
    assert set(d[0]["influential"]) <= set(range(12))  # the tight core, not the loose members
    assert "tensor_kernel" in d[0]["top_terms"] and "random_helper" not in d[0]["top_terms"]
    assert d[1]["name"] == "c+cpp:native/src" and d[1]["languages"] == {"c": 0.4, "cpp": 0.4, "python": 0.2}
    assert d[0]["influential"] == sorted(range(24), key=lambda i: (-gis[i], i))[:5]
    # without GIS: the uniform-sample naming (issue 12), the same language rule as before
    assert cluster_names(labels, 2, langs, paths, texts)[1] == "mixed:native/src"
    assert describe_clusters(labels, 2, langs, paths, texts)[0]["influential"] == []


def _naive_top_terms(labels, k, texts, n):
    """Issue 12's rule with a Counter of word strings per cluster: a word's share of the
    cluster's documents over its share of all, words in >= 2 of the cluster's documents,
    ties by the word."""
    import re
    from collections import Counter

    from grip_loop.naming import _STOP

    word = re.compile(r"[A-Za-z_][A-Za-z0-9_]{2,}")
    dfs, df_all = [], Counter()
    for c in range(k):
        df = Counter()
        for i in np.flatnonzero(labels == c):
            df.update({w for w in word.findall(texts[i]) if w.lower() not in _STOP})
        dfs.append(df)
        df_all.update(df)
    n_all = int((labels >= 0).sum())
    out = []
    for c in range(k):
        size = max(1, int((labels == c).sum()))
        ratio = {w: (m / size) / ((df_all[w] + 1) / (n_all + 1)) for w, m in dfs[c].items() if m >= 2}
        out.append(sorted(ratio, key=lambda w: (-ratio[w], w))[:n])
    return out


@pytest.mark.parametrize("seed", [0, 1, 2, 3])
def test_top_terms_equal_a_counter_of_words_per_cluster(seed, tmp_path, monkeypatch):
    """The interned-id counting (pairs per cluster in a temporary file under `spill_dir`) gives
    the naive rule's terms, ties too; a cluster without members is named "empty"; nothing is
    left in `spill_dir` after."""
    import grip_loop.naming as naming

    made, real = [], naming.tempfile.TemporaryFile

    def spy(*a, **kw):
        made.append(kw.get("dir"))
        return real(*a, **kw)

    monkeypatch.setattr(naming.tempfile, "TemporaryFile", spy)
    rng = np.random.default_rng(seed)
    vocab = [f"w{i:03d}" for i in range(60)] + ["the", "Self", "ab"]  # stop words, too short
    k, n = 8, 300
    labels = rng.integers(0, k - 1, n)  # cluster k - 1 has no member
    labels[:10] = -1  # held out: not counted
    texts = [" ".join(rng.choice(vocab[: 20 + 6 * labels[i]], rng.integers(1, 12))) for i in range(n)]
    got = describe_clusters(
        labels, k, ["python"] * n, ["a/b/c.py"] * n, texts, sample=10**6, n_terms=6, spill_dir=str(tmp_path)
    )
    assert [d["top_terms"] for d in got] == _naive_top_terms(labels, k, texts, 6)
    assert got[k - 1]["name"] == f"empty#{k - 1}" and got[k - 1]["languages"] == {}
    assert made == [str(tmp_path)] and list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("seed", [0, 1, 2, 3])
def test_languages_from_codes_equal_languages_from_strings(seed, tmp_path):
    """prepare hands describe_clusters ingest's language codes (a bincount per cluster, no
    metadata read per document): the shares, their order (ties: first seen first) and the
    names are those of the list of language strings."""
    from grip_loop.naming import CodedValues

    rng = np.random.default_rng(seed)
    n, k = 400, 9
    values = ["python", "c", "go", "rust", "c++"]
    codes = rng.integers(0, len(values), n)
    codes[rng.random(n) < 0.5] = seed % len(values)  # a majority in some clusters, ties in others
    labels = rng.integers(-1, k, n)
    labels[labels == 3] = -1  # an empty cluster
    texts = [" ".join(rng.choice([f"w{i}" for i in range(30)], 6)) for _ in range(n)]
    paths = [f"p{int(c)}/x/f.py" for c in rng.integers(0, 3, n)]
    gis = rng.random(n)
    strings = [values[c] for c in codes]
    for g in (None, gis):
        want = describe_clusters(labels, k, strings, paths, texts, gis=g, seed=seed)
        got = describe_clusters(labels, k, CodedValues(codes, values), paths, texts, gis=g, seed=seed)
        assert got == want
        assert [list(d["languages"]) for d in got] == [list(d["languages"]) for d in want]
    # codes and GIS as memory-mapped files (what prepare passes: scratch maps, read by `take_rows`)
    mapped = []
    for name, a in (("codes", codes), ("gis", gis)):
        m = np.lib.format.open_memmap(tmp_path / f"{name}.npy", "w+", a.dtype, a.shape)
        m[:] = a
        m.flush()
        mapped.append(np.load(tmp_path / f"{name}.npy", mmap_mode="r"))
    for g in (None, mapped[1]):
        want = describe_clusters(labels, k, strings, paths, texts, gis=None if g is None else gis, seed=seed)
        got = describe_clusters(labels, k, CodedValues(mapped[0], values), paths, texts, gis=g, seed=seed)
        assert got == want
