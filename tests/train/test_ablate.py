"""`grip ablate` end to end (2 rows x 4 steps on the stdlib corpus) and its result helpers."""

import csv
import json

import numpy as np
import pytest
import yaml

from train.ablate import (
    ROOT,
    AblateConfig,
    aggregate,
    drift_summary,
    results_markdown,
    row_config,
    run,
    static_shares,
)
from train.eval import EvalConfig


def test_row_config_redirects_every_output(tmp_path):
    base = yaml.safe_load((ROOT / "configs/ablation/6-grip.yaml").read_text())
    rc = row_config(
        base, tmp_path / "r", 3, ["trainer.max_steps=7", "trainer.callbacks.1.init_args.every=1"], "r"
    )
    tr = rc["trainer"]
    assert tr["default_root_dir"] == str(tmp_path / "r") and tr["max_steps"] == 7
    assert all(lg["init_args"]["save_dir"] == str(tmp_path / "r") for lg in tr["logger"])
    assert tr["callbacks"][0]["init_args"]["dirpath"] == str(tmp_path / "r" / "checkpoints")
    assert rc["seed_everything"] == rc["model"]["seed"] == rc["data"]["dataset"]["init_args"]["seed"] == 3
    assert base["trainer"]["max_steps"] == 300  # the row itself is untouched
    with pytest.raises(ValueError, match="KEY=VALUE"):
        AblateConfig(overrides=["nonsense"])


def test_drift_summary_and_aggregate(tmp_path):
    h = tmp_path / "h.jsonl"
    h.write_text(
        "\n".join(
            json.dumps(e)
            for e in [{"drift": 0.0}, {"drift": 0.1, "delta": [1]}, {"drift": 0.3, "delta": [1]}]
        )
    )
    d = drift_summary(h)
    assert d["refreshes"] == 2 and d["probes"] == 2
    assert np.isclose(d["drift_mean"], 0.2) and np.isclose(d["drift_max"], 0.3)
    rs = [
        {"row": "a", "mode": "grip", "seed": s, "heldout_overall": v}
        for s, v in ((0, 1.0), (1, 2.0), (2, 4.0))
    ]
    a = aggregate(rs)[0]
    assert a["n_seeds"] == 3 and np.isclose(a["heldout_overall"], 7 / 3) and a["heldout_overall_pm"] == 1.5
    assert "2.3333 ± 1.5000" in results_markdown(rs)


@pytest.mark.slow
def test_ablate_two_rows_end_to_end(stdlib_prepared, tmp_path):
    out = tmp_path / "abl"
    sets = [
        f"data.dataset.init_args.root={stdlib_prepared}",
        "data.dataset.init_args.seq_len=64",
        "data.batch_size=4",
        "model.vocab_size=1024",
        "trainer.max_steps=4",
        "trainer.log_every_n_steps=2",
        "trainer.callbacks.1.init_args.refresh_every_n_steps=2",
        "trainer.callbacks.1.init_args.probe_seq_len=32",
        "trainer.callbacks.1.init_args.probe_docs=2",
        "trainer.callbacks.1.init_args.first_refresh_after_steps=0",
        "trainer.callbacks.1.init_args.rap.epochs=1",
        "trainer.callbacks.1.init_args.rap.min_docs=1",
    ]
    cfg = AblateConfig(
        rows=str(ROOT / "configs/ablation"),
        out=str(out),
        only=["1-random", "4-loss-replay"],
        overrides=sets,
        eval=EvalConfig(seq_len=64, humaneval=False, progress=False),
    )
    results = run(cfg)
    assert [r["row"] for r in results] == ["1-random", "4-loss-replay"]
    for row in ("1-random", "4-loss-replay"):
        assert (out / row / "seed-0" / "checkpoints" / "last.ckpt").is_file()
        assert (out / row / "seed-0" / "csv" / "grip_history.jsonl").is_file()
        assert list((out / row / "seed-0" / "wandb").glob("offline-run-*"))
    rows = list(csv.DictReader(open(out / "results.csv")))
    assert [r["mode"] for r in rows] == ["random", "loss-replay"]
    for r, res in zip(rows, results, strict=True):
        ev = json.loads((out / res["row"] / "seed-0" / "eval" / "eval.json").read_text())
        assert np.isclose(float(r["heldout_overall"]), ev["heldout_overall"]["loss"])
        assert int(r["tokens"]) == 4 * 4 * 64 and float(r["wall_s"]) > 0
    assert int(rows[0]["refreshes"]) == 0  # random never probes
    assert int(rows[1]["refreshes"]) == 3 and int(rows[1]["probes"]) == 3  # at start, steps 2 and 4
    # how far from row 2's static budget, and the probe's reliability per refresh
    hist = [
        json.loads(x)
        for x in (out / "4-loss-replay" / "seed-0" / "csv" / "grip_history.jsonl").read_text().splitlines()
    ]
    static = static_shares(yaml.safe_load((out / "4-loss-replay" / "seed-0" / "config.yaml").read_text()))
    moved = [0.5 * np.abs(np.asarray(h["n"]) / sum(h["n"]) - static).sum() for h in hist]
    assert float(rows[1]["moved_final"]) == pytest.approx(moved[-1])
    assert float(rows[1]["moved_mean"]) == pytest.approx(np.mean(moved))
    assert float(rows[0]["moved_mean"]) > 0  # uniform over documents is not Eq. 5's budget
    assert rows[1]["reliabilities"].split() == [
        f"{h['reliability']:.2f}" for h in hist if h.get("reliability") is not None
    ]
    assert rows[0]["reliabilities"] == ""
    md = (out / "results.md").read_text()
    assert "| 4-loss-replay | loss-replay |" in md and (out / "results.png").stat().st_size > 1000
    # re-running resumes: nothing is retrained (train_done.json and eval.json are reused)
    stamp = (out / "1-random" / "seed-0" / "eval" / "eval.json").stat().st_mtime
    assert run(cfg) == results
    assert (out / "1-random" / "seed-0" / "eval" / "eval.json").stat().st_mtime == stamp


