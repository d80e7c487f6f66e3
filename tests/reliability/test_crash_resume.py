"""SIGKILL, the real thing: a 2-process CPU training run and `grip prepare`, killed mid-run
and resumed, end exactly where an uninterrupted run ends."""

from __future__ import annotations

import json
import os
import random
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import yaml

from grip_loop.manifest import ManifestError, load_manifest
from tests.prepared import make_prepared
from tests.reliability._train_helpers import read_log
from tests.tiny import TINY

ROOT = Path(__file__).resolve().parents[2]
STEPS, REFRESH, CKPT_EVERY = 16, 3, 2


def _env() -> dict[str, str]:
    e = dict(os.environ, WANDB_MODE="offline", HF_HUB_OFFLINE="1", OMP_NUM_THREADS="1")
    e["PYTHONPATH"] = str(ROOT) + os.pathsep + e.get("PYTHONPATH", "")
    return e


def _config(tmp: Path, data: Path, run: Path) -> Path:
    cfg = {
        "seed_everything": 0,
        "trainer": {
            "accelerator": "cpu",
            "strategy": "ddp",
            "precision": "32-true",
            "max_steps": STEPS,
            "log_every_n_steps": 1,
            "enable_progress_bar": False,
            "enable_model_summary": False,
            "default_root_dir": str(run),
            "logger": {
                "class_path": "lightning.pytorch.loggers.CSVLogger",
                "init_args": {"save_dir": str(run), "name": "csv", "version": ""},
            },
            "callbacks": [
                {
                    "class_path": "lightning.pytorch.callbacks.ModelCheckpoint",
                    "init_args": {
                        "dirpath": str(run / "checkpoints"),
                        "every_n_train_steps": CKPT_EVERY,
                        "save_top_k": -1,
                        "save_last": True,
                    },
                },
                {
                    "class_path": "grip_loop.callback.GripCallback",
                    "init_args": {
                        "mode": "grip",
                        "refresh_every_n_steps": REFRESH,
                        "max_probe_overhead": None,
                        "first_refresh_after_steps": 0,
                        "probe_seq_len": 32,
                        "probe_docs": 2,
                        "budget": {"b_total": 60},
                        "rap": {"epochs": 1, "micro_batch": 2, "min_docs": 1},
                    },
                },
                {
                    "class_path": "tests.reliability._train_helpers.BatchLog",
                    "init_args": {"out": str(run)},
                },
                {
                    "class_path": "tests.reliability._train_helpers.Throttle",
                    "init_args": {"seconds": 0.15},
                },
            ],
        },
        "model": {
            "model": "tiny",
            "vocab_size": 2048,
            "model_overrides": TINY,
            "lr": 3e-3,
            "warmup_steps": 2,
        },
        "data": {
            "dataset": {
                "class_path": "grip_loop.dataset.GripIterableDataset",
                "init_args": {"root": str(data), "seq_len": 32, "seed": 0},
            },
            "batch_size": 4,
            "num_workers": 0,
        },
    }
    path = tmp / f"{run.name}.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return path


