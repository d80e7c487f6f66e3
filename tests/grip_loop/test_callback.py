"""GripCallback: a short CPU training run closes the loop, logs drift files, survives RAP
failures, and resumes its schedule from a checkpoint."""

from __future__ import annotations

import json
import logging
import math

import lightning as L
import numpy as np
import pytest
import torch

from grip_loop.callback import GripCallback
from grip_loop.dataset import GripIterableDataset
from grip_loop.modes import BudgetConfig
from grip_loop.rap import RAPConfig, estimate_train_flops
from tests.prepared import make_prepared
from train.data import GripDataModule
from train.module import MoELM

SIZES = [30, 30, 20, 0, 25]
TINY = dict(
    hidden_size=32,
    num_layers=2,
    num_heads=4,
    num_kv_heads=2,
    head_dim=8,
    num_experts=4,
    top_k=2,
    expert_size=32,
)


@pytest.fixture(scope="module")
def prepared(tmp_path_factory):
    root = tmp_path_factory.mktemp("prepared")
    make_prepared(root, SIZES, orders=("grip", "diversity", "random"), easy={0}, max_len=60, n_probe=16)
    return root


class StopAt(L.Callback):
    """Ends a run at a given step without changing max_steps (so the LR schedule is the same)."""

    def __init__(self, step):
        self.step = step

    def on_train_batch_end(self, trainer, *args):
        if trainer.global_step >= self.step:
            trainer.should_stop = True


def run(root, out, *, steps=12, callback=None, ckpt=None, seed=0, every_ckpt=None, stop_at=None):
    L.seed_everything(seed)
    ds = GripIterableDataset(root, seq_len=32, seed=seed)
    dm = GripDataModule(ds, batch_size=4, num_workers=0)
    model = MoELM(model="tiny", vocab_size=2048, model_overrides=TINY, lr=3e-3, warmup_steps=2)
    cbs = [callback] if callback is not None else []
    if stop_at is not None:
        cbs.append(StopAt(stop_at))
    if every_ckpt:
        cbs.append(
            L.pytorch.callbacks.ModelCheckpoint(
                dirpath=out / "ckpt", every_n_train_steps=every_ckpt, save_top_k=-1
            )
        )
    trainer = L.Trainer(
        accelerator="cpu",
        max_steps=steps,
        logger=L.pytorch.loggers.CSVLogger(out, name="csv", version=""),
        callbacks=cbs,
        enable_progress_bar=False,
        enable_model_summary=False,
        default_root_dir=out,
        log_every_n_steps=1,
    )
    trainer.fit(model, datamodule=dm, ckpt_path=ckpt)
    return trainer, model, ds


def cb(**kw):
    kw.setdefault("refresh_every_n_steps", 4)
    kw.setdefault("max_probe_overhead", None)  # a fixed cadence: these tests count refreshes
    kw.setdefault("first_refresh_after_steps", 0)  # and a probe at the start
    kw.setdefault("probe_seq_len", 32)
    kw.setdefault("probe_docs", 4)
    kw.setdefault("rap", RAPConfig(epochs=2, micro_batch=2, min_docs=2))
    return GripCallback(**kw)


