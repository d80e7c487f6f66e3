"""The ingest's unique-id check: a Python set of the id strings vs `grip_loop.idset.SeenIds`.

For each N, three ways run in fresh subprocesses, interleaved, `--repeats` times: `set` (the
check before issue 16: `if id in seen ... seen.add(id)`), `SeenIds` in memory, and `SeenIds`
spilled to a memory-mapped file (what `grip prepare` uses, under work/tmp/ingest). The ids
look like corpus paths (`src/pkg/module_000123.py`, ~25 characters). Reported: microseconds per
id (median), and the process's RssAnon growth per id (private memory after the ids were added,
minus before; ids themselves are generated lazily, so they are not counted).
"""

from __future__ import annotations

import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from common import emit, median, parser  # noqa: E402

WAYS = ("set", "SeenIds", "SeenIds-spilled")


def _anon_kib() -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("RssAnon:"):
            return int(line.split()[1])
    return 0


def one(way: str, n: int) -> dict:
    from grip_loop.idset import SeenIds

    ids = (f"src/pkg/module_{i:06d}.py" for i in range(n))
    spill = tempfile.mkdtemp(prefix="grip-seen-ids-") if way == "SeenIds-spilled" else None
    before = _anon_kib()
    t0 = time.perf_counter()
    if way == "set":
        seen: set[str] = set()
        for s in ids:
            if s not in seen:
                seen.add(s)
    else:
        seen = SeenIds(spill)
        for s in ids:
            seen.add(s)
    dt = time.perf_counter() - t0
    grown = _anon_kib() - before
    assert len(seen) == n
    return {"way": way, "N": n, "us_per_id": dt / n * 1e6, "anon_bytes_per_id": grown * 1024 / n}


def main(argv=None) -> int:
    p = parser(__doc__.split("\n")[0])
    p.add_argument("--n", type=int, nargs="+", default=[1_000_000], help="ids per run")
    p.add_argument("--one", nargs=2, metavar=("WAY", "N"), help="internal: one run, JSON on stdout")
    args = p.parse_args(argv)
    if args.one:
        print(json.dumps(one(args.one[0], int(args.one[1]))))
        return 0
    ns = [20_000] if args.quick else args.n
    repeats = 1 if args.quick else args.repeats
    rows = []
    for n in ns:
        runs = {w: [] for w in WAYS}
        for _ in range(repeats):
            for w in WAYS:  # interleaved: drift on a shared machine hits every way alike
                out = subprocess.run(
                    [sys.executable, __file__, "--one", w, str(n)], capture_output=True, text=True, check=True
                )
                runs[w].append(json.loads(out.stdout.strip().splitlines()[-1]))
        base = median([r["us_per_id"] for r in runs["set"]])
        for w in WAYS:
            us = median([r["us_per_id"] for r in runs[w]])
            rows.append(
                {
                    "way": w,
                    "N": n,
                    "us_per_id": us,
                    "time_vs_set": us / base,
                    "anon_bytes_per_id": median([r["anon_bytes_per_id"] for r in runs[w]]),
                }
            )
    emit("seen_ids", rows, args, columns=["way", "N", "us_per_id", "time_vs_set", "anon_bytes_per_id"])
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
