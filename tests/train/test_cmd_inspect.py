import pytest

from grip_loop.manifest import load_manifest
from train import cli


@pytest.mark.slow
def test_inspect_prints_table_and_writes_png(stdlib_prepared, capsys, tmp_path):
    assert cli.main(["inspect", str(stdlib_prepared), "--png", str(tmp_path / "p.png")]) == 0
    out = capsys.readouterr().out
    rows = [line for line in out.splitlines() if line[:4].strip().isdigit()]
    assert len(rows) == 8
    m = load_manifest(stdlib_prepared)
    # the 120 readable files of the fixture: training, held-out and the probe's evaluation documents
    assert m.n_docs + m.stats["heldout_docs"] + m.stats["probe_eval_docs"] == 120
    assert f"total {m.n_docs} documents" in out
    png = (tmp_path / "p.png").read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n" and len(png) > 10_000


def test_inspect_on_unprepared_dir_names_the_fix(tmp_path, capsys):
    assert cli.main(["inspect", str(tmp_path)]) == 2  # one line, no traceback
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "grip prepare" in err and err.startswith("grip inspect: error:")
