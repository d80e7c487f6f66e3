"""The probe's windows: roles from the manifest's split, halves by document, packing, seeded offsets."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from grip_loop.manifest import ManifestError, load_manifest
from grip_loop.probeset import pack_windows, probe_set
from tests.prepared import EOS, MARK, POS, make_prepared

SIZES = [20, 14, 0, 9]


@pytest.fixture(scope="module")
def short_docs(tmp_path_factory):
    root = tmp_path_factory.mktemp("short")
    make_prepared(root, SIZES, max_len=12, n_probe=12)  # every document fits a 64-token window
    return root


def docs_in(rows: torch.Tensor) -> list[int]:
    """Probe-order positions of the documents whose start ([EOS, MARK+k, POS+p]) is in `rows`."""
    out = []
    for row in rows.tolist():
        for i in range(len(row) - 2):
            if row[i] == EOS and MARK <= row[i + 1] < POS and row[i + 2] >= POS:
                out.append(row[i + 2] - POS)
    return out


def test_roles_follow_the_manifest_and_halves_alternate_by_document(short_docs):
    m = load_manifest(short_docs)
    ps = probe_set(m, short_docs, seq_len=64, max_docs=6)
    assert sorted(ps) == [0, 1, 3]  # the empty cluster has no probe
    for k, pb in ps.items():
        c = m.clusters[k]
        n = len(c.probe_ids)
        assert docs_in(pb.adapt) == list(range(0, min(n, 12), 2))[:6]  # positions 0, 2, 4, ...
        evals = list(range(1, min(n, 12), 2))[:6]
        assert sorted(docs_in(pb.eval)) == evals
        assert pb.adapt_docs == len(docs_in(pb.adapt)) and pb.eval_docs == len(evals)
        for h in (0, 1):  # the halves split the evaluation documents, never a window
            assert sorted(docs_in(pb.eval[pb.eval_half == h])) == evals[h::2]
        for t in (pb.adapt, pb.eval):
            assert t.dtype == torch.int64 and t.shape[1] == 64


def test_long_documents_give_seeded_random_windows(tmp_path):
    make_prepared(tmp_path, [16], max_len=200, n_probe=16)
    m = load_manifest(tmp_path)
    a = probe_set(m, tmp_path, seq_len=16, max_docs=8)
    b = probe_set(m, tmp_path, seq_len=16, max_docs=8)
    c = probe_set(m, tmp_path, seq_len=16, max_docs=8, seed=1)
    assert torch.equal(a[0].adapt, b[0].adapt) and torch.equal(a[0].eval, b[0].eval)
    assert not torch.equal(a[0].adapt, c[0].adapt)
    # a long document contributes a 16-token slice of [EOS] doc, not always its beginning
    starts = [int(row[0]) for row in a[0].adapt.tolist()]
    assert any(s != EOS for s in starts)
    two = probe_set(m, tmp_path, seq_len=16, max_docs=8, windows_per_doc=2)
    assert two[0].adapt.shape[0] > a[0].adapt.shape[0] and two[0].adapt_docs == a[0].adapt_docs


def test_literal_protocol_uses_every_probe_document_for_adaptation(short_docs):
    m = load_manifest(short_docs)
    ps = probe_set(m, short_docs, seq_len=64, max_docs=10, eval_split="none")
    assert ps[0].eval is None and ps[0].eval_half is None
    assert docs_in(ps[0].adapt) == list(range(10))


def test_a_corpus_without_the_split_is_a_clear_error(short_docs, tmp_path):
    import json
    import shutil

    old = tmp_path / "old"
    shutil.copytree(short_docs, old)
    raw = json.loads((old / "manifest.json").read_text())
    for c in raw["clusters"]:
        c.pop("eval_ids")
    (old / "manifest.json").write_text(json.dumps(raw))
    m = load_manifest(old)
    with pytest.raises(
        ManifestError, match=r"manifest\.json: cluster 0 .*eval_ids.*grip prepare.*eval_split: none"
    ):
        probe_set(m, old, seq_len=64)
    assert probe_set(m, old, seq_len=64, eval_split="none")  # the literal protocol still works


@pytest.mark.parametrize("seed", range(4))
def test_pack_windows_keeps_every_token_in_order(seed):
    rng = np.random.default_rng(seed)
    pieces = [rng.integers(1, 50, size=rng.integers(1, 17)) for _ in range(30)]
    rows = pack_windows(pieces, 16, pad=0)
    assert rows.shape[1] == 16
    flat = [t for row in rows.tolist() for t in row if t != 0]
    assert flat == [int(t) for p in pieces for t in p]
    for row in rows.tolist():  # padding only at the end of a row
        nz = [i for i, t in enumerate(row) if t != 0]
        assert nz == list(range(len(nz)))
