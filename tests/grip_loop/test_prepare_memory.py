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
        assert [t for b in batches for t in b] == texts == store.part_texts(p)
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
