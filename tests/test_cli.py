"""The `grip` entry point and the README/CI contract."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from train.cli import COMMANDS, main

ROOT = Path(__file__).resolve().parents[1]


def test_help_lists_every_command(capsys):
    with pytest.raises(SystemExit) as exc:
        main(["--help"])
    assert exc.value.code == 0
    out = capsys.readouterr().out
    for name, (_, helptext) in COMMANDS.items():
        assert name in out and helptext in out


def test_unknown_command_fails(capsys):
    with pytest.raises(SystemExit) as exc:
        main(["no-such-command"])
    assert exc.value.code == 2


@pytest.mark.slow
def test_every_command_module_imports_and_has_help():
    for name in COMMANDS:
        proc = subprocess.run(
            [sys.executable, "-m", "train", name, "--help"], cwd=ROOT, capture_output=True, text=True
        )
        assert proc.returncode == 0, proc.stderr
        assert f"grip {name}" in proc.stdout


def test_env_reports_versions(capsys):
    assert main(["env"]) == 0
    out = capsys.readouterr().out
    assert "torch" in out and "faiss-gpu" in out


def _ci_copy(tmp_path: Path, readme: str) -> Path:
    """A copy of `.ci/run` next to a README of the test's choosing (the script cds to `..`)."""
    (tmp_path / ".ci").mkdir()
    run = tmp_path / ".ci" / "run"
    shutil.copy(ROOT / ".ci" / "run", run)
    (tmp_path / "README.md").write_text(readme)
    return run


def test_ci_runs_the_readme_test_command(tmp_path):
    """`.ci/run` on the real README, with python3 stubbed so that the venv's `activate` defines
    pip / ruff / pytest as loggers: CI runs the README's line, every step of it, in order."""
    run = _ci_copy(tmp_path, (ROOT / "README.md").read_text())
    stub = tmp_path / "bin"
    stub.mkdir()
    logger = "".join(f'{c}() {{ echo {c} "$*" >> "$STEPS"; }}\n' for c in ("pip", "ruff", "pytest"))
    (stub / "activate").write_text(logger)
    (stub / "python3").write_text(f"#!/bin/sh\nmkdir -p .venv/bin && cp {stub / 'activate'} .venv/bin/\n")
    (stub / "python3").chmod(0o755)
    env = {**os.environ, "PATH": f"{stub}:{os.environ['PATH']}", "STEPS": str(tmp_path / "steps.log")}
    proc = subprocess.run(["bash", str(run)], cwd=tmp_path, env=env, capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.startswith("+ python3 -m venv .venv")
    assert (tmp_path / "steps.log").read_text().splitlines() == [
        "pip install -q torch==2.13.0",
        "pip install -q -e .[dev]",
        "ruff check .",
        "pytest -q -n 2 --dist loadfile",
    ]


def test_ci_run_fails_with_the_command_and_without_a_marker(tmp_path):
    run = _ci_copy(tmp_path, "# x\n<!-- test-command -->\n```bash\ntouch ran && exit 3\n```\n")
    proc = subprocess.run(["bash", str(run)], cwd=tmp_path, capture_output=True, text=True)
    assert proc.returncode == 3 and (tmp_path / "ran").exists()
    (tmp_path / "README.md").write_text("# no marker\n")
    proc = subprocess.run(["bash", str(run)], cwd=tmp_path, capture_output=True, text=True)
    assert proc.returncode == 2 and "no test command found" in proc.stderr


def test_train_help_shows_the_config_fields_attribute_docstrings(capsys):
    """`grip train` parses attribute docstrings: a config dataclass's field help reaches --help."""
    from train.main import build_cli

    with pytest.raises(SystemExit) as exc:
        build_cli(
            [
                "fit",
                "--trainer.callbacks.help",
                "grip_loop.callback.GripCallback",
                "--trainer.callbacks.budget.help",
            ]
        )
    assert exc.value.code == 0
    out = capsys.readouterr().out
    assert "--trainer.callbacks.budget.temperature" in out
    assert "Eq. 5 Boltzmann temperature (> 0)." in out  # BudgetConfig.temperature's docstring


def test_a_user_error_is_one_line_and_exit_2(tmp_path, capsys, monkeypatch):
    code = main(
        ["prepare", "--corpus", str(tmp_path / "nope"), "--out", str(tmp_path / "o"), "--no-progress"]
    )
    err = capsys.readouterr().err.strip()
    assert code == 2 and len(err.splitlines()) == 1
    assert err.startswith("grip prepare: error:") and "nope" in err and "Traceback" not in err
    monkeypatch.setenv("GRIP_TRACEBACK", "1")  # the traceback, for a bug report
    with pytest.raises(ValueError, match="does not exist"):
        main(["prepare", "--corpus", str(tmp_path / "nope"), "--out", str(tmp_path / "o"), "--no-progress"])


def test_grip_train_before_prepare_names_the_fix(tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    config = str(ROOT / "configs" / "train" / "cpu-tiny-grip.yaml")
    assert main(["train", "--config", config, "--data.dataset.init_args.root=nodata"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1] == "grip train: error: nodata/manifest.json: not found; re-run `grip prepare --out nodata`"