def test_training_run_refreshes_publishes_and_logs_drift(prepared, tmp_path):
    c = cb(budget=BudgetConfig(b_total=80))
    trainer, _, ds = run(prepared, tmp_path, callback=c)
    # initial budgets, the probe at start, and refreshes at steps 4, 8, 12
    assert [h["step"] for h in c.history] == [0, 0, 4, 8, 12]
    versions = [h["version"] for h in c.history]
    assert versions == sorted(versions) and ds.version == versions[-1]
    for h in c.history:
        n = np.asarray(h["n"])
        assert n.sum() == 80 and n[3] == 0 and np.all(n >= 0)
        assert np.all(np.asarray(h["r"]) >= 1) and np.all(np.asarray(h["r"]) <= 3)
    probed = [h for h in c.history if "delta" in h]
    assert len(probed) == 4 and all(np.isfinite(h["delta"][k]) for h in probed for k in (0, 1, 2, 4))
    assert np.isnan(probed[0]["delta"][3])
    # every published version reached the batches by the next step (no workers)
    for h in c.history[1:-1]:
        assert c.effective_steps[h["version"]] <= h["step"] + 1
    # drift files
    lines = (tmp_path / "csv" / "grip_history.jsonl").read_text().splitlines()
    assert [json.loads(x)["version"] for x in lines] == versions
    assert (tmp_path / "csv" / "grip_budget_share.png").stat().st_size > 1000
    header = (tmp_path / "csv" / "metrics.csv").read_text().splitlines()[0].split(",")
    for col in (
        "grip/n/000",
        "grip/r/004",
        "grip/delta/001",
        "grip/drift",
        "grip/rap_seconds",
        "grip/rap_cost_fraction",
    ):
        assert col in header, col
    # tokens consumed per cluster follow the plan
    share = c.consumed / c.consumed.sum()
    planned = c.planned / c.planned.sum()
    assert np.abs(share - planned).max() < 0.15
    # `grip simulate` replays this run's recorded probes into exactly its recorded budgets, through
    # the training functions (the repetition guard is on: 12 steps x 128 tokens, max_repetition 4)
    from grip_loop.history import read_history, rule_of
    from grip_loop.simulate import RecordedProbe, replay_config, replay_matches, simulate

    hist_path = tmp_path / "csv" / "grip_history.jsonl"
    hist = read_history(hist_path)
    rule = rule_of(hist[0], hist_path)
    assert rule["max_repetition"] == 4.0 and rule["run_tokens"] == 12 * 4 * 32
    sim = simulate(ds.manifest, replay_config(hist, rule, {}), RecordedProbe(hist), exact_probe_index=True)
    assert replay_matches(hist, sim) == [] and len(sim.n) == len(hist) == 5
    # the ledger in the history and the files: tokens add up to what was trained on
    led = c.history[-1]["ledger"]
    assert sum(led["tokens"]) == c.consumed.sum() == 12 * 4 * 32 and led["docs"] == SIZES
    assert all(led["distinct"][k] <= SIZES[k] for k in range(5)) and led["distinct"][3] == 0
    end = json.loads((tmp_path / "csv" / "grip_ledger.json").read_text())
    assert end["event"] == "end" and sum(end["ledger"]["tokens"]) == 12 * 4 * 32


def test_easy_cluster_gets_less_replay_than_random_ones(prepared, tmp_path):
    c = cb(rap=RAPConfig(min_docs=4), probe_docs=8)
    run(prepared, tmp_path, callback=c, steps=24)
    last = c.history[-1]
    # cluster 0 repeats one pattern (easy, large relative drop), clusters 1, 2, 4 are random
    assert last["delta"][0] > max(last["delta"][k] for k in (1, 2, 4))
    assert last["r"][0] < min(last["r"][k] for k in (1, 2, 4))


@pytest.mark.parametrize("failure", ["raise", "nan"])
def test_failing_probe_keeps_previous_budgets(prepared, tmp_path, monkeypatch, caplog, failure):
    import grip_loop.callback as cbmod

    real = cbmod.rapid_adaptation_probe
    calls = {"n": 0}

    def flaky(*a, **kw):
        calls["n"] += 1
        if calls["n"] == 1:
            return real(*a, **kw)
        if failure == "raise":
            raise RuntimeError("probe exploded")
        res = real(*a, **kw)
        res.delta[:] = np.nan
        return res

    monkeypatch.setattr(cbmod, "rapid_adaptation_probe", flaky)
    c = cb()
    with caplog.at_level(logging.WARNING, logger="grip_loop.callback"):
        trainer, _, ds = run(prepared, tmp_path, callback=c, steps=8)
    assert trainer.global_step == 8  # training went on
    assert [h["step"] for h in c.history] == [0, 0]  # only the start probe published
    assert ds.budgets.tolist() == c.history[-1]["n"]
    assert "keeping the previous budgets" in caplog.text


