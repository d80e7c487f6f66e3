"""The pass@1 sandbox (train/sandbox.py, train/humaneval.py): one test per escape.

Each test fails if the escape works. A test that needs a layer the kernel refused here skips
with the sandbox's own reason (and only then); on a machine that allows user namespaces, or
as root, every layer is in force and nothing skips.
"""

import os
import secrets
import socket
import sys
import tempfile
import time
import tracemalloc
import warnings
from pathlib import Path

import pytest

from train import sandbox
from train.humaneval import check_completion, load_problems, run_program

try:
    LAYERS = sandbox.describe()
except sandbox.SandboxError as e:  # the helper itself failed: every layer-dependent test skips
    LAYERS = {"reason": f"the sandbox does not start here: {e}"}


def need(*layers):
    missing = [k for k in layers if not LAYERS.get(k)]
    if missing:
        pytest.skip(f"sandbox layer(s) {missing} not in force here: {LAYERS.get('reason')}")


def split(s: str) -> str:
    """A Python expression for `s` that does not contain `s` (so the program text cannot match)."""
    return f"{s[: len(s) // 2]!r} + {s[len(s) // 2 :]!r}"


@pytest.fixture
def public_dir():
    """A directory any uid may read and write (unlike pytest's tmp_path, which is 0700): the
    sandbox, not file permissions, must keep the program out of it."""
    d = tempfile.mkdtemp(prefix="grip-sandbox-test-")
    os.chmod(d, 0o777)
    yield Path(d)
    for p in Path(d).iterdir():
        p.unlink()
    os.rmdir(d)


def processes_with(token: str) -> list[int]:
    out = []
    for name in os.listdir("/proc"):
        if name.isdigit():
            try:
                if token.encode() in Path(f"/proc/{name}/cmdline").read_bytes():
                    out.append(int(name))
            except OSError:
                pass
    return out


def assert_no_survivors(token: str) -> None:
    deadline = time.monotonic() + 3
    while processes_with(token) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert not processes_with(token), "a process started by the program outlived it"


def test_the_description_says_what_is_in_force():
    for k in sandbox.REQUIRED + ("user_ns", "ipc_ns", "uts_ns"):
        assert isinstance(LAYERS[k], bool), k
    missing = [k for k in sandbox.REQUIRED if not LAYERS[k]]
    for k in missing:  # every missing layer comes with its reason
        assert f"{k}:" in LAYERS["reason"]
    assert LAYERS["env"] == "minimal" and LAYERS["output_limit_bytes"] > 0
    if sys.platform == "linux" and (os.geteuid() == 0 or LAYERS["user_ns"]):
        assert not missing, LAYERS["reason"]  # root or a user namespace: everything is possible


def test_runs_unprivileged_without_capabilities():
    need("unprivileged")
    prog = (
        "import os\n"
        "st = dict(l.split(':', 1) for l in open('/proc/self/status') if ':' in l)\n"
        "assert int(st['CapEff'], 16) == 0 and int(st['CapPrm'], 16) == 0 and int(st['CapBnd'], 16) == 0\n"
        "assert st['NoNewPrivs'].strip() == '1'\n"
        f"assert os.getuid() == {sandbox.NOBODY} and os.getgid() == {sandbox.NOBODY}\n"
    )
    r = run_program(prog)
    assert r.passed, (r.detail, r.stderr)


def test_the_evaluators_environment_is_not_readable(monkeypatch):
    need("pid_ns", "private_root")  # the private root has a fresh /proc (or none), never the host's
    secret = secrets.token_hex(16)
    monkeypatch.setenv("GRIP_TEST_SECRET", secret)
    prog = (
        "import glob, os\n"
        f"secret = ({split(secret)}).encode()\n"
        "assert secret not in repr(os.environ).encode()\n"
        "leaks = []\n"
        "for p in glob.glob('/proc/*/environ') + glob.glob('/proc/*/cmdline') + [f'/proc/{os.getppid()}/environ']:\n"
        "    try:\n"
        "        data = open(p, 'rb').read()\n"
        "    except OSError:\n"
        "        continue\n"
        "    if secret in data:\n"
        "        leaks.append(p)\n"
        "assert not leaks, leaks\n"
        "pids = [int(n) for n in os.listdir('/proc') if n.isdigit()]\n"
        "assert max(pids) < 100, pids  # a PID namespace of its own: only its own few processes\n"
    )
    r = run_program(prog)
    assert r.passed, (r.detail, r.stderr)


