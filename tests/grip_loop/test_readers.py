"""Parquet and HF-datasets (Arrow) corpora: grip_loop.readers through CorpusReader."""

import json
import sys

import pytest

from grip_loop.corpus import CorpusReader


def _rows(n, start=0):
    return {
        "content": [f"def f{i}():\n    return {i}\n" for i in range(start, start + n)],
        "repo": [f"org/repo{i % 3}" for i in range(start, start + n)],
        "lang": ["python"] * n,
        "stars": list(range(start, start + n)),
    }


def test_parquet_streams_row_groups_with_text_column_and_fields(tmp_path):
    pa = pytest.importorskip("pyarrow")
    import pyarrow.parquet as pq

    rows = _rows(7)
    rows["content"][2] = None  # null text: skipped and counted
    rows["content"][3] = "   "  # blank text: skipped and counted
    rows["id"] = [None, "b", None, None, "5", "f", "b"]
    pq.write_table(pa.table(rows), tmp_path / "a.parquet", row_group_size=3)  # 3 row groups
    reader = CorpusReader(tmp_path, text_column="content")
    docs = list(reader)
    assert [d.id for d in docs] == ["a.parquet:1", "b", "5", "f", "b#2"]
    assert [d.text for d in docs] == [rows["content"][i] for i in (0, 1, 4, 5, 6)]
    assert all(d.lang == "python" for d in docs)
    assert docs[1].fields == {"repo": "org/repo1", "lang": "python", "id": "b"}
    assert docs[0].field_value("repo") == "org/repo0" and "content" not in docs[0].fields
    assert dict(reader.stats.skipped) == {"empty": 2} and reader.stats.duplicate_ids == 1


def test_hf_datasets_saved_to_disk_are_read_in_file_order(tmp_path):
    pa = pytest.importorskip("pyarrow")
    import pyarrow.ipc  # noqa: F401  (pa.ipc)

    ds = tmp_path / "ds"
    ds.mkdir()
    # the layout of datasets.Dataset.save_to_disk: IPC stream files plus two JSON records
    for j, (start, n) in enumerate([(0, 4), (4, 3)]):
        table = pa.table({"text": _rows(n, start)["content"], "repo": _rows(n, start)["repo"]})
        with pa.ipc.new_stream(ds / f"data-{j:05d}-of-00002.arrow", table.schema) as w:
            for batch in table.to_batches(max_chunksize=2):
                w.write_batch(batch)
    (ds / "state.json").write_text(json.dumps({"_data_files": [{"filename": "data-00000-of-00002.arrow"}]}))
    (ds / "dataset_info.json").write_text("{}")
    reader = CorpusReader(ds)
    docs = list(reader)
    assert [d.text for d in docs] == _rows(7)["content"]
    assert docs[5].id == "data-00001-of-00002.arrow:2" and docs[5].field_value("repo") == "org/repo2"
    # an Arrow IPC *file* (not stream) reads the same
    table = pa.table({"text": _rows(2)["content"]})
    with pa.ipc.new_file(tmp_path / "f.arrow", table.schema) as w:
        w.write_table(table)
    assert [d.text for d in CorpusReader(tmp_path / "f.arrow")] == _rows(2)["content"]


def test_bad_tables_name_the_file_and_the_fix(tmp_path):
    pa = pytest.importorskip("pyarrow")
    import pyarrow.parquet as pq

    pq.write_table(pa.table(_rows(2)), tmp_path / "a.parquet")
    with pytest.raises(
        ValueError, match=r"a\.parquet: no column 'text'.*content, repo, lang, stars.*text_column"
    ):
        list(CorpusReader(tmp_path))
    pq.write_table(pa.table({"text": [1, 2]}), tmp_path / "n.parquet")
    with pytest.raises(ValueError, match=r"n\.parquet: column 'text' \(text_column\) holds int64"):
        list(CorpusReader(tmp_path / "n.parquet"))
    (tmp_path / "empty.parquet").write_bytes(b"")
    with pytest.raises(ValueError, match=r"empty\.parquet: empty file \(0 bytes\)"):
        list(CorpusReader(tmp_path / "empty.parquet"))
    (tmp_path / "junk.arrow").write_bytes(b"not arrow at all" * 10)
    with pytest.raises(ValueError, match=r"junk\.arrow: not a readable Arrow file"):
        list(CorpusReader(tmp_path / "junk.arrow"))


def test_without_pyarrow_the_error_says_what_to_install(tmp_path, monkeypatch):
    (tmp_path / "a.parquet").write_bytes(b"PAR1")
    monkeypatch.setitem(sys.modules, "pyarrow", None)  # import pyarrow raises ImportError
    with pytest.raises(ValueError, match=r"a\.parquet.*needs pyarrow.*grip-loop\[parquet\]"):
        list(CorpusReader(tmp_path))