def test_static_modes_never_probe(prepared, tmp_path, monkeypatch):
    import grip_loop.callback as cbmod

    monkeypatch.setattr(cbmod, "rapid_adaptation_probe", lambda *a, **k: pytest.fail("probed"))
    for mode in ("random", "static-budget", "static-replay"):
        c = cb(mode=mode)
        _, _, ds = run(prepared, tmp_path / mode, callback=c, steps=5)
        assert len(c.history) == 1 and ds.order == "random"
        if mode == "random":
            assert ds.budgets.tolist() == SIZES


@pytest.mark.parametrize("overhead", [0.5, 0.2])
def test_cadence_keeps_the_probe_under_its_flops_budget(prepared, tmp_path, overhead):
    c = cb(refresh_every_n_steps=2, max_probe_overhead=overhead)
    _, model, _ = run(prepared, tmp_path, callback=c, steps=24)
    per_step = estimate_train_flops(model.model, 4 * 32)  # batch 4 x 32 tokens, one device
    expected = max(2, math.ceil(c._probe_flops / (overhead * per_step)))
    assert c.interval == expected > 2  # stretched: a probe costs more than 2 x overhead steps
    probed = [h for h in c.history if "delta" in h]
    assert [h["step"] for h in probed] == [0, *range(expected, 25, expected)]
    assert all(h["cost_fraction"] <= overhead for h in probed[1:])
    metrics = (tmp_path / "csv" / "metrics.csv").read_text().splitlines()[0].split(",")
    assert "grip/refresh_interval" in metrics
    # a fixed cadence keeps its interval and reports what it costs
    fixed = cb(refresh_every_n_steps=2)
    run(prepared, tmp_path / "fixed", callback=fixed, steps=6)
    assert fixed.interval == 2 and [h["step"] for h in fixed.history if "delta" in h] == [0, 2, 4, 6]
    assert fixed.history[-1]["cost_fraction"] > overhead


def test_bad_overhead_is_refused():
    for bad in (0, -0.1, 1.5):
        with pytest.raises(ValueError, match="max_probe_overhead"):
            GripCallback(max_probe_overhead=bad)


@pytest.mark.parametrize("overhead", [None, 0.5])
def test_resume_restores_schedule_and_stream(prepared, tmp_path, overhead):
    # uninterrupted: 12 steps with refreshes at 4 and 8 (fixed cadence) or at the stretched interval
    full = cb(max_probe_overhead=overhead)
    _, m_full, _ = run(prepared, tmp_path / "a", callback=full, steps=12)
    # interrupted after step 8 (checkpoint), resumed to 12
    first = cb(max_probe_overhead=overhead)
    run(prepared, tmp_path / "b", callback=first, steps=12, every_ckpt=8, stop_at=8)
    resumed = cb(max_probe_overhead=overhead)
    ckpt = next((tmp_path / "b" / "ckpt").glob("*step=8*.ckpt"))
    _, m_res, ds = run(prepared, tmp_path / "c", callback=resumed, steps=12, ckpt=str(ckpt))
    assert [h["n"] for h in resumed.history] == [h["n"] for h in full.history]
    assert [h["step"] for h in resumed.history] == [h["step"] for h in full.history]
    assert resumed.interval == full.interval
    assert ds.version == full.history[-1]["version"]
    for a, b in zip(m_full.state_dict().values(), m_res.state_dict().values(), strict=True):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)
    # the ledger: the same at every refresh and at the end, per-document counts included
    assert [h["ledger"] for h in resumed.history] == [h["ledger"] for h in full.history]
    end = [json.loads((tmp_path / d / "csv" / "grip_ledger.json").read_text()) for d in ("a", "c")]
    assert end[0] == end[1] and end[0]["event"] == "end" and sum(end[0]["ledger"]["tokens"]) > 0
    np.testing.assert_array_equal(resumed.ledger.seen, full.ledger.seen)
    assert resumed.ledger.seen.sum() > 0


