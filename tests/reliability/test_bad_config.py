"""Bad configuration is rejected at start, with the field named."""

from __future__ import annotations

import math
import sys
from pathlib import Path

import lightning as L
import pytest
import yaml

from grip_loop.callback import GripCallback
from grip_loop.dataset import GripIterableDataset
from grip_loop.modes import BudgetConfig
from grip_loop.prepare import PrepareConfig, load_config
from grip_loop.rap import RAPConfig
from tests.prepared import make_prepared
from tests.tiny import TINY
from train.data import GripDataModule
from train.module import MoELM

ROOT = Path(__file__).resolve().parents[2]


# ------------------------------------------------------------------ unknown keys


@pytest.mark.parametrize(
    "edit,name",
    [
        (lambda c: c["model"].update(learning_rate=1e-3), "learning_rate"),
        (lambda c: c["trainer"].update(max_stepz=3), "max_stepz"),
        (lambda c: c["trainer"]["callbacks"][1]["init_args"]["budget"].update(b_totl=10), "b_totl"),
        (lambda c: c["trainer"]["callbacks"][1]["init_args"]["rap"].update(reset_dpth=1), "reset_dpth"),
        (lambda c: c["data"]["dataset"]["init_args"].update(sequence_length=64), "sequence_length"),
    ],
)
def test_unknown_keys_in_a_train_config_are_rejected_by_name(edit, name, tmp_path, monkeypatch, capsys):
    from train.main import build_cli

    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(sys, "argv", sys.argv[:1])
    make_prepared(tmp_path / "runs" / "quickstart" / "data", [5, 7, 3])
    cfg = yaml.safe_load((ROOT / "configs" / "train" / "cpu-tiny-grip.yaml").read_text())
    edit(cfg)
    (tmp_path / "bad.yaml").write_text(yaml.safe_dump(cfg))
    with pytest.raises(SystemExit) as exc:
        build_cli(["--config", str(tmp_path / "bad.yaml")], run=False)
    assert exc.value.code != 0
    assert name in capsys.readouterr().err


def test_unknown_keys_in_a_prepare_config_are_rejected_by_name(tmp_path):
    good = yaml.safe_load((ROOT / "configs" / "prepare" / "tiny.yaml").read_text())
    for where, key in ((None, "clusters"), ("encoder", "max_tokns"), ("judge", "modle")):
        cfg = {**good, "encoder": dict(good["encoder"]), "judge": dict(good["judge"])}
        (cfg if where is None else cfg[where])[key] = 1
        path = tmp_path / f"{key}.yaml"
        path.write_text(yaml.safe_dump(cfg))
        with pytest.raises(ValueError, match=rf"unknown field\(s\) \['{key}'\]") as err:
            load_config(path, corpus="c", out="o")
        assert str(path) in str(err.value)
        if where:
            assert f"{where}: unknown" in str(err.value)


# ------------------------------------------------------------------ numbers


NON_FINITE = [math.nan, math.inf, -math.inf]


@pytest.mark.parametrize("bad", [0, -5, 2.5, math.nan, math.inf, True, "100"])
def test_budget_total_must_be_a_positive_whole_number(bad):
    with pytest.raises(ValueError, match="^b_total: "):
        BudgetConfig(b_total=bad)
    assert BudgetConfig(b_total=100.0).b_total == 100  # a YAML float that is whole is fine


@pytest.mark.parametrize("name", ["tau", "temperature", "alpha", "quality_threshold", "ema", "floor"])
@pytest.mark.parametrize("bad", NON_FINITE)
def test_budget_hyperparameters_must_be_finite(name, bad):
    with pytest.raises(ValueError, match=f"^{name}: "):
        BudgetConfig(**{name: bad})


@pytest.mark.parametrize(
    "kw,name",
    [({"lr": v}, "lr") for v in NON_FINITE + [0.0, -1e-3]]
    + [({"eps": math.inf}, "eps"), ({"eps": math.nan}, "eps"), ({"weight_decay": math.inf}, "weight_decay")]
    + [({"betas": (math.nan, 0.9)}, "betas"), ({"vmap_max_bytes": math.nan}, "vmap_max_bytes")]
    + [({"reset_depth": -1}, "reset_depth"), ({"steps": 0}, "steps"), ({"epochs": 0}, "epochs")]
    + [({"micro_batch": -1}, "micro_batch"), ({"lr": "fastest"}, "lr"), ({"min_docs": 0}, "min_docs")]
    + [({"auto_lr_nats": v}, "auto_lr_nats") for v in NON_FINITE + [0.0]]
    + [({"reliability_threshold": math.nan}, "reliability_threshold"), ({"baseline": "zero"}, "baseline")]
    + [({"eval_split": "halves"}, "eval_split"), ({"epochs": True}, "epochs")],
)
def test_rap_hyperparameters_are_checked(kw, name):
    with pytest.raises(ValueError, match=f"^{name}: "):
        RAPConfig(**kw)


@pytest.mark.parametrize(
    "kw,name",
    [({"lr": v}, "lr") for v in NON_FINITE + [0.0]]
    + [({"weight_decay": math.nan}, "weight_decay"), ({"weight_decay": -0.1}, "weight_decay")]
    + [({"min_lr_ratio": math.nan}, "min_lr_ratio"), ({"betas": (0.9, math.inf)}, "betas")]
    + [({"peak_flops": math.inf}, "peak_flops"), ({"warmup_steps": -1}, "warmup_steps")],
)
def test_model_hyperparameters_are_checked(kw, name):
    with pytest.raises(ValueError, match=rf"^MoELM\.{name} "):
        MoELM(model="tiny", model_overrides=TINY, **kw)


