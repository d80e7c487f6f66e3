"""Run one untrusted Python program in a sandbox built from Linux namespaces (stdlib only).

The evaluator calls `run_python`; it starts `_sandbox_helper.py` (next to this file) as a
helper (`python -I -S _sandbox_helper.py CONFIG`), which builds the sandbox and runs the program in it. Process tree, outside in:

    evaluator ─ A (helper: child subreaper, writes the id maps, kills the tree at the end)
                └ B (unshares the namespaces: user, mount, pid, net, ipc, uts)
                  └ C (PID 1 of the new PID namespace: builds the private root, reaps)
                    └ D (drops to an unprivileged uid, no capabilities, no_new_privs,
                         rlimits; exec python)

Layers, and what each one stops:

* user namespace (or, as root without one, a setresuid to nobody): the program runs as
  uid 65534 with no capabilities and `no_new_privs` set; RLIMIT_NPROC then counts only the
  program's own processes (in its own user namespace);
* PID namespace + a fresh /proc: the program sees only its own processes (not the
  evaluator's `/proc/<pid>/environ` or command line), and when C (PID 1) exits or is killed
  the kernel kills every process in the namespace, `setsid` and double-fork included;
* network namespace: only a loopback device that is down, so no connection anywhere
  (localhost and abstract unix sockets of the host included);
* mount namespace + pivot_root into a tmpfs: the program sees the system directories
  (/usr, /bin, /lib*, the Python installation and venv) read-only, a few /dev nodes, its own
  /proc, and a private size-capped tmpfs /tmp holding its working directory, the only
  writable place. Nothing else of the host file system is visible;
* IPC and UTS namespaces: no System V IPC with the host, a hostname of its own;
* rlimits (address space, CPU, open files, file size, core dumps, processes);
* a minimal environment (PATH, HOME, TMPDIR, LANG);
* stdout and stderr read by the evaluator with a byte cap, streaming (the tree is killed on
  overflow), and a wall-clock timeout that kills the whole tree.

Where the kernel refuses a layer, the run goes on without it (`isolation="auto"`, the
default), the evaluator warns once, and the description (`SandboxResult.layers`,
`describe`) says what was in force and why not; `isolation="strict"` refuses to run the
program instead, and `"off"` keeps only the limits, the environment, the output cap and the
process-tree kill (by the subreaper). It is not a virtual machine: no seccomp filter, the
whole kernel interface is reachable, and a kernel exploit escapes it.
"""

from __future__ import annotations

import json
import os
import signal
import sys
import time

from train import _sandbox_helper as _helper
from train._sandbox_helper import ISOLATION_MODES, NOBODY, REQUIRED  # noqa: F401  (NOBODY: re-exported)

# ---------------------------------------------------------------- evaluator side


class SandboxError(RuntimeError):
    """The sandbox could not run the program (e.g. a required layer is missing under
    `isolation="strict"`)."""


_WARNED: set = set()


def _python_paths() -> list[str]:
    """System directories and the Python installation, bound read-only into the sandbox."""
    paths = ["/usr", "/bin", "/sbin", "/lib", "/lib64", "/lib32", "/libx32"]
    paths += ["/etc/ld.so.cache", "/etc/ld.so.conf", "/etc/ld.so.conf.d", "/etc/localtime"]
    cands = {sys.prefix, sys.base_prefix, sys.exec_prefix, sys.base_exec_prefix}
    exe = os.path.realpath(sys.executable)
    cands.add(os.path.dirname(os.path.dirname(exe)))
    for p in sorted(cands, key=len):
        p = os.path.realpath(p)
        if p != "/" and not any(p == q or p.startswith(q.rstrip("/") + "/") for q in paths):
            paths.append(p)
    return paths


