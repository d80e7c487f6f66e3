"""The ingest's unique-id check: a Python set of the id strings vs `grip_loop.idset.SeenIds`.

For each N, three ways run in fresh subprocesses, interleaved, `--repeats` times: `set` (the
check before issue 16: `if id in seen ... seen.add(id)`), `SeenIds` in memory, and `SeenIds`
spilled to a file (what `grip prepare` uses, under work/tmp/ingest). The ids look like corpus
paths (`src/pkg/module_000123.py`, ~25 characters). Reported: microseconds per id (median), the
process's RssAnon growth per id (private memory after the ids were added, minus before; ids
themselves are generated lazily, so they are not counted), and its largest growth of mapped
file pages (VmRSS - RssAnon, sampled every 4096 ids) per id.

`--before-root DIR` also runs the spilled way from another checkout (`SeenIds-spilled@before`),
interleaved with the others: a side-by-side A/B of a change to `grip_loop.idset`.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import emit, median, parser  # noqa: E402  (puts this checkout on the path)

if os.environ.get("GRIP_BENCH_ROOT"):  # `--before-root`: the other checkout's grip_loop, first
    sys.path.insert(0, os.environ["GRIP_BENCH_ROOT"])

WAYS = ("set", "SeenIds", "SeenIds-spilled")


def _status_kib(field: str = "RssAnon") -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(f"{field}:"):
            return int(line.split()[1])
    return 0


def _mapped_kib() -> int:
    return _status_kib("VmRSS") - _status_kib("RssAnon")


def one(way: str, n: int) -> dict:
    from grip_loop.idset import SeenIds

    ids = (f"src/pkg/module_{i:06d}.py" for i in range(n))
    spill = tempfile.mkdtemp(prefix="grip-seen-ids-") if way == "SeenIds-spilled" else None
    before, mapped0, mapped = _status_kib(), _mapped_kib(), 0
    t0 = time.perf_counter()
    if way == "set":
        seen: set[str] = set()
        for s in ids:
            if s not in seen:
                seen.add(s)
    else:
        seen = SeenIds(spill)
        for i, s in enumerate(ids):
            seen.add(s)
            if not i % 4096:
                mapped = max(mapped, _mapped_kib() - mapped0)  # ~10 us per 4096 ids
    dt = time.perf_counter() - t0
    grown = _status_kib() - before
    mapped = max(mapped, _mapped_kib() - mapped0)
    assert len(seen) == n
    return {
        "way": way,
        "N": n,
        "us_per_id": dt / n * 1e6,
        "anon_bytes_per_id": grown * 1024 / n,
        "mapped_bytes_per_id": mapped * 1024 / n,
        "module": sys.modules[SeenIds.__module__].__file__,
    }


def main(argv=None) -> int:
    p = parser(__doc__.split("\n")[0])
    p.add_argument("--n", type=int, nargs="+", default=[1_000_000], help="ids per run")
    p.add_argument("--one", nargs=2, metavar=("WAY", "N"), help="internal: one run, JSON on stdout")
    p.add_argument("--before-root", type=Path, help="a checkout whose spilled SeenIds runs beside this one's")
    args = p.parse_args(argv)
    if args.one:
        print(json.dumps(one(args.one[0], int(args.one[1]))))
        return 0
    ns = [20_000] if args.quick else args.n
    repeats = 1 if args.quick else args.repeats
    rows = []
    for n in ns:
        ways = [*WAYS, *(["SeenIds-spilled@before"] if args.before_root else [])]
        runs = {w: [] for w in ways}
        for _ in range(repeats):
            for w in ways:  # interleaved: drift on a shared machine hits every way alike
                env = None  # "@before": this script, importing the other checkout's grip_loop
                if w.endswith("@before"):
                    env = {**os.environ, "GRIP_BENCH_ROOT": str(args.before_root.resolve())}
                cmd = [sys.executable, __file__, "--one", w.split("@")[0], str(n)]
                out = subprocess.run(cmd, capture_output=True, text=True, check=True, env=env)
                runs[w].append(json.loads(out.stdout.strip().splitlines()[-1]))
        base = median([r["us_per_id"] for r in runs["set"]])
        for w in ways:
            us = median([r["us_per_id"] for r in runs[w]])
            rows.append(
                {
                    "way": w,
                    "N": n,
                    "us_per_id": us,
                    "time_vs_set": us / base,
                    "anon_bytes_per_id": median([r["anon_bytes_per_id"] for r in runs[w]]),
                    "mapped_bytes_per_id": median([r["mapped_bytes_per_id"] for r in runs[w]]),
                }
            )
    columns = ["way", "N", "us_per_id", "time_vs_set", "anon_bytes_per_id", "mapped_bytes_per_id"]
    emit("seen_ids", rows, args, columns=columns)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
