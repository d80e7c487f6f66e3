"""`grip prepare` under faults: two runs on one folder.

Most tests run a whole `grip prepare` of ~50 small stdlib files in about a second, with a
fake encoder (`_fake_encoder`: unit vectors from each text's hash) in place of MiniLM.
"""

from __future__ import annotations

import errno
import json
import os
import socket
import subprocess
import sys
import sysconfig
import time
from pathlib import Path

import pytest

from grip_loop import workdir
from grip_loop.prepare import load_config, prepare
from grip_loop.workdir import OutputLock, OutputLocked
from tests.reliability._fake_encoder import install
from tests.stdlib_prepared import TINY

ROOT = Path(__file__).resolve().parents[2]
PACKAGES = ("json", "email", "http", "logging", "urllib", "wsgiref", "concurrent", "importlib", "xml")


def _env() -> dict[str, str]:
    e = dict(os.environ, HF_HUB_OFFLINE="1", OMP_NUM_THREADS="1", TOKENIZERS_PARALLELISM="false")
    e["PYTHONPATH"] = str(ROOT) + os.pathsep + e.get("PYTHONPATH", "")
    return e


def small_corpus(dst: Path) -> Path:
    """50 small files of the running Python's standard library."""
    src = Path(sysconfig.get_paths()["stdlib"])
    files = [f for p in PACKAGES for f in sorted((src / p).rglob("*.py")) if 300 < f.stat().st_size < 12_000]
    assert len(files) >= 50
    dst.mkdir(parents=True, exist_ok=True)
    for i, f in enumerate(files[:50]):
        (dst / f"f{i:02d}.py").write_bytes(f.read_bytes())
    return dst


@pytest.fixture(scope="module")
def corpus(tmp_path_factory) -> Path:
    return small_corpus(tmp_path_factory.mktemp("faults_corpus"))


def _cfg(corpus: Path, out: Path, **kw):
    kw = {"k": 3, "vocab_size": 512, "orders": ["grip"], "encoder": {"block_size": 8}} | kw
    return load_config(TINY, corpus=str(corpus), out=str(out), **kw)


def _comparable(out: Path) -> dict:
    m = json.loads((out / "manifest.json").read_text())
    m["stats"].pop("timings")
    m["config"].pop("out")
    return m


@pytest.fixture(scope="module")
def reference(corpus, tmp_path_factory) -> Path:
    """One uninterrupted run (fake encoder) that the tests compare with."""
    out = tmp_path_factory.mktemp("faults_reference")
    mp = pytest.MonkeyPatch()
    try:
        install(mp)
        prepare(_cfg(corpus, out))
    finally:
        mp.undo()
    return out


@pytest.fixture
def fake(monkeypatch):
    return install(monkeypatch)


def _hold_lock(folder: Path) -> subprocess.Popen:
    """Another process that holds `folder`'s lock until it is killed."""
    code = (
        "import sys, time\n"
        "from grip_loop.workdir import OutputLock\n"
        "OutputLock(sys.argv[1]).acquire()\n"
        "print('held', flush=True)\n"
        "time.sleep(600)\n"
    )
    proc = subprocess.Popen(
        [sys.executable, "-c", code, str(folder)], env=_env(), stdout=subprocess.PIPE, text=True
    )
    assert proc.stdout.readline().strip() == "held"
    return proc


# ---------------------------------------------------------------------------------------
# 1. one run per output folder


def test_a_second_run_on_the_same_out_fails_at_once_and_names_the_holder(corpus, tmp_path, fake):
    out = tmp_path / "out"
    holder = _hold_lock(out)
    try:
        t0 = time.monotonic()
        with pytest.raises(OutputLocked) as e:
            prepare(_cfg(corpus, out))
        assert time.monotonic() - t0 < 5
        msg = str(e.value)
        assert str(out) in msg and f"pid {holder.pid}" in msg and socket.gethostname() in msg
        assert "another --out" in msg
        assert not (out / "work").exists()  # nothing was written
    finally:
        holder.kill()
        holder.wait()
    # the kernel dropped the SIGKILLed holder's lock: no stale lock, a run goes through
    m = prepare(_cfg(corpus, out))
    assert m is not None and (out / "manifest.json").is_file()
    assert (out / workdir.LOCK_NAME).read_text() == ""  # released, the holder record cleared


