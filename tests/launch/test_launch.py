"""End to end: `grip train` on CPU and launch/torchrun.sh with 2 gloo processes (subprocesses)."""

from __future__ import annotations

import csv
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[2]
CONFIG = ROOT / "configs" / "train" / "cpu-tiny.yaml"
SMALL = [
    "--model.model_overrides",
    "{num_layers: 2, hidden_size: 64, head_dim: 16, expert_size: 64}",
    "--trainer.enable_progress_bar",
    "false",
    "--trainer.log_every_n_steps",
    "1",
]


def env() -> dict[str, str]:
    e = dict(os.environ, WANDB_MODE="offline", HF_HUB_OFFLINE="1", OMP_NUM_THREADS="1")
    e["PYTHONPATH"] = str(ROOT) + os.pathsep + e.get("PYTHONPATH", "")
    return e


def run(cmd: list[str], cwd: Path) -> str:
    proc = subprocess.run(cmd, cwd=cwd, env=env(), capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return proc.stdout + proc.stderr


# what every training run printed before train/quiet.py and train/progress.py (issue 14)
NOISE = [
    "set_vital",
    "LeafSpec",
    "litlogger",
    "anonymous setting",
    "git root",
    "Epoch 0/-2",
    "Total FLOPs",
    "Warning",
    "Traceback",
]


def check_run_folder(root: Path, steps: int) -> list[dict[str, str]]:
    assert (root / "checkpoints" / "last.ckpt").is_file()
    assert list((root / "wandb").glob("offline-run-*")), "no offline W&B run"
    with open(root / "csv" / "metrics.csv") as f:
        rows = list(csv.DictReader(f))
    loss = [float(r["train/loss"]) for r in rows if r.get("train/loss")]
    assert len(loss) == steps and all(math.isfinite(x) for x in loss)
    return rows


@pytest.mark.slow
def test_grip_train_cli_default_config(tmp_path):
    # logged to a file (stdout is a pipe), the bar is left on: it must turn into periodic lines
    small = [a for a in SMALL if a not in ("--trainer.enable_progress_bar", "false")]
    out = run(
        [sys.executable, "-m", "train", "train", "--config", str(CONFIG), "--trainer.max_steps", "4", *small],
        tmp_path,
    )
    rows = check_run_folder(tmp_path / "runs" / "cpu-tiny", 4)
    assert any(r.get("train/loss_cluster_0") for r in rows)
    assert [n for n in NOISE if n in out] == [], out[-3000:]
    assert "train: step 4/4, loss" in out and "\r" not in out  # lines a log can show, no bar


@pytest.mark.slow
def test_torchrun_two_cpu_processes(tmp_path):
    run(
        [
            "bash",
            str(ROOT / "launch" / "torchrun.sh"),
            "2",
            "--config",
            str(CONFIG),
            "--trainer.max_steps",
            "4",
            *SMALL,
        ],
        tmp_path,
    )
    root = tmp_path / "runs" / "cpu-tiny"
    check_run_folder(root, 4)
    state = torch.load(root / "checkpoints" / "last.ckpt", weights_only=False)
    assert state["global_step"] == 4
    hp = state["hyper_parameters"]
    assert hp["model_overrides"]["num_layers"] == 2