def run_python(
    program: str,
    *,
    args: tuple[str, ...] = (),
    stdin: bytes = b"",
    timeout: float = 5.0,
    memory_mb: int = 1024,
    max_output_bytes: int = 1 << 20,
    max_processes: int = 32,
    tmpfs_mb: int = 64,
    isolation: str = "auto",
    force_off: tuple[str, ...] = (),
) -> dict:
    """Run `python -I *args program.py` in the sandbox; return a dict with `returncode`
    (None on timeout or overflow), `stdout`, `stderr` (bytes, at most `max_output_bytes`
    each), `timed_out`, `output_overflow`, and `layers` (what was in force)."""
    import selectors
    import subprocess
    import tempfile

    if isolation not in ISOLATION_MODES:
        raise ValueError(f"isolation: must be one of {ISOLATION_MODES}, got {isolation!r}")
    if max_processes < 1:
        raise ValueError(f"max_processes: must be >= 1, got {max_processes}")
    if max_output_bytes < 1:
        raise ValueError(f"max_output_bytes: must be >= 1, got {max_output_bytes}")
    with tempfile.TemporaryDirectory(prefix="grip-humaneval-") as tmp:
        os.mkdir(os.path.join(tmp, "root"))
        with open(os.path.join(tmp, "program.py"), "w", encoding="utf-8") as fh:
            fh.write(program)
        status_r, status_w = os.pipe()
        cfg = {
            "parent": os.getpid(),
            "workdir": tmp,
            "root": os.path.join(tmp, "root"),
            "program_name": "program.py",
            "python": sys.executable,
            "args": list(args),
            "ro_paths": _python_paths(),
            "timeout": float(timeout),
            "memory_mb": int(memory_mb),
            "cpu_s": int(timeout) + 1,
            "max_processes": int(max_processes),
            "tmpfs_mb": int(tmpfs_mb),
            "isolation": isolation,
            "force_off": list(force_off),
            "status_fd": status_w,
        }
        t0 = time.monotonic()
        try:
            proc = subprocess.Popen(
                [sys.executable, "-I", "-S", os.path.abspath(_helper.__file__), json.dumps(cfg)],
                stdin=subprocess.PIPE,
                stdout=subprocess.PIPE,
                stderr=subprocess.PIPE,
                env={"PATH": "/usr/bin:/bin", "LANG": "C.UTF-8"},
                pass_fds=(status_w,),
                start_new_session=True,  # its own process group: the last-resort kill
            )
        finally:
            os.close(status_w)
        try:
            proc.stdin.write(stdin)
            proc.stdin.close()
        except OSError:
            pass
        out_fd, err_fd = proc.stdout.fileno(), proc.stderr.fileno()
        bufs = {out_fd: bytearray(), err_fd: bytearray(), status_r: bytearray()}
        caps = {out_fd: max_output_bytes, err_fd: max_output_bytes, status_r: 1 << 20}
        sel = selectors.DefaultSelector()
        for fd in bufs:
            os.set_blocking(fd, False)
            sel.register(fd, selectors.EVENT_READ)
        deadline = t0 + timeout
        timed_out = overflow = False
        exited_at = None
        try:
            while sel.get_map():
                left = deadline - time.monotonic()
                if left <= 0:
                    timed_out = True
                    break
                if exited_at is None and proc.poll() is not None:
                    exited_at = time.monotonic()
                if exited_at is not None and time.monotonic() - exited_at > 1.0:
                    break  # A killed the whole tree before it exited; nothing should hold the pipes
                for key, _ in sel.select(min(left, 0.5)):
                    fd = key.fd
                    try:
                        chunk = os.read(fd, 65536)
                    except BlockingIOError:
                        continue
                    if not chunk:
                        sel.unregister(fd)
                        continue
                    room = caps[fd] - len(bufs[fd])
                    bufs[fd] += chunk[:room]
                    if len(chunk) > room:
                        overflow = fd != status_r or overflow
                        if fd == status_r:
                            sel.unregister(fd)
                if overflow:
                    break
        finally:
            sel.close()
            if timed_out or overflow or proc.poll() is None:
                _stop(proc)
            else:
                proc.wait()
            os.close(status_r)
            proc.stdout.close()
            proc.stderr.close()
    info: dict = {}
    for line in bytes(bufs[status_r]).splitlines():
        try:
            msg = json.loads(line)
        except ValueError:
            continue
        for k, v in msg.items():
            info[k] = v
    if "error" in info:  # the program never ran (the helpers write errors only before its exec)
        raise SandboxError(info["error"])
    layers = _describe(info, isolation, max_output_bytes, memory_mb)
    _warn_once(layers)
    return {
        "returncode": None if (timed_out or overflow) else info.get("rc", proc.returncode),
        "stdout": bytes(bufs[out_fd]),
        "stderr": bytes(bufs[err_fd]),
        "timed_out": timed_out,
        "output_overflow": overflow,
        "layers": layers,
        "seconds": time.monotonic() - t0,
    }


def _stop(proc) -> None:
    """Ask A to kill the tree (it is the subreaper of every orphan), then kill its group."""
    try:
        proc.send_signal(signal.SIGTERM)
        proc.wait(timeout=2.0)
    except (OSError, Exception):
        pass
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        pass
    proc.wait()


def _describe(info: dict, isolation: str, max_output_bytes: int, memory_mb: int) -> dict:
    layers = dict(info.get("layers") or {})
    ident = info.get("identity") or {}
    if ident:
        layers["uid"] = ident.get("uid")
        layers["no_new_privs"] = ident.get("no_new_privs")
    layers.update(
        isolation=isolation, env="minimal", output_limit_bytes=max_output_bytes, memory_mb=memory_mb
    )
    return layers


def _warn_once(layers: dict) -> None:
    missing = tuple(k for k in REQUIRED if k in layers and not layers[k])
    if not missing or layers.get("isolation") == "off" or missing in _WARNED:
        return
    _WARNED.add(missing)
    import logging
    import warnings

    msg = (
        f"pass@1 sandbox: NOT in force: {', '.join(missing)}; generated code runs with less isolation "
        f"({layers.get('reason', '')}). Recorded as `sandbox` in eval.json."
    )
    logging.getLogger(__name__).warning(msg)
    warnings.warn(msg, RuntimeWarning, stacklevel=3)


_DESCRIBED: dict = {}


def describe(isolation: str = "auto") -> dict:
    """What the sandbox puts in force on this machine (runs one empty program, once per
    process and mode)."""
    if isolation not in _DESCRIBED:
        _DESCRIBED[isolation] = run_python("", isolation=isolation, timeout=10.0)["layers"]
    return dict(_DESCRIBED[isolation])
