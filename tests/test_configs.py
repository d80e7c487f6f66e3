"""Every YAML under configs/ parses and builds (model configs into models, train configs via LightningCLI)."""

from __future__ import annotations

from pathlib import Path

import pytest

from models import MoEConfig, build_model, count_closed_form, count_parameters

ROOT = Path(__file__).resolve().parent.parent
MODEL_YAMLS = sorted((ROOT / "configs" / "model").glob("*.yaml"))
TRAIN_YAMLS = sorted((ROOT / "configs" / "train").glob("*.yaml"))
# the 8B rows differ only in the mode (test_ablation_rows_differ_only_in_the_sampler_mode): one builds
ABLATION_8B_YAMLS = sorted((ROOT / "configs" / "ablation-8b").glob("*.yaml"))[-1:]


def test_configs_exist():
    assert {p.stem for p in MODEL_YAMLS} >= {"tiny", "moe-8b", "moe-16b"}
    assert {p.stem for p in TRAIN_YAMLS} >= {
        "cpu-tiny",
        "cpu-tiny-grip",
        "h800x8-8b-throughput",
        "h800x8-8b-grip",
        "h800x8-16b-grip",
    }


@pytest.mark.parametrize("path", MODEL_YAMLS, ids=lambda p: p.stem)
def test_model_yaml_builds_on_meta(path):
    cfg = MoEConfig.from_yaml(path)
    model = build_model(cfg, device="meta")
    assert count_parameters(model, cfg) == count_closed_form(cfg)


@pytest.mark.parametrize("path", TRAIN_YAMLS + ABLATION_8B_YAMLS, ids=lambda p: f"{p.parent.name}/{p.stem}")
def test_train_yaml_builds(path, tmp_path, monkeypatch):
    import yaml

    from train.main import build_cli

    monkeypatch.chdir(tmp_path)  # loggers and checkpoints use relative run folders
    raw = yaml.safe_load(path.read_text())
    grip = raw["data"]["dataset"]["class_path"].endswith("GripIterableDataset")
    if grip:  # the GRIP configs read a prepared corpus: give them a small one where they look
        from tests.prepared import make_prepared

        root = tmp_path / raw["data"]["dataset"]["init_args"]["root"]
        make_prepared(root, [5, 7, 3], orders=("grip", "diversity", "random"))
    args = ["--config", str(path), "--trainer.accelerator=cpu", "--trainer.devices=1"]
    cli = build_cli(args, run=False)
    cli.datamodule.setup("fit")
    # the model's vocabulary must cover every token id the data can hold
    assert cli.model.model_config.vocab_size >= cli.datamodule.dataset.vocab_size
    if grip:  # the callback is attached and finds the dataset it steers
        from types import SimpleNamespace

        from grip_loop.callback import GripCallback
        from grip_loop.dataset import GripIterableDataset

        (cb,) = [c for c in cli.trainer.callbacks if isinstance(c, GripCallback)]
        assert cb._find_dataset(SimpleNamespace(datamodule=cli.datamodule)) is cli.datamodule.dataset
        assert isinstance(cli.datamodule.dataset, GripIterableDataset)
        if "h800" in path.stem or path.parent.name == "ablation-8b":  # the paper's setup
            assert cb.max_overhead == 0.005 and cb.interval is None  # the FLOPs-budgeted cadence
            assert cli.trainer.precision == "bf16-mixed"
            assert cli.datamodule.dataset.seq_len == 4096
    if cli.model.hparams.lazy_init and path.parent.name == "train":  # full size, on the meta device
        # (the ablation-8b rows are h800x8-8b-grip but for the mode: test_ablation_rows_differ_...)
        import torch

        with torch.device("meta"):
            cli.model.configure_model()
        emb = cli.model.model.get_input_embeddings().weight
        assert emb.is_meta and emb.shape[0] == cli.model.model_config.vocab_size
        cli.model.model = None
    if "h800" in path.stem or path.parent.name == "ablation-8b":
        from train.strategies import MoEFSDPStrategy

        assert isinstance(cli.trainer.strategy, MoEFSDPStrategy)
    root = Path(cli.trainer.default_root_dir)
    assert root.parts[0] == "runs"
    # The run folder layout the rest of the project relies on: csv/, wandb/, checkpoints/.
    from lightning.pytorch.callbacks import ModelCheckpoint
    from lightning.pytorch.loggers import CSVLogger, WandbLogger

    kinds = {type(lg) for lg in cli.trainer.loggers}
    assert {CSVLogger, WandbLogger} <= kinds
    for lg in cli.trainer.loggers:
        assert Path(lg.save_dir).resolve() == root.resolve()
    ck = [c for c in cli.trainer.callbacks if isinstance(c, ModelCheckpoint)]
    assert ck and Path(ck[0].dirpath).resolve() == (root / "checkpoints").resolve()
    if cli.model.hparams.lazy_init:
        assert cli.model.model is None
    else:
        assert len(cli.model.model.model.layers) == cli.model.model_config.num_layers