@pytest.mark.parametrize(
    "kw,name",
    [({"beta": math.nan}, "beta"), ({"probe_fraction": math.inf}, "probe_fraction")]
    + [({"k": 0}, "k"), ({"max_file_bytes": 0}, "max_file_bytes"), ({"vocab_size": -1}, "vocab_size")],
)
def test_prepare_hyperparameters_are_checked(kw, name):
    with pytest.raises(ValueError, match=f"^{name}: "):
        PrepareConfig(**kw)


# ------------------------------------------------------------------ against the model


class NoStep(L.Callback):
    def on_train_batch_start(self, *a):
        pytest.fail("training started")


@pytest.mark.parametrize("lazy", [False, True])
def test_reset_depth_deeper_than_the_model_fails_at_setup(tmp_path, monkeypatch, lazy):
    import grip_loop.callback as cbmod

    monkeypatch.setattr(cbmod, "rapid_adaptation_probe", lambda *a, **k: pytest.fail("probed"))
    make_prepared(tmp_path / "p", [6, 6])
    cb = GripCallback(rap=RAPConfig(reset_depth=3), probe_seq_len=16)
    model = MoELM(model="tiny", vocab_size=2048, model_overrides=TINY, lazy_init=lazy)
    trainer = L.Trainer(
        accelerator="cpu",
        max_steps=2,
        logger=False,
        callbacks=[cb, NoStep()],
        enable_progress_bar=False,
        enable_checkpointing=False,
        default_root_dir=tmp_path,
    )
    dm = GripDataModule(GripIterableDataset(tmp_path / "p", seq_len=16), batch_size=2)
    with pytest.raises(ValueError, match="^rap.reset_depth: 3 exceeds the model's 2 decoder layers"):
        trainer.fit(model, datamodule=dm)


def test_static_modes_ignore_reset_depth(tmp_path):
    """Rows without loss replay never probe, so their RAP settings do not matter."""
    make_prepared(tmp_path / "p", [6, 6], orders=("grip", "random"))
    model = MoELM(model="tiny", vocab_size=2048, model_overrides=TINY)
    trainer = L.Trainer(
        accelerator="cpu",
        max_steps=1,
        logger=False,
        callbacks=[GripCallback(mode="static-budget", rap=RAPConfig(reset_depth=9))],
        enable_progress_bar=False,
        enable_checkpointing=False,
        default_root_dir=tmp_path,
    )
    trainer.fit(
        model, datamodule=GripDataModule(GripIterableDataset(tmp_path / "p", seq_len=16), batch_size=2)
    )
    assert trainer.global_step == 1


# ------------------------------------------------------------------ settings that train nothing (issue 13, 5)


@pytest.mark.parametrize("bad", [1, 0, -4, True, 2.5, "64"])
def test_a_sequence_length_that_trains_nothing_is_rejected(tmp_path, bad):
    """seq_len 1 used to train with loss 0.0: a block of T tokens has T-1 targets."""
    make_prepared(tmp_path / "p", [4, 4])
    with pytest.raises(ValueError, match="^seq_len: must be an integer >= 2") as err:
        GripIterableDataset(tmp_path / "p", seq_len=bad)
    assert "data.dataset.init_args.seq_len" in str(err.value)
    GripIterableDataset(tmp_path / "p", seq_len=2)


def test_the_model_refuses_a_batch_without_a_next_token_target():
    """Any dataset, not only GRIP's: a (B, 1) batch is refused before the forward pass."""
    import torch

    model = MoELM(model="tiny", vocab_size=64, model_overrides=TINY)
    with pytest.raises(ValueError, match=r"shape \(2, 1\): a block needs at least 2 tokens") as err:
        model.training_step({"input_ids": torch.zeros(2, 1, dtype=torch.long)}, 0)
    assert "seq_len" in str(err.value)


@pytest.mark.parametrize(
    "kw,name",
    [
        ({"max_steps": 0}, "max_steps"),
        ({"max_epochs": 0}, "max_epochs"),
        ({"limit_train_batches": 0}, "limit_train_batches"),
    ],
)
def test_trainer_settings_that_run_no_step_are_rejected(tmp_path, kw, name):
    """Lightning accepts these and exits 0 without a step."""
    trainer = L.Trainer(
        accelerator="cpu",
        logger=False,
        enable_progress_bar=False,
        enable_checkpointing=False,
        default_root_dir=tmp_path,
        callbacks=[NoStep()],
        **{"max_steps": 2, **kw},
    )
    with pytest.raises(ValueError, match=rf"^trainer\.{name}: 0 runs no training"):
        trainer.fit(
            MoELM(model="tiny", vocab_size=512, model_overrides=TINY), datamodule=GripDataModule(batch_size=2)
        )


@pytest.mark.parametrize(
    "kw,name",
    [({"batch_size": 0}, "batch_size"), ({"batch_size": 2.5}, "batch_size")]
    + [
        ({"batch_size": True}, "batch_size"),
        ({"num_workers": -1}, "num_workers"),
        ({"num_workers": 1.5}, "num_workers"),
    ],
)
def test_data_module_sizes_must_be_whole_numbers(kw, name):
    with pytest.raises(ValueError, match=rf"^GripDataModule\.{name} must be an integer"):
        GripDataModule(**kw)
