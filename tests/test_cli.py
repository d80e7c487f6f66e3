"""The `grip` entry point and the README/CI contract."""

from __future__ import annotations

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


def test_ci_runs_the_readme_test_command():
    readme = (ROOT / "README.md").read_text().splitlines()
    i = readme.index("<!-- test-command -->")
    cmd = readme[i + 2]
    assert "pytest" in cmd and "torch==2.13.0" in cmd
    awk = subprocess.run(
        ["awk", "/<!-- test-command -->/{getline; getline; print; exit}", "README.md"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        check=True,
    )
    assert awk.stdout.strip() == cmd
    assert "README.md" in (ROOT / ".ci" / "run").read_text()


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