def test_the_lock_is_held_for_the_whole_run_and_released_after_an_error(corpus, tmp_path, monkeypatch, fake):
    out = tmp_path / "out"
    seen = []

    def probe(self, texts):  # called in the embed stage, in the middle of the run
        with pytest.raises(OutputLocked):
            OutputLock(out).acquire()
        seen.append(json.loads((out / workdir.LOCK_NAME).read_text())["pid"])
        raise KeyboardInterrupt("stop in embed")

    monkeypatch.setattr(fake, "embed", probe)
    with pytest.raises(KeyboardInterrupt):
        prepare(_cfg(corpus, out))
    assert seen == [os.getpid()]
    with OutputLock(out):  # released by the error
        pass


def test_a_filesystem_without_locks_warns_and_goes_on(tmp_path, monkeypatch, capsys):
    def no_locks(fd, op):
        raise OSError(errno.ENOLCK, "No locks available")

    monkeypatch.setattr(workdir.fcntl, "flock", no_locks)
    with OutputLock(tmp_path / "out") as lock:
        assert not lock.held
    err = capsys.readouterr().err
    assert "cannot lock (No locks available)" in err and "run only one at a time" in err


def test_restart_does_not_wipe_the_work_of_a_running_prepare(corpus, tmp_path, capsys):
    from train.cmd_prepare import main

    out = tmp_path / "out"
    holder = _hold_lock(out)
    try:
        (out / "work").mkdir(parents=True)
        (out / "work" / "ingest.json").write_text("{}")
        rc = main(["--corpus", str(corpus), "--out", str(out), "--config", str(TINY), "--restart"])
        assert rc == 1
        err = capsys.readouterr().err
        assert err.startswith("grip prepare: error:") and f"pid {holder.pid}" in err
        assert (out / "work" / "ingest.json").read_text() == "{}"  # untouched
    finally:
        holder.kill()
        holder.wait()


@pytest.mark.slow
def test_two_concurrent_cli_runs_one_finishes_the_other_is_refused(corpus, tmp_path, reference):
    """The reviewer's case: two `grip prepare` on one --out. Run A embeds slowly; B starts while
    A is running and fails at once with the message; A finishes with the reference result."""
    out = tmp_path / "out"
    args = ["--corpus", str(corpus), "--out", str(out), "--config", str(TINY), "--no-progress"]
    args += ["--k", "3", "--orders", "grip"]
    fake = [sys.executable, "-m", "tests.reliability._fake_encoder", "--sleep", "0.5", "--"]
    extra = tmp_path / "cfg.yaml"  # same settings as _cfg
    extra.write_text(TINY.read_text() + "\nvocab_size: 512\nencoder: {block_size: 8}\n")
    args[args.index(str(TINY))] = str(extra)
    a = subprocess.Popen([*fake, *args], env=_env(), cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    try:
        deadline = time.monotonic() + 120
        while not (out / "work" / "embeddings.json").exists():
            assert a.poll() is None and time.monotonic() < deadline, a.communicate()
            time.sleep(0.05)
        t0 = time.monotonic()
        b = subprocess.run([*fake, *args], env=_env(), cwd=ROOT, capture_output=True, text=True, timeout=120)
        assert time.monotonic() - t0 < 30
        assert b.returncode == 1, b.stderr
        assert f"lock {out / workdir.LOCK_NAME} held by pid {a.pid}" in b.stderr
        assert "Traceback" not in b.stderr
        assert a.wait(timeout=300) == 0, a.communicate()
    finally:
        a.kill()
    assert _comparable(out) == _comparable(reference)
    assert list(out.rglob("*.tmp")) == []


@pytest.mark.slow
def test_torchrun_ranks_share_one_lock_and_all_fail_fast_when_it_is_taken(corpus, tmp_path):
    """Under torchrun only rank 0 takes the lock (the data-parallel embed stage is unchanged:
    tests/grip_loop/test_prepare.py::test_torchrun_two_processes_equal_one). When the folder is
    locked by another run, every rank stops at once instead of waiting at a barrier."""
    out = tmp_path / "out"
    holder = _hold_lock(out)
    try:
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2"]
        cmd += ["-m", "train", "prepare", "--corpus", str(corpus), "--out", str(out), "--config", str(TINY)]
        t0 = time.monotonic()
        r = subprocess.run(cmd, env=_env(), cwd=ROOT, capture_output=True, text=True, timeout=240)
        assert r.returncode != 0
        assert time.monotonic() - t0 < 180
        assert r.stderr.count(f"held by pid {holder.pid}") >= 2, r.stderr[-3000:]  # both ranks say why
    finally:
        holder.kill()
        holder.wait()