def test_extra_callbacks_can_be_added(tmp_path, monkeypatch):
    from lightning.pytorch.callbacks import LearningRateMonitor

    from train.main import build_cli

    monkeypatch.chdir(tmp_path)
    cli = build_cli(
        [
            "--config",
            str(ROOT / "configs/train/cpu-tiny.yaml"),
            "--trainer.callbacks+=lightning.pytorch.callbacks.LearningRateMonitor",
        ],
        run=False,
    )
    assert any(isinstance(c, LearningRateMonitor) for c in cli.trainer.callbacks)


ABLATION_DIRS = ("ablation", "ablation-testbed", "ablation-8b")
ABLATION_YAMLS = sorted((ROOT / "configs" / "ablation").glob("*.yaml"))
TESTBED_YAMLS = sorted((ROOT / "configs" / "ablation-testbed").glob("*.yaml"))


def _without_mode(cfg: dict) -> tuple[dict, str]:
    import copy

    cfg = copy.deepcopy(cfg)
    modes = [
        cb["init_args"].pop("mode")
        for cb in cfg["trainer"]["callbacks"]
        if cb["class_path"] == "grip_loop.callback.GripCallback"
    ]
    assert len(modes) == 1
    return cfg, modes[0]


@pytest.mark.parametrize("folder", ABLATION_DIRS)
def test_ablation_rows_differ_only_in_the_sampler_mode(folder):
    import yaml

    from grip_loop.modes import MODES

    yamls = sorted((ROOT / "configs" / folder).glob("*.yaml"))
    assert [p.stem for p in yamls] == [
        "1-random",
        "2-static-budget",
        "3-static-replay",
        "4-loss-replay",
        "5-diversity",
        "6-grip",
    ]
    rest, modes = zip(*(_without_mode(yaml.safe_load(p.read_text())) for p in yamls), strict=True)
    assert list(modes) == list(MODES)  # the rows of Table 1 Panel B, in the paper's order
    assert all(r == rest[0] for r in rest[1:])  # same budget, steps, seed, data, model, probe
    assert rest[0]["seed_everything"] == 0 and rest[0]["trainer"]["max_steps"] > 0


@pytest.mark.parametrize("path", ABLATION_YAMLS[-1:] + TESTBED_YAMLS[-1:], ids=lambda p: p.parent.name)
def test_ablation_yaml_builds(path, tmp_path, monkeypatch):
    import yaml

    from tests.prepared import make_prepared
    from train.main import build_cli

    monkeypatch.chdir(tmp_path)
    root = yaml.safe_load(path.read_text())["data"]["dataset"]["init_args"]["root"]
    make_prepared(tmp_path / root, [5, 7, 3], orders=("grip", "diversity", "random"))
    cli = build_cli(["--config", str(path)], run=False)
    cli.datamodule.setup("fit")
    assert cli.model.model_config.vocab_size >= cli.datamodule.dataset.vocab_size


def test_the_run_folder_setting_moves_every_output(tmp_path, monkeypatch, capsys):
    """`--trainer.default_root_dir=runs/try20` moves the CSV logs, the W&B run, the checkpoints
    and the GRIP files (they follow trainer.log_dir) away from the YAML's run folder."""
    from lightning.pytorch.callbacks import ModelCheckpoint

    from tests.prepared import make_prepared
    from train.main import build_cli

    monkeypatch.chdir(tmp_path)
    make_prepared(
        tmp_path / "runs" / "quickstart" / "data", [5, 7, 3], orders=("grip", "diversity", "random")
    )
    args = [
        "--config",
        str(ROOT / "configs/train/cpu-tiny-grip.yaml"),
        "--trainer.default_root_dir=runs/try20",
    ]
    cli = build_cli(args, run=False)
    root = (tmp_path / "runs" / "try20").resolve()
    assert Path(cli.trainer.default_root_dir).resolve() == root
    for lg in cli.trainer.loggers:
        assert Path(lg.save_dir).resolve() == root, type(lg).__name__
    assert Path(cli.trainer.log_dir).resolve().parent == root  # grip_history.jsonl, PNGs, probe CSV
    ck = [c for c in cli.trainer.callbacks if isinstance(c, ModelCheckpoint)]
    assert Path(ck[0].dirpath).resolve() == root / "checkpoints"
    assert "outside trainer.default_root_dir" not in capsys.readouterr().err
    # model.vocab_size: null = the prepared tokenizer's vocabulary (make_prepared: 2048)...
    assert cli.model.model_config.vocab_size == cli.datamodule.dataset.vocab_size == 2048
    # ...unless the command line says otherwise
    cli = build_cli([*args, "--model.vocab_size=4096"], run=False)
    assert cli.model.model_config.vocab_size == 4096


def test_a_hard_coded_path_outside_the_run_folder_is_named(tmp_path):
    from train.main import place_run_paths

    cfg = {
        "default_root_dir": str(tmp_path / "b"),
        "logger": [{"class_path": "CSVLogger", "init_args": {"save_dir": str(tmp_path / "a")}}],
        "callbacks": [{"class_path": "ModelCheckpoint", "init_args": {"dirpath": "{default_root_dir}/ck"}}],
    }
    notes = place_run_paths(cfg, warn=lambda m: None)
    assert cfg["callbacks"][0]["init_args"]["dirpath"] == f"{tmp_path / 'b'}/ck"
    assert len(notes) == 1 and "trainer.logger[0].init_args.save_dir" in notes[0]