def test_model_vocabulary_smaller_than_the_tokenizer_is_rejected(prepared, tmp_path):
    L.seed_everything(0)
    ds = GripIterableDataset(prepared, seq_len=32)
    model = MoELM(model="tiny", vocab_size=1024, model_overrides=TINY)
    trainer = L.Trainer(
        accelerator="cpu",
        max_steps=1,
        logger=False,
        callbacks=[cb()],
        enable_progress_bar=False,
        enable_checkpointing=False,
        default_root_dir=tmp_path,
    )
    with pytest.raises(ValueError, match="model.vocab_size"):
        trainer.fit(model, datamodule=GripDataModule(ds, batch_size=2))


def test_no_probe_before_first_refresh_after_steps(prepared, tmp_path):
    c = cb(first_refresh_after_steps=8)
    run(prepared, tmp_path, callback=c, steps=12)
    assert [h["step"] for h in c.history] == [0, 8, 12]  # not at the start, not at step 4
    assert "delta" not in c.history[0]
    # by default nothing is probed in a run shorter than 100 steps
    d = GripCallback(refresh_every_n_steps=4, max_probe_overhead=None, probe_seq_len=32, probe_docs=4)
    run(prepared, tmp_path / "default", callback=d, steps=8)
    assert [h["step"] for h in d.history] == [0]


def test_each_refresh_records_the_probe_table_and_its_reliability(prepared, tmp_path):
    import csv

    from grip_loop.probe_report import COLUMNS

    c = cb(first_refresh_after_steps=4)
    run(prepared, tmp_path, callback=c, steps=8)
    probed = [h for h in c.history if "delta" in h]
    assert [h["step"] for h in probed] == [4, 8]
    for h in probed:
        for key in (
            "loss_base",
            "loss_final",
            "reliability",
            "shrink",
            "lr",
            "ceiling",
            "ceiling_use",
            "flagged",
        ):
            assert key in h, key
        assert 0.0 <= h["shrink"] <= 1.0 and h["flagged"] == []
    lines = [json.loads(x) for x in (tmp_path / "csv" / "grip_history.jsonl").read_text().splitlines()]
    tables = [x["probe"] for x in lines if "probe" in x]
    assert len(tables) == 2 and [t["name"] for t in tables[0]] == [
        f"synthetic-{k}" for k in range(len(SIZES))
    ]
    assert all("probe" not in h for h in c.history)  # the checkpointed history stays lean
    with open(tmp_path / "csv" / "grip_probe.csv") as fh:
        rows = list(csv.DictReader(fh))
    assert list(rows[0]) == ["step", "refresh", *COLUMNS, "reliability", "shrink"]
    assert len(rows) == 2 * len(SIZES)
    assert [r["name"] for r in rows[: len(SIZES)]] == [f"synthetic-{k}" for k in range(len(SIZES))]
    first = rows[: len(SIZES)]
    assert [int(r["n_after"]) for r in first] == probed[0]["n"]
    assert [int(r["n_before"]) for r in first] == c.history[0]["n"]
    header = (tmp_path / "csv" / "metrics.csv").read_text().splitlines()[0].split(",")
    for col in ("grip/reliability", "grip/shrink", "grip/rap_lr", "grip/ceiling_use"):
        assert col in header, col


def test_low_reliability_shrinks_replay_toward_neutral(prepared, tmp_path, monkeypatch):
    import grip_loop.callback as cbmod
    from grip_loop.budget import replay_multiplier

    real = cbmod.rapid_adaptation_probe

    def unreliable(*a, **kw):
        res = real(*a, **kw)
        res.delta[[0, 1, 2, 4]] = [0.5, 0.1, 0.2, 0.3]
        res.reliability = 0.1
        return res

    monkeypatch.setattr(cbmod, "rapid_adaptation_probe", unreliable)
    c = cb(first_refresh_after_steps=4, rap=RAPConfig(epochs=1, min_docs=2, reliability_threshold=0.5))
    run(prepared, tmp_path, callback=c, steps=4)
    h = c.history[-1]
    assert h["reliability"] == pytest.approx(0.1) and h["shrink"] == pytest.approx(0.2)
    want = replay_multiplier(h["delta"], c.quality, shrink=0.2)
    np.testing.assert_allclose(h["r"], want)
    full = replay_multiplier(h["delta"], c.quality)
    neutral = 1 + 2 / math.e
    assert np.all(np.abs(np.asarray(h["r"]) - neutral) <= np.abs(full - neutral) + 1e-12)


