"""The HumanEval execution harness: canonical solutions pass, broken ones fail, limits hold."""

import time

import pytest

from train.humaneval import build_program, check_completion, load_problems, run_program, truncate_completion


@pytest.fixture(scope="module")
def problems():
    return load_problems()


def test_problems_load(problems):
    assert len(problems) == 164
    assert {"task_id", "prompt", "canonical_solution", "test", "entry_point"} <= set(problems[0])
    assert load_problems(limit=3) == problems[:3]


def test_canonical_solutions_pass(problems):
    for p in problems[::16][:10]:  # 10 problems spread over the set
        r = check_completion(p, p["canonical_solution"])
        assert r.passed and r.status == "passed", (p["task_id"], r.stderr)


def test_broken_completions_fail(problems):
    for p in problems[:4]:
        assert check_completion(p, "    return None\n").status == "failed"
        assert check_completion(p, "    this is not python\n").status == "failed"
        assert not check_completion(p, "").passed  # the prompt alone has no body


def test_infinite_loop_times_out():
    t0 = time.perf_counter()
    r = run_program("while True:\n    pass\n", timeout=1.0)
    assert r.status == "timeout" and not r.passed
    assert time.perf_counter() - t0 < 5


def test_child_processes_are_killed_on_timeout(tmp_path):
    marker = tmp_path / "alive"
    child = f"import time; time.sleep(3); open({str(marker)!r}, 'w')"
    prog = f"import subprocess, sys\nsubprocess.Popen([sys.executable, '-c', {child!r}])\nwhile True: pass\n"
    assert run_program(prog, timeout=1.0).status == "timeout"
    time.sleep(3)
    assert not marker.exists()  # the whole process group died with the program


def test_memory_hog_fails_under_the_limit():
    r = run_program("x = bytearray(2 * 1024 ** 3)\nprint(len(x))\n", timeout=10, memory_mb=256)
    assert r.status == "failed" and "MemoryError" in r.stderr


def test_runs_in_a_temp_dir_and_running_to_the_end_decides():
    assert run_program("import os\nassert 'grip-humaneval-' in os.getcwd()\n").passed
    assert run_program("raise SystemExit(3)\n").returncode == 3
    r = run_program("import sys\nsys.exit(0)\n")  # status 0, but the program did not run to its end
    assert (
        not r.passed
        and r.status == "failed"
        and r.returncode == 0
        and "before the tests finished" in r.detail
    )
    with pytest.raises(ValueError, match="timeout"):
        run_program("pass", timeout=0)


def test_truncate_and_program(problems):
    text = "    return 1\n\ndef other():\n    pass\n"
    assert truncate_completion(text) == "    return 1\n"
    assert truncate_completion("    x = 1\nif __name__ == '__main__':\n") == "    x = 1"
    prog = build_program(problems[0], "    return True\n")
    assert prog.startswith(problems[0]["prompt"]) and prog.rstrip().endswith(
        f"check({problems[0]['entry_point']})"
    )
