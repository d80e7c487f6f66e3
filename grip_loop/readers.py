"""Columnar corpus inputs: Parquet files and Hugging Face `datasets` saved to disk (Arrow).

`CorpusReader` (grip_loop.corpus) hands every `.parquet` and `.arrow` file it meets to
`read_table`, in its usual sorted walk, so these mix with directories, JSONL and WebDataset
tars:

* **Parquet** (`*.parquet`): streamed in record batches of `BATCH_ROWS` rows, row group by
  row group (`pyarrow.parquet.ParquetFile.iter_batches`), reading only the string, integer
  and text columns; memory is one batch, whatever the file's size.
* **Arrow** (`*.arrow`): the files `datasets.Dataset.save_to_disk` writes
  (`data-00000-of-0000N.arrow`, IPC stream format; the IPC file format is read too), read batch
  by batch. Point `--corpus` at the saved folder (its `state.json` and `dataset_info.json` are
  ignored), or at one split's folder of a `DatasetDict` (pointing at the dict reads every split).
  The `datasets` package itself is not needed.

A row is one document: its text is the column `text_column` (default `text`; set it in the
prepare config for, e.g., The Stack's `content`); `id`, `lang` and `path` columns are used as
in JSONL when present (an integer id becomes its decimal string; a row without one gets
`FILE:ROW`, 1-based), and every other string column becomes a document field
(`grip prepare --cluster-by repo_name`). Rows whose text is null, empty, too large or binary
are skipped and counted as in JSONL.

Bad input stops the run with an error naming the file and the fix: pyarrow missing
(`pip install 'grip-loop[parquet]'`), a file that is empty or not Parquet / Arrow, a missing
text column (the message lists the columns), a text column that does not hold strings.
"""

from __future__ import annotations

from collections.abc import Iterator

#: File name endings handed to `read_table`.
TABLE_SUFFIXES = (".parquet", ".arrow")
#: Rows per record batch (the memory bound of a table read, with the longest texts).
BATCH_ROWS = 1024

_INSTALL = "pip install 'grip-loop[parquet]' (or: pip install pyarrow)"


def _pyarrow(shown: str):
    try:
        import pyarrow as pa
        import pyarrow.ipc  # noqa: F401
        import pyarrow.parquet  # noqa: F401
    except ImportError:
        raise ValueError(
            f"corpus: {shown} is a Parquet / Arrow file and reading it needs pyarrow, which is not "
            f"installed; {_INSTALL}"
        ) from None
    return pa


def _batches(pa, fh, name: str, shown: str, text_column: str):
    """(schema, iterator of record batches) of one file, or ValueError naming the file."""
    fix = "remove it from the corpus or write it again"
    if fh.seek(0, 2) == 0:
        raise ValueError(f"corpus: {shown}: empty file (0 bytes), not a {name} table; {fix}")
    fh.seek(0)
    try:
        if name == "Parquet":
            pf = pa.parquet.ParquetFile(fh)
            schema = pf.schema_arrow
            wanted = [f.name for f in schema if _wanted(pa, f, text_column)]
            return schema, pf.iter_batches(batch_size=BATCH_ROWS, columns=wanted)
        try:
            reader = pa.ipc.open_stream(fh)  # what datasets' save_to_disk writes
        except pa.ArrowInvalid:
            fh.seek(0)
            f = pa.ipc.open_file(fh)
            return f.schema, (f.get_batch(i) for i in range(f.num_record_batches))
        return reader.schema, iter(reader)
    except (pa.ArrowException, OSError) as exc:
        raise ValueError(f"corpus: {shown}: not a readable {name} file ({exc}); {fix}") from None


def _wanted(pa, f, text_column: str) -> bool:
    t = f.type
    return (
        f.name == text_column
        or pa.types.is_string(t)
        or pa.types.is_large_string(t)
        or pa.types.is_integer(t)
    )


def read_table(reader, fh, rel: str, size: int) -> Iterator:
    """The documents of one Parquet / Arrow file (`reader`: the CorpusReader, for its checks
    and counters; `fh`: the open file; `rel`: its name under the corpus root)."""
    shown = reader._shown(rel)
    pa = _pyarrow(shown)
    name = "Parquet" if rel.lower().endswith(".parquet") else "Arrow"
    column = reader.text_column
    schema, batches = _batches(pa, fh, name, shown, column)
    if column not in schema.names:
        raise ValueError(
            f"corpus: {shown}: no column {column!r} to read the text from (text_column); its columns: "
            f"{', '.join(schema.names) or 'none'}. Set `text_column: NAME` in the prepare config"
        )
    ftype = schema.field(column).type
    if not (pa.types.is_string(ftype) or pa.types.is_large_string(ftype)):
        raise ValueError(
            f"corpus: {shown}: column {column!r} (text_column) holds {ftype}, not strings; set "
            "`text_column` to the column with the document text"
        )
    row = 0
    try:
        for batch in batches:
            cols = {n: batch.column(i).to_pylist() for i, n in enumerate(batch.schema.names)}
            texts = cols.pop(column)
            for j, text in enumerate(texts):
                row += 1
                rec = {n: v[j] for n, v in cols.items() if v[j] is not None}
                doc = reader._document(text, rec, "id", f"{rel}:{row}", from_bytes=False)
                if doc is not None:
                    yield doc
    except (pa.ArrowException, OSError) as exc:
        raise ValueError(
            f"corpus: {shown}: unreadable after row {row} ({exc}); remove it from the corpus or write it again"
        ) from None