def test_flagged_clusters_stay_neutral_and_do_not_fail_the_refresh(prepared, tmp_path):
    # 4 + 4 probe documents per cluster and min_docs 6: every cluster is flagged
    c = cb(first_refresh_after_steps=4, rap=RAPConfig(epochs=1, min_docs=6))
    run(prepared, tmp_path, callback=c, steps=4)
    h = c.history[-1]
    assert h["flagged"] == [0, 1, 2, 4] and all(np.isnan(h["delta"]))
    np.testing.assert_allclose(h["r"], replay_multiplier_neutral(c))


def replay_multiplier_neutral(c):
    from grip_loop.budget import replay_multiplier

    return replay_multiplier(np.full(len(c.quality), np.nan), c.quality)


def test_wandb_gets_a_probe_table_per_refresh_and_named_series(prepared, tmp_path):
    c = cb(first_refresh_after_steps=4)
    L.seed_everything(0)
    ds = GripIterableDataset(prepared, seq_len=32, seed=0)
    model = MoELM(model="tiny", vocab_size=2048, model_overrides=TINY, lr=3e-3, warmup_steps=2)
    wandb_logger = L.pytorch.loggers.WandbLogger(save_dir=str(tmp_path), project="t", offline=True)
    trainer = L.Trainer(
        accelerator="cpu",
        max_steps=8,
        logger=[L.pytorch.loggers.CSVLogger(tmp_path, name="csv", version=""), wandb_logger],
        callbacks=[c],
        enable_progress_bar=False,
        enable_model_summary=False,
        enable_checkpointing=False,
        default_root_dir=tmp_path,
        log_every_n_steps=1,
    )
    trainer.fit(model, datamodule=GripDataModule(ds, batch_size=4, num_workers=0))
    import wandb

    wandb.finish()
    run_dir = next((tmp_path / "wandb").glob("offline-run-*"))
    tables = sorted((run_dir / "files" / "media" / "table" / "grip").glob("probe_table_*.table.json"))
    assert len(tables) == 2  # one per probe (steps 4 and 8)
    table = json.loads(tables[0].read_text())
    assert table["columns"][:3] == ["step", "id", "name"]
    assert [row[2] for row in table["data"]] == [f"synthetic-{k}" for k in range(len(SIZES))]
    # the ledger: a table per publication (setup, steps 4 and 8) and one at the end
    ledgers = sorted((run_dir / "files" / "media" / "table" / "grip").glob("ledger_table_*.table.json"))
    assert len(ledgers) == 3
    last = json.loads(ledgers[-1].read_text())
    assert last["columns"][:5] == ["step", "cluster", "name", "docs", "distinct"]
    assert [row[3] for row in last["data"]] == SIZES
    assert len(list((run_dir / "files" / "media" / "table" / "grip").glob("ledger_final_*.table.json"))) == 1


def test_a_proxy_is_probed_from_the_start_and_must_fit_the_corpus(prepared, tmp_path):
    from grip_loop.callback import load_proxy

    proxy = MoELM(model="tiny", vocab_size=2048, model_overrides=TINY, seed=3).model
    proxy.save_pretrained(tmp_path / "proxy")
    c = cb(first_refresh_after_steps=100, proxy=str(tmp_path / "proxy"))
    run(prepared, tmp_path / "run", callback=c, steps=4)
    assert [h["step"] for h in c.history if "delta" in h] == [0]  # before step 1, then on cadence
    small = MoELM(model="tiny", vocab_size=1024, model_overrides=TINY).model
    small.save_pretrained(tmp_path / "small")
    ds = GripIterableDataset(prepared)
    with pytest.raises(
        ValueError, match=r"small: the model's vocabulary \(1024\) is smaller.*manifest\.json"
    ):
        load_proxy(str(tmp_path / "small"), ds)
    with pytest.raises(ValueError, match="not a Hugging Face model folder"):
        load_proxy(str(tmp_path), ds)
