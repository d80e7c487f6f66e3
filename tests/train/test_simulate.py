"""`grip simulate` and `grip ledger` on a small prepared corpus: a synthetic probe, a sweep, a
replay from a history file, and bad input (another corpus, a truncated line, a parameter out of
range: exit 2 with one line naming the file or field)."""

from __future__ import annotations

import json

import numpy as np
import pytest

from grip_loop.manifest import load_manifest, prepared_fingerprint
from grip_loop.modes import BudgetConfig
from grip_loop.simulate import SimConfig, SyntheticProbe, simulate
from tests.prepared import make_prepared
from train.cli import main

SIZES = [40, 10, 30, 0, 25]


@pytest.fixture(scope="module")
def prepared(tmp_path_factory):
    root = tmp_path_factory.mktemp("sim")
    make_prepared(root, SIZES, max_len=20, n_probe=3)
    return root


def test_synthetic_probe_shifts_budget_to_the_slow_learner_and_the_guard_caps_it(prepared):
    m = load_manifest(prepared)
    # cluster 1 (10 documents) keeps a large Delta L (rate 0): Eq. 7 gives it little replay;
    # the others saturate fast. Then the small cluster 1 is the one replay would read most.
    probe = SyntheticProbe(amplitude=np.array([0.1, 0.0, 0.1, 0.1, 0.1]), rate=np.array([5.0, 0, 5, 5, 5]))
    tokens = float(sum(c.n_docs * (c.mean_length + 1) for c in m.clusters))
    base = dict(steps=400, tokens_per_step=tokens / 100, every=50, first_after=50)  # 4 corpus passes
    off = simulate(m, SimConfig(budget=BudgetConfig(max_repetition=None), **base), probe)
    on = simulate(m, SimConfig(budget=BudgetConfig(max_repetition=5.0), **base), probe)
    assert off.steps == on.steps == [0, 50, 100, 150, 200, 250, 300, 350, 400]
    for res in (off, on):
        assert all(n.sum() == res.b_total and n[3] == 0 for n in res.n)
    assert max(off.ledger["rep_mean"]) > 5.0  # unguarded, some stream is read more than 5 times
    assert max(on.ledger["rep_mean"]) <= 5.0 + 0.05  # guarded (expected reads; + the rounding of draws)
    assert any(c.any() for c in on.capped) and not any(c.any() for c in off.capped)
    # the summary of a run is what a sweep prints
    s = on.summary()
    assert s["refreshes"] == 8 and s["rep_mean_max"] == max(on.ledger["rep_mean"])


def test_simulate_cli_synthetic_sweep_and_files(prepared, tmp_path, capsys):
    spec = tmp_path / "probe.yaml"
    spec.write_text("default: {amplitude: 0.05, rate: 1.0}\nclusters:\n  1: {amplitude: 0.2, rate: 0.1}\n")
    out = tmp_path / "sim"
    argv = [
        "simulate",
        "--data",
        str(prepared),
        "--synthetic",
        str(spec),
        "--steps",
        "200",
        "--tokens-per-step",
        "5",
        "--out",
        str(out),
    ]
    assert main(argv) == 0
    doc = json.loads((out / "simulation.json").read_text())
    assert [r["step"] for r in doc["refreshes"]] == [0, 100, 150, 200]
    assert (out / "budget_trajectories.png").stat().st_size > 1000
    capsys.readouterr()
    assert main([*argv, "--sweep", "alpha=0,1,2"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[0].startswith("sweep over alpha") and lines[1].split()[0] == "alpha" and len(lines) == 5
    rows = json.loads((out / "sweep.json").read_text())["rows"]
    assert rows[0]["drift_mean"] == 0.0 and rows[2]["drift_mean"] > 0  # alpha = 0: nothing moves
    # a cap no split can hold: the guard is off for that run, and a warning names the field
    capsys.readouterr()
    assert main([*argv, "--tokens-per-step", "1000", "--set", "budget.max_repetition=1"]) == 0
    err = capsys.readouterr().err
    assert "warning: budget.max_repetition:" in err and "guard is off for this run" in err


def history_line(step, version, n, **kw):
    return json.dumps({"step": step, "version": version, "n": n, "r": [1.0] * len(n), "drift": 0.0, **kw})


@pytest.mark.parametrize(
    "case, needle",
    [
        ("fingerprint", "from another corpus"),
        ("k", "has K=5"),
        ("truncated", "line 2 is not a complete JSON record"),
        ("alpha", "alpha"),
        ("max_repetition", "max_repetition"),
        ("sweep", "--sweep"),
    ],
)
def test_simulate_bad_input_exits_2_naming_it(prepared, tmp_path, capsys, case, needle):
    m = load_manifest(prepared)
    fp = prepared_fingerprint(m)
    run = tmp_path / "run"
    run.mkdir()
    n = [40, 10, 30, 0, 25]
    rule = {"mode": "grip", "corpus_fingerprint": "0" * 64 if case == "fingerprint" else fp}
    lines = [history_line(0, 1, n if case != "k" else n[:4], rule=rule)]
    if case == "truncated":
        lines += ['{"step": 50, "version": 2, "n": [4', history_line(100, 3, n)]
    (run / "grip_history.jsonl").write_text("\n".join(lines) + "\n")
    argv = ["simulate", "--data", str(prepared), "--out", str(tmp_path / "o")]
    if case in ("fingerprint", "k", "truncated"):
        argv += ["--history", str(run)]
    else:
        argv += ["--synthetic", "random:1"]
    if case == "alpha":
        argv += ["--set", "budget.alpha=-1"]
    if case == "max_repetition":
        argv += ["--set", "budget.max_repetition=0"]
    if case == "sweep":
        argv += ["--sweep", "nosuch=1,2"]
    assert main(argv) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("grip simulate: error:") and needle in err[0], err
    if case in ("fingerprint", "truncated"):
        assert "grip_history.jsonl" in err[0]


def test_ledger_cli_reads_a_run_folder_and_a_partial_last_line(tmp_path, capsys):
    run = tmp_path / "run" / "csv"
    run.mkdir(parents=True)
    rec = {
        "docs": [3, 2],
        "distinct": [2, 2],
        "tokens": [30, 20],
        "rep_max": [2, 1],
        "rep_mean": [1.0, 1.0],
        "planned_share": [0.6, 0.4],
        "consumed_share": [0.6, 0.4],
        "n": [3, 2],
        "r": [1.5, 1.2],
        "delta": [0.1, None],
        "gate": [True, False],
        "capped": [True, False],
        "projected": [4.0, 1.0],
        "shrink": 0.8,
    }
    (run / "grip_history.jsonl").write_text(
        history_line(0, 1, [3, 2], ledger=rec) + "\n" + '{"step": 5, "vers'  # a run writing right now
    )
    (run / "grip_ledger.json").write_text(
        json.dumps({"step": 5, "event": "refresh", "names": ["a", "b"], "max_repetition": 4.0, "ledger": rec})
    )
    assert main(["ledger", str(tmp_path / "run")]) == 0
    out = capsys.readouterr().out
    assert "GRIP ledger at step 5 (refresh), max_repetition 4, probe shrink 0.80" in out
    assert " yes " in out and "shut" in out
    assert main(["ledger", str(tmp_path / "run"), "--all"]) == 0
    assert "GRIP ledger at step 0" in capsys.readouterr().out
    assert main(["ledger", str(tmp_path / "nothing")]) == 2
    assert "no such run folder" in capsys.readouterr().err
