"""What every stage of `grip prepare` shares: the key of a stage's inputs, the check of its
record before a resume trusts it, derived seeds, and the per-stage timings of the manifest."""

from __future__ import annotations

import hashlib
import json
import time
from pathlib import Path

import numpy as np

from grip_loop import workdir


def _key(*parts) -> str:
    return hashlib.sha256(json.dumps(parts, sort_keys=True, default=str).encode()).hexdigest()[:32]


_atomic_json, _atomic_npy, _atomic_npz = workdir.atomic_json, workdir.atomic_npy, workdir.atomic_npz


class _Damaged(Exception):
    """A stage file that cannot be trusted; the stage is redone."""


def _note(path: Path, problem: str, stage: str) -> None:
    print(f"note: {path}: {problem}; redoing the {stage} stage")


def _finished(meta: Path, key: str, stage: str) -> dict | None:
    """The stage's record if it finished with this key, else None (the stage runs). A record
    that exists but cannot be read (empty, cut short: a crash or a full disk) is reported."""
    info, problem = workdir.read_json(meta)
    if problem == "missing":
        return None
    if problem:
        _note(meta, problem, stage)
        return None
    return info if info.get("key") == key else None


_file_sha256 = workdir.file_sha256


def _seed(seed: int, *parts: int) -> int:
    return int(np.random.SeedSequence([seed, *parts]).generate_state(1)[0])


# stages of this run that were taken from OUT/work as they were (reported as "cached", not timed)
_CACHED: set[str] = set()


def _cached(stage: str, record: Path) -> None:
    _CACHED.add(stage)
    print(f"{stage}: cached ({record})")


class _Timer:
    """Each stage's seconds and docs/s (`manifest.stats.timings`); with `log`, one line per stage
    as it ends (rank 0 of a run with progress on: the progress of a long run between its bars)."""

    def __init__(self, log: bool = False) -> None:
        self.stages: dict[str, dict] = {}
        self.log = log

    def record(self, name: str, t0: float, n: int, skipped: bool = False) -> None:
        skipped = skipped or name in _CACHED
        s = time.perf_counter() - t0
        self.stages[name] = {
            "seconds": round(s, 3),
            "docs": n,
            "docs_per_s": round(n / s, 1) if s > 0 else None,
        }
        if skipped:
            self.stages[name]["resumed"] = True
        workdir.release_memory()  # what the stage freed goes back, not held into the next one
        if self.log:
            rate = "cached" if skipped else f"{n / s:,.0f} docs/s" if s > 0 else "-"
            print(f"grip prepare: {name} done: {n:,} docs in {s:.1f} s ({rate})", flush=True)


def _sha_matches(path: Path, want) -> bool:
    try:
        return _file_sha256(path) == want
    except OSError:
        return False