def _torchrun(config: Path, *extra: str, popen: bool = False):
    cmd = ["bash", str(ROOT / "launch" / "torchrun.sh"), "2", "--config", str(config), *extra]
    if popen:
        return subprocess.Popen(
            cmd,
            env=_env(),
            cwd=config.parent,
            start_new_session=True,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
        )
    r = subprocess.run(cmd, env=_env(), cwd=config.parent, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    return r


def _descendants(pid: int) -> list[int]:
    """Every process below `pid` (from /proc: each one's parent pid)."""
    children: dict[int, list[int]] = {}
    for d in Path("/proc").iterdir():
        if d.name.isdigit():
            try:
                ppid = int((d / "stat").read_text().rsplit(")", 1)[1].split()[1])
            except (OSError, IndexError, ValueError):
                continue
            children.setdefault(ppid, []).append(int(d.name))
    out, todo = [], [pid]
    while todo:
        for c in children.get(todo.pop(), []):
            out.append(c)
            todo.append(c)
    return out


def _kill_job(pid: int) -> None:
    """SIGKILL a torchrun job whole: the agent's process group and every worker's. torchrun
    starts each worker in a session of its own, so killing the agent's group alone leaves the
    workers running (orphaned, they would finish the run and append to its logs)."""
    groups = {os.getpgid(p) for p in _descendants(pid) if _alive(p)} | {pid}
    for g in groups:
        try:
            os.killpg(g, signal.SIGKILL)
        except ProcessLookupError:
            pass


def _cmdline(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode()
    except OSError:
        return ""


def _alive(pid: int) -> bool:
    try:
        os.getpgid(pid)
        return True
    except ProcessLookupError:
        return False


def _step(path: Path) -> int:
    return int(re.search(r"step=(\d+)", path.name).group(1))


def _model_state(ckpt: Path) -> dict:
    return torch.load(ckpt, weights_only=False, map_location="cpu")


@pytest.mark.slow
def test_sigkill_two_process_training_resumes_exactly(tmp_path):
    data = tmp_path / "data"
    make_prepared(data, [30, 30, 20, 25], orders=("grip",), easy={0}, max_len=60, n_probe=4)
    # A: uninterrupted
    run_a = tmp_path / "a"
    _torchrun(_config(tmp_path, data, run_a))
    # B: SIGKILLed (the whole process group: torchrun and both ranks) once the checkpoint of
    # a randomly chosen step after a refresh is on disk
    seed = random.randrange(1 << 30)
    target = random.Random(seed).choice([s for s in range(CKPT_EVERY, STEPS - 4, CKPT_EVERY) if s > REFRESH])
    run_b = tmp_path / "b"
    proc = _torchrun(_config(tmp_path, data, run_b), popen=True)
    deadline = time.monotonic() + 240
    try:
        while not list((run_b / "checkpoints").glob(f"*step={target}.ckpt")):
            assert proc.poll() is None, proc.stdout.read().decode()[-3000:]
            assert time.monotonic() < deadline, "run B never reached the target checkpoint"
            time.sleep(0.02)
        _kill_job(proc.pid)
    finally:
        proc.wait()
        proc.stdout.close()
    assert proc.returncode == -signal.SIGKILL
    time.sleep(0.5)
    config_b = str(tmp_path / "b.yaml")
    survivors = [
        d.name for d in Path("/proc").iterdir() if d.name.isdigit() and config_b in _cmdline(int(d.name))
    ]
    assert not survivors, f"processes of run B survived the kill: {survivors}"
    killed_at = max(read_log(run_b / "batches-rank0.txt"))
    assert killed_at < STEPS - 1, f"seed {seed}: run B finished before the kill"
    # the newest checkpoint on disk is complete and loadable (none is half-written)
    ckpts = sorted((run_b / "checkpoints").glob("epoch=*-step=*.ckpt"), key=_step)
    last = ckpts[-1]
    resume_step = _step(last)
    assert target <= resume_step <= killed_at + 1
    assert _model_state(last)["global_step"] == resume_step
    # C: resumed from B's newest checkpoint
    run_c = tmp_path / "c"
    _torchrun(_config(tmp_path, data, run_c), "--ckpt_path", str(last))

    msg = f"seed {seed}, target {target}, killed at step {killed_at}, resumed from {resume_step}"
    for rank in (0, 1):
        a = read_log(run_a / f"batches-rank{rank}.txt")
        b = read_log(run_b / f"batches-rank{rank}.txt")
        c = read_log(run_c / f"batches-rank{rank}.txt")
        assert sorted(c) == list(range(resume_step, STEPS)), msg
        assert c == {s: a[s] for s in range(resume_step, STEPS)}, msg  # the stream from the checkpoint on
        assert {s: b[s] for s in b} == {s: a[s] for s in b}, msg  # and B before its death
    assert read_log(run_a / "batches-rank0.txt") != read_log(run_a / "batches-rank1.txt")
    final_a, final_c = (
        _model_state(run_a / "checkpoints" / "last.ckpt"),
        _model_state(run_c / "checkpoints" / "last.ckpt"),
    )
    assert final_a["global_step"] == final_c["global_step"] == STEPS
    for (name, x), (_, y) in zip(final_a["state_dict"].items(), final_c["state_dict"].items(), strict=True):
        torch.testing.assert_close(x, y, rtol=1e-5, atol=1e-6, msg=lambda m, n=name: f"{n}: {m} ({msg})")
    grip = [k for k in final_a["callbacks"] if "GripCallback" in k][0]
    hist_a, hist_c = final_a["callbacks"][grip]["history"], final_c["callbacks"][grip]["history"]
    assert [(h["step"], h["n"]) for h in hist_a] == [(h["step"], h["n"]) for h in hist_c], msg
    assert len(hist_a) >= 1 + STEPS // REFRESH  # the budgets did move during the run


def _prepare(stage: str, n: int, log: Path, corpus: Path, out: Path) -> subprocess.CompletedProcess:
    from tests.stdlib_prepared import TINY as PREPARE_TINY

    cmd = [sys.executable, "-m", "tests.reliability._prepare_killer", stage, str(n), str(log), "--"]
    cmd += ["--corpus", str(corpus), "--out", str(out), "--config", str(PREPARE_TINY), "--no-progress"]
    r = subprocess.run(cmd, env=_env(), cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert r.returncode in (0, -signal.SIGKILL), r.stdout[-3000:] + r.stderr[-3000:]
    return r


def _comparable(directory: Path) -> dict:
    m = json.loads((directory / "manifest.json").read_text())
    m["stats"].pop("timings")
    m["config"].pop("out")
    return m


def _tree_bytes(directory: Path) -> dict[str, bytes]:
    return {
        str(p.relative_to(directory)): p.read_bytes()
        for sub in ("shards", "probe")
        for p in sorted((directory / sub).rglob("*"))
        if p.is_file()
    }


@pytest.mark.slow
def test_sigkilled_prepare_reruns_to_the_same_manifest_and_shards(stdlib_prepared, stdlib_corpus, tmp_path):
    out, log = tmp_path / "out", tmp_path / "calls.txt"
    # killed in the embed stage, in the middle of its second block (the first is on disk)
    assert _prepare("embed", 2, log, stdlib_corpus, out).returncode == -signal.SIGKILL
    assert not (out / "manifest.json").exists()
    # killed while writing shards (after the 100th document)
    log.write_text("")
    assert _prepare("write", 100, log, stdlib_corpus, out).returncode == -signal.SIGKILL
    assert log.read_text().count("embed") == 1  # only the unfinished block was embedded again
    assert not (out / "manifest.json").exists()
    with pytest.raises(ManifestError, match="grip prepare"):
        load_manifest(out)
    # a plain re-run finishes; it embeds nothing and equals the uninterrupted run
    log.write_text("")
    rerun = _prepare("none", 0, log, stdlib_corpus, out)
    assert rerun.returncode == 0
    assert "embed" not in log.read_text()
    # the unit the killed process was writing is named by the re-run (the dead one could not)
    named = re.findall(r"write: (\S+) was left unfinished by rank 0 of an earlier run", rerun.stderr)
    assert len(named) == 1, rerun.stderr[-3000:]
    assert not list((out / "work" / "write").glob("*.started"))
    assert _comparable(out) == _comparable(stdlib_prepared)
    assert _tree_bytes(out) == _tree_bytes(stdlib_prepared)
    assert not list(out.rglob("*.tmp"))