def test_files_outside_the_work_dir_are_not_readable(public_dir):
    need("private_root")
    secret = public_dir / "secret.txt"
    secret.write_text("s3cret")
    os.chmod(secret, 0o644)
    this_file = Path(__file__).resolve()
    prog = (
        "import os\n"
        f"for p in [{str(secret)!r}, {str(this_file)!r}, '/etc/passwd', '/etc/shadow', '/root/.bashrc']:\n"
        "    try:\n"
        "        open(p).read()\n"
        "    except OSError:\n"
        "        continue\n"
        "    raise AssertionError(f'read {p}')\n"
        f"assert not os.path.exists({str(public_dir)!r})\n"
        f"assert not os.path.exists({str(this_file.parent)!r})\n"
        "assert not os.path.exists('/sys/class') and not os.path.exists('/home')\n"
    )
    r = run_program(prog)
    assert r.passed, (r.detail, r.stderr)


def test_writes_outside_the_work_dir_do_not_reach_the_host(public_dir):
    need("private_root")
    token = secrets.token_hex(8)
    targets = [
        public_dir / "escaped",
        Path(f"/tmp/grip-escape-{token}"),
        Path(f"/dev/shm/grip-escape-{token}"),
        Path(f"/var/tmp/grip-escape-{token}"),
        Path(sys.prefix) / f"grip-escape-{token}",
        Path(f"/usr/grip-escape-{token}"),
    ]
    prog = (
        "import os\n"
        "open('inside.txt', 'w').write('ok')  # the work dir is writable\n"
        f"for p in {[str(t) for t in targets]!r}:\n"
        "    try:\n"
        "        os.makedirs(os.path.dirname(p), exist_ok=True)\n"
        "        open(p, 'w').write('escaped')\n"
        "    except OSError:\n"
        "        pass\n"
    )
    try:
        r = run_program(prog)
        assert r.passed, (r.detail, r.stderr)
        assert not [t for t in targets if t.exists()]
    finally:
        for t in targets:
            if t.exists():
                t.unlink()


def test_writes_are_capped(public_dir):
    need("private_root")
    prog = (
        "try:\n"
        "    with open('big', 'wb') as fh:\n"
        "        for _ in range(200):\n"
        "            fh.write(b'x' * (1 << 20))\n"
        "except OSError as e:\n"
        "    print('stopped:', e)\n"
        "else:\n"
        "    raise AssertionError('wrote 200 MiB')\n"
    )
    r = run_program(prog)
    assert r.passed and "stopped" in r.stdout, (r.detail, r.stderr)


def test_no_network_not_even_localhost():
    need("net_ns")
    tcp = socket.create_server(("127.0.0.1", 0))
    udp = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    udp.bind(("127.0.0.1", 0))
    unix_name = f"\0grip-sandbox-test-{secrets.token_hex(6)}"  # abstract: per network namespace
    unix = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    unix.bind(unix_name)
    unix.listen()
    tcp.setblocking(False)
    unix.setblocking(False)
    udp.setblocking(False)
    try:
        prog = (
            "import socket\n"
            "def refused(f):\n"
            "    try:\n"
            "        f()\n"
            "    except OSError:\n"
            "        return True\n"
            "    return False\n"
            f"assert refused(lambda: socket.create_connection(('127.0.0.1', {tcp.getsockname()[1]}), timeout=1))\n"
            "assert refused(lambda: socket.create_connection(('1.1.1.1', 53), timeout=1))\n"
            f"u = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)\nassert refused(lambda: u.connect({unix_name!r}))\n"
            "d = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)\n"
            f"assert refused(lambda: d.sendto(b'x', ('127.0.0.1', {udp.getsockname()[1]})))\n"
        )
        r = run_program(prog)
        assert r.passed, (r.detail, r.stderr)
        for s in (tcp, unix):
            with pytest.raises(BlockingIOError):
                s.accept()
        with pytest.raises(BlockingIOError):
            udp.recvfrom(16)
    finally:
        for s in (tcp, udp, unix):
            s.close()


