"""What `grip prepare` holds in memory: texts read a batch at a time, token ids equal to the
tokenizer's per document, and the allocator's freed memory handed back between stages."""

import sys

import numpy as np
import pytest

from grip_loop import prepare_ingest, workdir
from grip_loop import tokenizer as tk
from grip_loop.docstore import open_work
from grip_loop.prepare import prepare

from .test_prepare_streaming import _cfg, synthetic_corpus


def _rss_anon_mb() -> float:
    with open("/proc/self/status") as fh:
        for line in fh:
            if line.startswith("RssAnon"):
                return int(line.split()[1]) / 1024
    raise AssertionError("no RssAnon")


@pytest.mark.parametrize("batch", [1, 3, 7, 64, 10_000])
def test_text_batches_of_a_part_are_its_texts(tmp_path, batch):
    corpus = synthetic_corpus(tmp_path / "c.jsonl", 150, seed=batch)
    prepare(_cfg(corpus, tmp_path / "o", ingest_part_docs=64, k=2, orders=["grip"]))
    store, _ = open_work(tmp_path / "o" / "work")
    for p in range(len(store.names)):
        texts = [store.text(i) for i in range(int(store.starts[p]), int(store.starts[p + 1]))]
        batches = list(store.part_text_batches(p, batch))
        assert [t for b in batches for t in b] == texts
        assert all(len(b) == batch for b in batches[:-1]) and 0 < len(batches[-1]) <= batch


@pytest.mark.parametrize("seed", [0, 1])
def test_token_ids_are_the_tokenizers_of_each_text_whatever_the_batch(tmp_path, monkeypatch, seed):
    """The tokenize stage encodes a part a batch at a time: every document's ids are still
    `tk.encode` of its text alone, with batches that end inside a part and parts of several."""
    monkeypatch.setattr(prepare_ingest, "TOKENIZE_BATCH", 7)
    corpus = synthetic_corpus(tmp_path / "c.jsonl", 120, seed=seed)
    prepare(_cfg(corpus, tmp_path / "o", ingest_part_docs=50, k=2, orders=["grip"]))
    store, tokens = open_work(tmp_path / "o" / "work")
    tok = tk.load_tokenizer(tmp_path / "o" / "tokenizer" / "tokenizer.json")
    assert len(store.names) == 3
    for i in range(len(store)):
        np.testing.assert_array_equal(tokens.tokens(i), tk.encode(tok, [store.text(i)])[0])


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc's malloc_trim (a no-op elsewhere)")
def test_release_memory_hands_freed_heap_back():
    """Freed blocks in the middle of the heap (a live block after them keeps the heap's top from
    shrinking by itself) stay in the process until `release_memory`."""
    if not workdir.release_memory():
        pytest.skip("not glibc")
    blocks = [bytes(bytearray(700)) for _ in range(150_000)]  # ~105 MB of malloc'ed (not pymalloc) blocks
    keep = bytes(bytearray(700))  # noqa: F841  (allocated after them: the heap's top stays in use)
    before = _rss_anon_mb()
    del blocks
    freed = _rss_anon_mb()
    workdir.release_memory()
    after = _rss_anon_mb()
    assert freed - after > 50 and before - after > 50, (before, freed, after)


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_sigma_streamed_equals_eq3_whatever_the_blocks(seed):
    """sigma_k of Eq. 3 (the RMS distance of a cluster's training rows to its centroid; 0 below 2
    rows): the same bits for any number of rows a distance computation holds, and equal to a
    direct per-cluster computation."""
    from grip_loop.prepare_cluster import sigma_streamed

    rng = np.random.default_rng(seed)
    n, d, k = 3000, 16, 7
    emb = rng.normal(size=(n, d)).astype(np.float32)
    emb /= np.linalg.norm(emb, axis=1, keepdims=True)
    labels = rng.integers(0, k - 1, n)  # cluster k - 1 has no row
    labels[rng.integers(0, n)] = k - 2  # ... and k - 2 maybe one
    train = rng.random(n) > 0.3
    cent = rng.normal(size=(k, d)).astype(np.float32)
    cent /= np.linalg.norm(cent, axis=1, keepdims=True)
    ref = sigma_streamed(emb, labels, train, cent, block=n, rows=n)
    for block in (n, 1000, 512):  # the sums' grouping: the same bits for any `rows`
        whole = sigma_streamed(emb, labels, train, cent, block=block, rows=block)
        for rows in (1, 7, 100, 333):
            np.testing.assert_array_equal(
                sigma_streamed(emb, labels, train, cent, block=block, rows=rows), whole
            )
        np.testing.assert_allclose(whole, ref, rtol=1e-12)
    for c in range(k):
        x = emb[(labels == c) & train]
        want = np.sqrt(np.mean(np.sum((x - cent[c]) ** 2, axis=1))) if len(x) >= 2 else 0.0
        assert ref[c] == pytest.approx(want, rel=1e-6)
    bad = emb.copy()
    bad[5] *= 2
    with pytest.raises(ValueError, match="L2-normalised"):
        sigma_streamed(bad, labels, np.ones(n, bool), cent, rows=64)
