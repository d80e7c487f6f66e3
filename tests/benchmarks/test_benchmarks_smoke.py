"""Each benchmark script runs in --quick mode and prints a parseable JSON line with its keys.

The peer comparison (mosaicml-streaming, litdata) needs `.venv-bench` and is never run here:
the throughput smoke test asks only for GRIP and raw webdataset, which the main env has.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]


def run(script: str, *extra: str, tmp_path: Path, name: str | None = None) -> dict:
    out = tmp_path / f"{script}.json"
    proc = subprocess.run(
        [
            sys.executable,
            str(ROOT / "benchmarks" / f"{script}.py"),
            "--quick",
            "--json-out",
            str(out),
            *extra,
        ],
        capture_output=True,
        text=True,
        timeout=120,
        cwd=ROOT,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith('{"benchmark"')]
    assert len(lines) == 1, proc.stdout[-2000:]
    result = json.loads(lines[0])
    assert json.loads(out.read_text()) == result
    assert result["benchmark"] == (name or script) and result["quick"] is True
    assert result["rows"], "no rows"
    assert "| " in proc.stdout  # the markdown table
    return result


def test_sampler_throughput_quick(tmp_path):
    r = run("sampler_throughput", "--tools", "grip", "webdataset", tmp_path=tmp_path)
    tools = {row["tool"] for row in r["rows"]}
    assert tools == {"grip", "webdataset"}
    for row in r["rows"]:
        assert row["tokens_per_s"] > 0 and row["docs_per_s"] > 0
    assert r["targets"]["grip_over_webdataset_best"] > 0


def test_sampler_throughput_variants_quick(tmp_path):
    r = run("sampler_throughput", "--tools", "grip-default-collate", "grip-ids-only", tmp_path=tmp_path)
    assert {row["tool"] for row in r["rows"]} == {"grip-default-collate", "grip-ids-only"}
    assert all(row["tokens_per_s"] > 0 for row in r["rows"])


def test_sampler_throughput_skips_missing_peer(tmp_path):
    r = run("sampler_throughput", "--tools", "grip", "no-such-tool", tmp_path=tmp_path)
    assert "no-such-tool" in r["skipped"] and {row["tool"] for row in r["rows"]} == {"grip"}


@pytest.mark.slow
def test_update_latency_quick(tmp_path):
    r = run("update_latency", tmp_path=tmp_path)
    by_w = {row["workers"]: row for row in r["rows"]}
    # without workers the very next batch is drawn under the new budgets
    assert by_w[0]["stale_batches_per_worker_max"] == 0
    # with a worker, only batches already queued at the publication are stale
    assert by_w[1]["started_after_publish_stale_max"] <= 0


@pytest.mark.slow
def test_rap_cost_quick(tmp_path):
    r = run("rap_cost", tmp_path=tmp_path)
    row = r["rows"][0]
    assert row["flops_fraction"] > 0 and row["wall_fraction"] > 0
    assert r["cadence"]["train_tokens_between_refreshes"] == 50 * 8 * 256
    # the default cadence: at least 50 steps, and the probe within 0.5% of its training FLOPs
    assert row["default_interval"] >= 50
    assert 0 < row["flops_fraction_default"] <= 0.005 * (1 + 1e-9)
    assert r["target"]["default_cadence_all_rows_flops_fraction_le_0.005"] is True


@pytest.mark.slow
def test_prepare_scaling_quick(tmp_path):
    r = run("prepare_scaling", "--stages", "kmeans", "density+order", "write", tmp_path=tmp_path)
    stages = {row["stage"] for row in r["rows"]}
    assert stages == {"kmeans", "density+order", "write"}
    assert all(row["docs_per_s"] > 0 for row in r["rows"])


@pytest.mark.slow
def test_prepare_end_to_end_quick_reports_memory_per_stage(tmp_path):
    r = run("prepare_scaling", "--end-to-end", "1000", tmp_path=tmp_path, name="prepare_end_to_end")
    (row,) = r["rows"]
    assert row["N"] == 1000 and row["wall_s"] > 0
    stages = ("ingest", "tokenize", "embed", "cluster", "geometry", "judge", "write")
    # every stage has its seconds and the largest private memory sampled while it ran
    assert all(row[f"{s}_s"] >= 0 and 0 < row[f"{s}_anon_mb"] <= row["peak_anon_mb"] for s in stages)


@pytest.mark.slow
def test_sampler_memory_quick(tmp_path):
    r = run("sampler_memory", tmp_path=tmp_path)
    for row in r["rows"]:
        assert row["index_bytes_per_doc"] == 16  # offset + size, int64


@pytest.mark.slow
def test_clustering_quick(tmp_path):
    r = run("clustering", tmp_path=tmp_path)
    methods = {row["method"] for row in r["rows"]}
    assert methods == {"kmeans", "gem(balance=0)", "gem(balance=1)"}
    for row in r["rows"]:
        assert 0 <= row["size_entropy"] <= 1 and -1 <= row["ari"] <= 1 and row["fit_s"] > 0
        assert row["method"] == "kmeans" or 0 <= row["agreement"] <= 1
    assert sum(r["synthetic"]["group_sizes"]) == r["synthetic"]["n"]


def test_seen_ids_quick(tmp_path):
    r = run("seen_ids", tmp_path=tmp_path)
    assert {row["way"] for row in r["rows"]} == {"set", "SeenIds", "SeenIds-spilled"}
    assert all(row["us_per_id"] > 0 for row in r["rows"])