SPAWNERS = {
    "child": "subprocess.Popen([sys.executable, '-c', SLEEP, TOKEN])",
    "setsid": "subprocess.Popen([sys.executable, '-c', SLEEP, TOKEN], start_new_session=True)",
    "double-fork": (
        "if os.fork() == 0:\n"
        "    os.setsid()\n"
        "    if os.fork() == 0:\n"
        "        signal.signal(signal.SIGTERM, signal.SIG_IGN)\n"
        "        signal.signal(signal.SIGHUP, signal.SIG_IGN)\n"
        "        os.execv(sys.executable, [sys.executable, '-c', SLEEP, TOKEN])\n"
        "    os._exit(0)\n"
        "time.sleep(0.3)"
    ),
}
MODES = {  # the full sandbox, the no-PID-namespace fallback (subreaper), and isolation off
    "sandbox": {},
    "no-pid-ns": {"force_off": ("pid_ns",)},
    "isolation-off": {"isolation": "off"},
}


def _spawner_program(how: str, token: str, then: str) -> str:
    return (
        "import os, signal, subprocess, sys, time\n"
        "SLEEP = 'import time; time.sleep(30)'\n"
        f"TOKEN = {split(token)}\n" + SPAWNERS[how] + "\n" + then
    )


@pytest.mark.filterwarnings("ignore:pass@1 sandbox")
@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("how", SPAWNERS)
def test_background_processes_die_with_the_program(how, mode):
    token = f"grip-bg-{secrets.token_hex(6)}"
    r = sandbox.run_python(_spawner_program(how, token, "print('spawned')\n"), timeout=10, **MODES[mode])
    assert r["returncode"] == 0 and b"spawned" in r["stdout"], r["stderr"]
    assert_no_survivors(token)


@pytest.mark.filterwarnings("ignore:pass@1 sandbox")
@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("how", ["setsid", "double-fork"])
def test_detached_processes_die_at_the_timeout(how, mode):
    token = f"grip-to-{secrets.token_hex(6)}"
    t0 = time.monotonic()
    r = sandbox.run_python(
        _spawner_program(how, token, "while True:\n    pass\n"), timeout=1.5, **MODES[mode]
    )
    assert r["timed_out"] and r["returncode"] is None
    assert time.monotonic() - t0 < 30
    assert_no_survivors(token)


def test_process_count_is_capped():
    need("nproc")
    prog = (
        "import os, time\n"
        "n = 0\n"
        "for _ in range(200):\n"
        "    try:\n"
        "        pid = os.fork()\n"
        "    except OSError:\n"
        "        break\n"
        "    if pid == 0:\n"
        "        time.sleep(20)\n"
        "        os._exit(0)\n"
        "    n += 1\n"
        "print('forked', n)\n"
    )
    r = run_program(prog, max_processes=8, timeout=5)
    assert r.passed, (r.detail, r.stderr)
    n = int(r.stdout.split("forked")[1])
    assert 0 < n < 8


def test_a_fork_bomb_is_contained():
    need("nproc", "pid_ns")
    t0 = time.monotonic()
    r = run_program(
        "import os\nwhile True:\n    try:\n        os.fork()\n    except OSError:\n        pass\n",
        timeout=1.5,
    )
    assert r.status == "timeout" and not r.passed
    assert time.monotonic() - t0 < 30


