"""`grip_loop.idset.SeenIds` against a Python set, and the reader's ids with it."""

from __future__ import annotations

import json

import numpy as np
import pytest

from grip_loop.corpus import CorpusReader
from grip_loop.idset import SeenIds, id_hash


@pytest.mark.parametrize("seed", [0, 1, 2, 3])
@pytest.mark.parametrize("buffer", [1, 3, 64])
@pytest.mark.parametrize("spill", [False, True])
def test_add_and_contains_match_a_python_set(tmp_path, seed, buffer, spill):
    rng = np.random.default_rng(seed)
    # few distinct strings, so repeats hit both the recent set and the merged sorted array
    words = [f"doc-{i}" for i in rng.integers(0, 300, 2000)] + ["", "é/ü", "\udcff"]
    seen, ref = SeenIds(tmp_path / "spill" if spill else None, buffer=buffer), set()
    for w in words:
        assert seen.add(w) == (w not in ref)
        ref.add(w)
        assert w in seen
    assert len(seen) == len(ref)
    for i in range(300, 400):  # never added
        assert f"doc-{i}" not in seen
    assert np.all(np.diff(seen._sorted.astype(np.uint64)) > 0)  # sorted, no repeats
    seen.close()
    assert not list((tmp_path / "spill").glob("*")) if spill else True


def test_spill_keeps_one_file_and_close_removes_it(tmp_path):
    spill = tmp_path / "spill"
    seen = SeenIds(spill, buffer=4)
    for i in range(50):
        seen.add(str(i))
    files = list(spill.glob("*"))
    assert len(files) == 1 and files[0].suffix == ".bin" and isinstance(seen._sorted, np.memmap)
    assert np.array_equal(
        np.fromfile(files[0], np.uint64), np.sort(np.array([id_hash(str(i)) for i in range(48)], np.uint64))
    )
    seen.close()
    assert not spill.exists()


def test_a_hash_collision_renames_but_ids_stay_unique(tmp_path, monkeypatch):
    import grip_loop.idset as idset

    monkeypatch.setattr(idset, "id_hash", lambda s: 7 if s in ("a", "b") else hash(s) & (2**63 - 1))
    src = tmp_path / "c.jsonl"
    src.write_text("\n".join(json.dumps({"id": i, "text": f"t{i}"}) for i in ["a", "b", "a"]) + "\n")
    ids = [d.id for d in CorpusReader(src)]
    assert len(set(ids)) == 3 and ids[0] == "a"  # "b" collides with "a": it gets a suffix


@pytest.mark.parametrize("scratch", [False, True])
def test_reader_ids_with_many_repeats_are_unique_and_as_before(tmp_path, scratch, monkeypatch):
    import grip_loop.idset as idset

    monkeypatch.setattr(idset.SeenIds.__init__, "__defaults__", (None, 5))  # merge every 5 ids
    rows = [{"id": f"x{i % 7}", "text": f"doc {i}"} for i in range(60)] + [{"id": "x0#2", "text": "z"}]
    src = tmp_path / "c.jsonl"
    src.write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    reader = CorpusReader(src, scratch_dir=tmp_path / "work" if scratch else None)
    ids = [d.id for d in reader]
    # the old reader's rule, with a Python set: first keeps its id, later ones "#2", "#3", ...
    seen, nxt, want = set(), {}, []
    for r in rows:
        i = r["id"]
        if i in seen:
            n = nxt.get(i, 2)
            while f"{i}#{n}" in seen:
                n += 1
            nxt[i] = n + 1
            i = f"{i}#{n}"
        seen.add(i)
        want.append(i)
    assert ids == want and len(set(ids)) == len(ids)
    assert reader.stats.duplicate_ids == sum(a != r["id"] for a, r in zip(ids, rows, strict=True))
    assert not list((tmp_path / "work").glob("*")) if scratch else True