def test_set_values_in_exponent_notation_are_floats(tmp_path):
    """PyYAML reads "3e-4" as a string; `--set model.lr=3e-4` / `grip probe --set rap.lr=3e-4` mean 0.0003."""
    from train.cmd_probe import parse_sets
    from train.overrides import parse_value

    assert parse_value("3e-4") == 3e-4 and parse_value("-2E+3") == -2000.0 and parse_value("1.5e2") == 150.0
    assert parse_value("auto") == "auto" and parse_value("null") is None and parse_value("10") == 10
    assert parse_value("1e5x") == "1e5x" and parse_value("[1, 2]") == [1, 2]
    sets = parse_sets(["rap.lr=3e-4", "rap.micro_batch=null", "budget.alpha=1"])
    assert sets == {"rap": {"lr": 3e-4, "micro_batch": None}, "budget": {"alpha": 1}}
    base = yaml.safe_load((ROOT / "configs/ablation/6-grip.yaml").read_text())
    rc = row_config(base, tmp_path / "r", 0, ["model.lr=3e-4"], "r")
    assert rc["model"]["lr"] == 3e-4 and isinstance(rc["model"]["lr"], float)


def _finished(folder, rc):
    folder.mkdir(parents=True)
    (folder / "config.yaml").write_text(yaml.safe_dump(rc, sort_keys=False))
    (folder / "train_done.json").write_text('{"wall_s": 1.0}')


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_a_finished_run_is_reused_only_for_its_own_seed_and_settings(tmp_path, seed):
    """The bug this guards: a single-seed ablation wrote DIR/<row>; `--seeds 1` later mapped to the
    same folder, skipped it as finished and reported seed 0's losses as seed 1's."""
    from train.ablate import run_folder

    base = yaml.safe_load((ROOT / "configs/ablation/6-grip.yaml").read_text())
    out = tmp_path / "abl"
    # nothing yet: OUT/<row>/seed-S, with the seed applied
    folder, rc = run_folder(out, "6-grip", seed, base, [])
    assert folder == out / "6-grip" / f"seed-{seed}" and rc["seed_everything"] == seed
    # a legacy single-seed folder of another seed is ignored; of this seed (same settings) reused
    other = (seed + 1) % 3
    _finished(out / "6-grip", row_config(base, out / "6-grip", other, [], "6-grip"))
    assert run_folder(out, "6-grip", seed, base, [])[0] == folder
    assert run_folder(out, "6-grip", other, base, [])[0] == out / "6-grip"
    # ... but not with other overrides
    assert run_folder(out, "6-grip", other, base, ["model.lr=1e-3"])[0] == out / "6-grip" / f"seed-{other}"
    # a finished seed folder is reused with the same settings, refused with others
    _finished(folder, rc)
    assert run_folder(out, "6-grip", seed, base, []) == (folder, rc)
    with pytest.raises(ValueError, match=rf"seed-{seed}: a finished run made with other settings.*model"):
        run_folder(out, "6-grip", seed, base, ["model.lr=1e-3"])
    # a damaged record is not trusted either
    (folder / "config.yaml").write_text(": not yaml :\n  - [")
    with pytest.raises(ValueError, match="other settings"):
        run_folder(out, "6-grip", seed, base, [])