@pytest.mark.parametrize("stream", ["stdout", "stderr"])
def test_huge_output_is_capped_while_it_is_read(stream):
    prog = f"import sys\nchunk = 'x' * (1 << 20)\nfor _ in range(500):\n    sys.{stream}.write(chunk)\n"
    tracemalloc.start()
    try:
        t0 = time.monotonic()
        r = run_program(prog, timeout=20, max_output_bytes=1 << 20)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert not r.passed and r.status == "failed" and "output limit" in r.detail
    assert time.monotonic() - t0 < 60  # killed at the cap, not after 500 MB
    assert peak < 16 << 20, f"the evaluator held {peak >> 20} MiB"
    assert len(getattr(r, stream)) <= 2000


# An early exit with status 0, from the function body (runs inside check()) or from module
# level (runs before the tests). Each must fail; the reference harness fails them all.
EARLY_EXITS = {
    "exit()": "    exit()\n",
    "quit()": "    quit()\n",
    "exit(0)": "    exit(0)\n",
    "sys.exit()": "    import sys\n    sys.exit()\n",
    "sys.exit(0)": "    import sys\n    sys.exit(0)\n",
    "sys.exit(False)": "    import sys\n    sys.exit(False)\n",
    "sys.exit(None)": "    import sys\n    sys.exit(None)\n",
    "os._exit(0)": "    import os\n    os._exit(0)\n",
    "raise SystemExit": "    raise SystemExit\n",
    "raise SystemExit(0)": "    raise SystemExit(0)\n",
    "builtins.exit": "    import builtins\n    builtins.exit(0)\n",
    "overridden exit": "    import builtins, sys\n    builtins.exit = lambda *a: sys.exit(0)\n    exit(1)\n",
    "SIGKILL self": "    import os, signal\n    os.kill(os.getpid(), signal.SIGKILL)\n",
    "SIGTERM self": "    import os, signal\n    os.kill(os.getpid(), signal.SIGTERM)\n",
    "SIGTERM handler exits 0": (
        "    import os, signal\n"
        "    signal.signal(signal.SIGTERM, lambda *a: os._exit(0))\n"
        "    os.kill(os.getpid(), signal.SIGTERM)\n"
    ),
    "alarm handler exits 0": (
        "    import os, signal, time\n"
        "    signal.signal(signal.SIGALRM, lambda *a: os._exit(0))\n"
        "    signal.setitimer(signal.ITIMER_REAL, 0.01)\n"
        "    time.sleep(5)\n"
    ),
    "exec /bin/true": "    import os\n    os.execv('/bin/true', ['true'])\n",
    "exec python": "    import os, sys\n    os.execv(sys.executable, [sys.executable, '-c', 'pass'])\n",
    "kill the parent": "    import os, signal\n    os.kill(os.getppid(), signal.SIGKILL)\n    os._exit(0)\n",
    "module-level sys.exit(0)": "    return True\nimport sys\nsys.exit(0)\n",
    "module-level os._exit(0)": "    return True\nimport os\nos._exit(0)\n",
    "atexit os._exit(0) after an error": "    return True\nimport atexit, os\natexit.register(os._exit, 0)\nraise ValueError\n",
    "excepthook exits 0": "    return True\nimport os, sys\nsys.excepthook = lambda *a: os._exit(0)\nraise ValueError\n",
    "close stdout, exit 0": "    import os\n    os.close(1)\n    os._exit(0)\n",
}


@pytest.fixture(scope="module")
def problem():
    return load_problems(limit=1)[0]


@pytest.mark.parametrize("name", EARLY_EXITS)
def test_an_early_exit_with_status_0_is_not_a_pass(problem, name):
    r = check_completion(problem, EARLY_EXITS[name])
    assert not r.passed and r.status != "passed", r


