"""Run a function on N gloo ranks in spawned processes, for the multi-rank tests.

Why not a TCP port picked by binding port 0 and closing it: between the close and rank 0's bind,
another test (xdist runs two at once) can take the port. Rank 0 then fails, rank 1 connects to a
stranger or waits out gloo's 30-minute timeout, and the parent's wait ends in pytest-timeout's
`os._exit`, which takes the whole xdist worker down ("node down: Not properly terminated") with no
traceback. Here the ranks meet through a file in the test's tmp folder (no port at all), every
collective has a short timeout, and the parent polls: a rank that raises or dies fails the test at
once, naming the rank and carrying its traceback.
"""

from __future__ import annotations

import datetime
import queue as queue_mod
import time
import traceback
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest


def _entry(fn: Callable, rank: int, world: int, init_file: str, timeout_s: float, args: tuple, q) -> None:
    import torch
    import torch.distributed as dist

    torch.set_num_threads(1)
    status, payload = "error", None
    try:
        dist.init_process_group(
            "gloo",
            init_method=f"file://{init_file}",
            rank=rank,
            world_size=world,
            timeout=datetime.timedelta(seconds=timeout_s),
        )
        try:
            payload, status = fn(rank, world, *args), "ok"
        finally:
            dist.destroy_process_group()
    except BaseException:  # noqa: BLE001 - sent to the parent, which fails the test with it
        payload = traceback.format_exc()
    q.put((rank, status, payload))


def _late_errors(q, procs, results: dict, grace_s: float) -> list[str]:
    """After one rank's error, the others' reports for a few seconds: a peer whose collective
    broke reports too ("Connection closed by peer"), and the first to arrive need not be the cause."""
    out, deadline = [], time.monotonic() + grace_s
    while time.monotonic() < deadline:
        try:
            rank, status, payload = q.get(timeout=0.5)
        except queue_mod.Empty:
            if not any(p.is_alive() for p in procs):
                break
            continue
        if status == "ok":
            results[rank] = payload
        else:
            out.append(f"rank {rank} raised:\n{payload}")
    return out


def run_ranks(
    fn: Callable, world: int, tmp_path: Path, args: tuple = (), timeout_s: float = 300.0
) -> list[Any]:
    """`fn(rank, world, *args)` on `world` spawned gloo ranks; returns their results by rank.

    `fn` must be a module-level function (spawn pickles it by name). The test fails (never hangs)
    when a rank raises, exits without a result, or the ranks take longer than `timeout_s` together.
    """
    import torch.multiprocessing as mp

    ctx = mp.get_context("spawn")
    q = ctx.Queue()
    init_file = tmp_path / f"rendezvous-{time.monotonic_ns()}"
    procs = [
        ctx.Process(target=_entry, args=(fn, r, world, str(init_file), timeout_s, args, q), daemon=True)
        for r in range(world)
    ]
    for p in procs:
        p.start()
    results: dict[int, Any] = {}
    errors: list[str] = []
    deadline = time.monotonic() + timeout_s
    try:
        while len(results) + len(errors) < world:
            try:
                rank, status, payload = q.get(timeout=1.0)
            except queue_mod.Empty:
                dead = [r for r, p in enumerate(procs) if p.exitcode is not None and r not in results]
                if dead:  # exited without reporting (killed, segfault): give its queue a moment
                    try:
                        rank, status, payload = q.get(timeout=5.0)
                    except queue_mod.Empty:
                        errors.append(
                            f"rank {dead[0]} exited with code {procs[dead[0]].exitcode} and no result"
                        )
                        break
                elif time.monotonic() > deadline:
                    errors.append(
                        f"ranks still running after {timeout_s:.0f} s: {len(results)}/{world} reported"
                    )
                    break
                else:
                    continue
            if status == "ok":
                results[rank] = payload
            else:
                errors.append(f"rank {rank} raised:\n{payload}")
                errors += _late_errors(q, procs, results, grace_s=10.0)
                break  # the rest may wait on it in a collective: stopped below
        for p in procs:
            p.join(timeout=30 if not errors else 1)
    finally:
        for p in procs:
            if p.is_alive():
                p.kill()
                p.join(timeout=10)
    if errors:
        pytest.fail("\n".join(errors), pytrace=False)
    bad = [(r, p.exitcode) for r, p in enumerate(procs) if p.exitcode != 0]
    assert not bad, f"ranks exited non-zero after reporting: {bad}"
    return [results[r] for r in range(world)]
