"""The block-streamed helpers of `grip prepare` (`grip_loop.blockwise`, `workdir.Scratch`, the
held-out split from stratum codes) give what the in-memory computations they replace gave."""

import numpy as np
import pytest

from grip_loop import blockwise, workdir
from grip_loop.naming import describe_clusters, influence_scores
from grip_loop.prepare_cluster import heldout_split, heldout_split_codes, nth_training_rows
from grip_loop.prepare_common import _seed


def _old_heldout_split(langs, fraction, seed):
    """`heldout_split` as it was: an object array of every document's language."""
    langs_arr = np.asarray(langs, dtype=object)
    picked = []
    for lang in sorted(set(langs)):
        idx = np.flatnonzero(langs_arr == lang)
        n = min(int(np.floor(fraction * len(idx) + 0.5)), len(idx) - 1)
        if n > 0:
            rng = np.random.default_rng(
                _seed(seed, 7, int.from_bytes(lang.encode()[:8].ljust(8, b"\0"), "little"))
            )
            picked.append(rng.choice(idx, size=n, replace=False))
    return np.sort(np.concatenate(picked)) if picked else np.zeros(0, np.int64)


@pytest.mark.parametrize("seed", range(6))
def test_group_by_label_is_the_stable_argsort_of_the_training_labels(seed):
    rng = np.random.default_rng(seed)
    n, k = int(rng.integers(0, 3000)), int(rng.integers(1, 40))
    labels = rng.integers(0, k, n)
    train = rng.random(n) < 0.9
    order, bounds = blockwise.group_by_label(labels, k, train, block=int(rng.integers(1, 500)))
    # what prepare computed in memory before
    keyed = np.where(train, labels, k)
    old_order = np.argsort(keyed, kind="stable")
    old_bounds = np.searchsorted(keyed[old_order], np.arange(k + 1))
    assert np.array_equal(bounds, old_bounds) and bounds.dtype == np.int64
    for c in range(k):
        assert np.array_equal(order[bounds[c] : bounds[c + 1]], old_order[old_bounds[c] : old_bounds[c + 1]])
    # labels < 0 (and >= k) are no group's; an `out` array is filled
    out = np.full(n, -7, np.int64)
    with_neg = np.where(train, labels, -1)
    o2, b2 = blockwise.group_by_label(with_neg, k, out=out, block=97)
    assert np.array_equal(o2, order) and np.array_equal(b2, bounds) and np.shares_memory(o2, out)
    assert np.array_equal(blockwise.bincount(with_neg, k, block=13), np.bincount(labels[train], minlength=k))
    assert blockwise.masked_sum(labels, train, block=29) == int(labels[train].sum())


@pytest.mark.parametrize("seed", range(5))
def test_heldout_split_from_codes_is_the_old_split(seed):
    rng = np.random.default_rng(seed)
    values = ["python", "c", "go", "a-very-long-language-name", "rust"][: int(rng.integers(1, 6))]
    langs = [values[i] for i in rng.integers(0, len(values), int(rng.integers(1, 5000)))]
    for fraction in (0.0, 0.02, 0.3):
        old = _old_heldout_split(langs, fraction, seed)
        assert np.array_equal(heldout_split(langs, fraction, seed), old)
        # codes in ingest's order (first seen first), read in small blocks
        first_seen = list(dict.fromkeys(langs))
        codes = np.array([first_seen.index(v) for v in langs], np.int64)
        got = heldout_split_codes(codes, first_seen, fraction, seed)
        assert np.array_equal(got, old) and got.dtype == np.int64


@pytest.mark.parametrize("seed", range(4))
def test_heldout_split_codes_with_many_values_small_blocks_and_shared_values(seed):
    """One pass over the codes for all values (it was one pass per value): the same split with
    hundreds of values (a --cluster-by field), several codes naming one value, codes that never
    occur, and blocks that cut through every value's rows."""
    rng = np.random.default_rng(seed)
    values = [f"repo{int(v)}" for v in rng.integers(0, 150, 300)]  # ~150 distinct, shared by codes
    codes = rng.integers(0, 250, int(rng.integers(1, 6000)))  # codes 250..299 never occur
    langs = [values[c] for c in codes]
    for fraction in (0.0, 0.05, 0.5):
        old = _old_heldout_split(langs, fraction, seed)
        for block in (3, 64, 1 << 20):
            got = heldout_split_codes(codes, values, fraction, seed, block=block)
            assert np.array_equal(got, old) and got.dtype == np.int64


@pytest.mark.parametrize("seed", range(4))
def test_nth_training_rows_is_flatnonzero_of_train(seed):
    rng = np.random.default_rng(seed)
    n = int(rng.integers(1, 2000))
    held = np.sort(rng.choice(n, int(rng.integers(0, n)), replace=False))
    train = np.ones(n, bool)
    train[held] = False
    nth = np.sort(rng.choice(int(train.sum()), int(rng.integers(0, train.sum() + 1)), replace=False))
    assert np.array_equal(nth_training_rows(held, nth), np.flatnonzero(train)[nth])


def test_describe_clusters_with_the_callers_members_is_the_same(tmp_path):
    rng = np.random.default_rng(0)
    n, k = 400, 5
    x = rng.standard_normal((n, 8))
    x /= np.linalg.norm(x, axis=1, keepdims=True)
    labels = np.where(rng.random(n) < 0.1, -1, rng.integers(0, k, n))
    gis = influence_scores(x, labels, k)
    out = np.memmap(tmp_path / "gis", np.float64, "w+", shape=n)
    assert np.array_equal(influence_scores(x, labels, k, out=out), gis, equal_nan=True)
    langs = [["python", "c"][i % 2] for i in range(n)]
    paths = [f"lib/m{i % 7}/f{i}.py" for i in range(n)]
    texts = [f"def f{i % 11}(): return value_{i % 5} + other_{i % 3}" for i in range(n)]
    members = [np.flatnonzero(labels == c) for c in range(k)]
    for g in (gis, None):
        want = describe_clusters(labels, k, langs, paths, texts, gis=g, seed=3)
        assert describe_clusters(labels, k, langs, paths, texts, gis=g, seed=3, members=members) == want


def test_scratch_arrays_are_files_removed_on_close(tmp_path):
    scratch = workdir.Scratch(tmp_path / "work" / "tmp" / "rank-0")
    a = scratch.full("a", 1000, 3, np.int64)
    assert isinstance(a, np.memmap) and int(a.sum()) == 3000
    again = scratch.empty("a", 10, np.int64)  # a new file: the first map keeps its own pages
    again[:] = 1
    assert int(a.sum()) == 3000
    assert scratch.empty("none", 0, np.float64).shape == (0,)
    assert (tmp_path / "work" / "tmp" / "rank-0" / "a.bin").stat().st_size == 80
    scratch.close()
    assert not (tmp_path / "work" / "tmp").exists() and (tmp_path / "work").is_dir()
    assert int(a.sum()) == 3000  # still mapped
