"""Shared benchmark plumbing: repeated timing, medians, a JSON line and a markdown table.

Every benchmark prints exactly one line that starts with `{"benchmark": ...}` (machine-readable,
parsed by `tests/benchmarks/test_benchmarks_smoke.py`) followed by a markdown table of the same
rows. Figures are medians of `repeats` runs; ratios are computed inside one run, side by side,
because the build machine is shared and absolute numbers drift between runs.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:  # run as `python benchmarks/x.py` from anywhere
    sys.path.insert(0, str(ROOT))

DATA = ROOT / ".bench-data"  # generated corpora (git-ignored)


def parser(description: str) -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=description)
    p.add_argument("--quick", action="store_true", help="tiny sizes: a smoke test in a few seconds")
    p.add_argument("--repeats", type=int, default=3, help="timed repeats per measurement (median reported)")
    p.add_argument("--json-out", type=Path, default=None, help="also write the JSON result to this file")
    return p


def timed(fn: Callable[[], object], repeats: int, warmup: int = 0) -> tuple[list[float], object]:
    """Wall seconds of `repeats` calls (after `warmup` untimed calls) and the last result."""
    out = None
    for _ in range(warmup):
        out = fn()
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        out = fn()
        times.append(time.perf_counter() - t0)
    return times, out


def median(xs) -> float:
    return float(statistics.median(xs))


def peak_rss_mb() -> float:
    """Peak resident memory of this process (ru_maxrss is KiB on Linux)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def rss_mb() -> float:
    """Current resident memory of this process."""
    with open("/proc/self/statm") as fh:
        return int(fh.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


def machine() -> dict:
    import numpy as np
    import torch

    return {
        "python": platform.python_version(),
        "torch": torch.__version__,
        "numpy": np.__version__,
        "cpus": os.cpu_count(),
        "threads": torch.get_num_threads(),
        "executable": sys.executable,
    }


def _fmt(v) -> str:
    if isinstance(v, float):
        if v != v:
            return "-"
        if abs(v) >= 1000:
            return f"{v:,.0f}"
        if abs(v) >= 10:
            return f"{v:.1f}"
        if abs(v) >= 0.01 or v == 0:
            return f"{v:.3f}"
        return f"{v:.2e}"
    return "-" if v is None else str(v)


def markdown(rows: list[dict], columns: list[str] | None = None) -> str:
    if not rows:
        return "(no rows)"
    columns = columns or list(rows[0])
    lines = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    lines += ["| " + " | ".join(_fmt(r.get(c)) for c in columns) + " |" for r in rows]
    return "\n".join(lines)


def emit(name: str, rows: list[dict], args, columns: list[str] | None = None, **extra) -> dict:
    """Print the JSON line and the markdown table; optionally write the JSON to a file."""
    result = {"benchmark": name, "quick": bool(args.quick), "machine": machine(), **extra, "rows": rows}
    line = json.dumps(result, default=float)
    print(line, flush=True)
    print()
    print(markdown(rows, columns), flush=True)
    if args.json_out is not None:
        args.json_out.parent.mkdir(parents=True, exist_ok=True)
        args.json_out.write_text(line + "\n")
    return result