def test_a_correct_completion_still_passes(problem):
    r = check_completion(problem, problem["canonical_solution"])
    assert r.passed and r.status == "passed" and r.returncode == 0, (r.detail, r.stderr)
    # output, threads left running and atexit handlers after the tests do not matter
    noisy = (
        problem["canonical_solution"]
        + "\nimport atexit, os, threading, time\n"
        + "print('hello')\n"
        + "atexit.register(os._exit, 3)\n"
        + "threading.Thread(target=time.sleep, args=(60,)).start()\n"
    )
    r = check_completion(problem, noisy)
    assert r.passed and "hello" in r.stdout, (r.detail, r.stderr)


def test_a_missing_layer_warns_once_and_is_recorded():
    sandbox._WARNED.clear()
    with pytest.warns(RuntimeWarning, match="NOT in force: net_ns"):
        r = sandbox.run_python("", force_off=("net_ns",))
    assert r["layers"]["net_ns"] is False and "net_ns: disabled by the caller" in r["layers"]["reason"]
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # the second time: no warning
        sandbox.run_python("", force_off=("net_ns",))


def test_strict_isolation_refuses_to_run_without_a_layer():
    with pytest.raises(sandbox.SandboxError, match="strict.*net_ns"):
        sandbox.run_python("print('ran')", isolation="strict", force_off=("net_ns",))
    if not [k for k in sandbox.REQUIRED if not LAYERS[k]]:
        assert sandbox.run_python("print('ran')", isolation="strict")["stdout"] == b"ran\n"


def test_root_without_a_user_namespace_drops_to_nobody():
    if os.geteuid() != 0:
        pytest.skip("only root can run the sandbox without a user namespace")
    r = sandbox.run_python(
        "import os\nprint(os.getuid(), os.getgid(), os.getgroups())", force_off=("user_ns",), timeout=10
    )
    assert r["stdout"].split()[:2] == [b"65534", b"65534"], r["stderr"]
    box = r["layers"]
    assert box["user_ns"] is False and box["unprivileged"] and box["pid_ns"] and box["private_root"]
    assert "nproc:" in box["reason"]  # the count is shared with the host's nobody: said so


def test_the_program_cannot_write_to_the_sandbox_status_channel():
    # the helpers report layers, errors and the exit status on a pipe; a program that could
    # write to it could forge them (or make the evaluator raise)
    prog = (
        "import json, os\n"
        "forged = 0\n"
        "for fd in range(3, 1024):\n"
        "    for line in ({'error': 'forged'}, {'rc': 0}, {'layers': {'net_ns': 'forged'}}):\n"
        "        try:\n"
        "            os.write(fd, (json.dumps(line) + '\\n').encode())\n"
        "            forged += 1\n"
        "        except OSError:\n"
        "            pass\n"
        "print('forged', forged)\n"
    )
    r = run_program(prog)
    assert r.passed and "forged 0" in r.stdout, (r.detail, r.stdout, r.stderr)
    assert r.sandbox["net_ns"] is LAYERS["net_ns"]


@pytest.mark.filterwarnings("ignore:pass@1 sandbox")
@pytest.mark.parametrize("mode", MODES)
def test_signalling_the_sandbox_helpers_is_never_a_sandbox_error(mode):
    # the program's parent is the sandbox's init (C); where it shares C's uid (an unprivileged
    # user namespace, or isolation off) it can signal it. C has no Python handler to trigger:
    # as PID 1 of the namespace it ignores them, and without one it just dies (the run fails)
    prog = (
        "import os, signal, time\n"
        "for sig in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP, signal.SIGUSR1, signal.SIGALRM):\n"
        "    try:\n"
        "        os.kill(os.getppid(), sig)\n"
        "    except OSError:\n"
        "        pass\n"
        "time.sleep(0.3)\n"
        "print('still here')\n"
    )
    r = sandbox.run_python(prog, timeout=10, **MODES[mode])  # must not raise SandboxError
    if mode == "sandbox" and LAYERS.get("pid_ns"):
        assert r["returncode"] == 0 and r["stdout"] == b"still here\n", r["stderr"]
