"""`grip prepare` stage 7, write: every shard stream cut into units, the units spread over the
torchrun ranks, each unit written atomically and skipped on resume.

A *stream* is the documents of one shard prefix in order: `shards/<order>/cluster-KKKKK/shard`
(one per cluster and order), `probe/cluster-KKKKK` (one per cluster) and `heldout/<lang>` (one
per held-out language). Rank 0 lays the streams out (`plan`: `work/write/plan.json`, the units
in `units.npy` and `plan.npy`, the documents of every stream back to back) after the geometry and judge stages;
every rank reads the plan from disk.

A *unit* is a stream, or one shard of it: a stream of more than `shard_max_docs` documents is
cut at every `shard_max_docs`-th document whenever an upper bound of the bytes of each piece
proves that the writer's byte limit (`shards.MAX_SHARD_BYTES`) cannot end a shard earlier, so
the pieces are exactly the shards one writer would have written; otherwise the stream is one
unit. So one huge cluster does not serialise the stage, and the shards' names and bytes do not
depend on how the units are spread.

Units go to ranks by greedy balancing of their bytes (largest first, to the least loaded rank;
deterministic). A unit writes its shards (temp name, fsync, rename: `shards.ShardWriter`) and
then its record `work/write/<unit>.json` (the plan's key and every shard's path, counts and
sha256). A re-run with the same plan skips a unit whose record, shards and indexes check out
and redoes the rest; a different plan (another config, other clusters) removes every shard
first. A unit that fails is named on stderr, and every rank stops. A unit being written has a
marker `work/write/<unit>.started` (its rank) until its record is written: a process killed
outright (SIGKILL, out of memory) cannot name its unit, so the re-run names it from the marker
as it rewrites it. Rank 0 builds the manifest from the records, after every rank has finished.
"""

from __future__ import annotations

import hashlib
import heapq
import json
import os
import shutil
import sys
from pathlib import Path

import numpy as np

from grip_loop import distributed, workdir
from grip_loop.manifest import ShardInfo
from grip_loop.prepare_common import _atomic_json, _atomic_npy, _file_sha256, _finished, _key
from grip_loop.shards import MAX_SHARD_BYTES, ShardWriter, index_path

PLAN = "plan.json"
UNITS = "units.npy"
#: Meta JSON of a shard member, beyond its three strings: keys, punctuation, three integers.
_META_FIXED_BYTES = 160


def heldout_prefixes(langs: list[str]) -> dict[str, str]:
    """A file-name prefix per language, in the given order: its letters and digits ("_" for the
    rest), at most 40 characters, and distinct ("c++" and "c--" are "c__" and "c___2"): two
    languages never write to one shard file, and a long language name fits in a file name."""
    out: dict[str, str] = {}
    used: set[str] = set()
    for lang in langs:
        base = "".join(ch if ch.isalnum() else "_" for ch in lang)[:40] or "_"
        prefix, n = base, 2
        while prefix in used:
            prefix, n = f"{base}_{n}", n + 1
        used.add(prefix)
        out[lang] = prefix
    return out


def _cut(ub: np.ndarray, max_docs: int, max_bytes: int) -> bool:
    """Whether a stream whose documents cost at most `ub` bytes each in a shard can be cut into
    pieces of `max_docs` that are exactly its shards: no piece reaches `max_bytes` before its
    last document (the writer checks the limits after each document)."""
    if len(ub) <= max_docs:
        return False
    starts = np.arange(0, len(ub), max_docs)
    ends = np.minimum(starts + max_docs, len(ub)) - 1  # the piece without its last document
    cum = np.concatenate([[0], np.cumsum(ub, dtype=np.int64)])
    return bool(np.all(cum[ends] - cum[starts] < max_bytes))


#: Columns of `work/write/units.npy`, one row per unit (int64).
UNIT_COLUMNS = ("stream", "first", "whole", "lo", "hi", "cost")


class Units:
    """The plan's units: one int64 row each (`UNIT_COLUMNS`) plus the streams' folder, prefix and
    `max_docs`; `units[u]` is unit u as a dict (name, folder, prefix, first, whole, lo, hi,
    max_docs, cost), built when asked: 48 bytes a unit, where a list of dicts cost ~1 KB (an
    estimate; 2 x 10^4 units at K = 10^4, the plan's +50 MB peak of docs/benchmarks.md 7f)."""

    def __init__(self, rows: np.ndarray, streams: list[dict]) -> None:
        self.rows, self.streams = np.asarray(rows, np.int64).reshape(-1, len(UNIT_COLUMNS)), streams

    def __len__(self) -> int:
        return len(self.rows)

    def __getitem__(self, u: int) -> dict:
        stream, first, whole, lo, hi, cost = self.rows[u].tolist()
        s = self.streams[stream]
        name = f"{s['folder']}/{s['prefix']}" + ("" if whole else f"-{first:06d}")
        return {
            "name": name,
            "folder": s["folder"],
            "prefix": s["prefix"],
            "first": first,
            "whole": bool(whole),
            "lo": lo,
            "hi": hi,
            "max_docs": s["max_docs"],
            "cost": cost,
        }

    @property
    def costs(self) -> list[int]:
        return self.rows[:, UNIT_COLUMNS.index("cost")].tolist()


def plan(
    out: Path,
    work: Path,
    *,
    streams,
    lower: np.ndarray,
    upper: np.ndarray,
    key_parts: list,
    scratch: workdir.Scratch,
) -> dict:
    """Rank 0: lay out `streams` (an iterable of (folder, prefix, documents, their clusters,
    max_docs), in manifest order; documents: an int array, or a function that returns one,
    called once, so that only one stream is in memory at a time) and their units; `lower` /
    `upper`: bounds of each document's bytes in a shard. The documents and clusters of every
    stream go to two `scratch` files as they are laid out, and from them to `work/write/plan.npy`;
    the units to `work/write/units.npy` (`Units`), the streams to `plan.json`. Removes the old
    manifest, and every shard too when the plan changed; fails before any shard is written when
    the disk cannot hold the units still to write. Returns {"key", "units", "streams"}."""
    rows, table, lo = [], [], 0
    tmp = {"docs": scratch.path("plan-docs.bin"), "clusters": scratch.path("plan-clusters.bin")}
    with open(tmp["docs"], "wb") as f_docs, open(tmp["clusters"], "wb") as f_clusters:
        for folder, prefix, members, cluster, max_docs in streams:
            members = np.asarray(members() if callable(members) else members).astype(np.int64)
            f_docs.write(members.tobytes())
            f_clusters.write(np.broadcast_to(cluster, len(members)).astype(np.int64).tobytes())
            hi, first_unit = lo + len(members), len(rows) // len(UNIT_COLUMNS)
            # the stream's bounds, read, not mapped: its documents are all over N, and a gather
            # through the maps would map the page-cache folio around each (docs/benchmarks.md 7h)
            low = workdir.take_rows(lower, members)
            pieces = (
                range(lo, hi, max_docs)
                if _cut(workdir.take_rows(upper, members), max_docs, MAX_SHARD_BYTES)
                else [lo]
                if hi > lo
                else []
            )
            for p in pieces:
                whole = len(pieces) == 1
                end = hi if whole else min(p + max_docs, hi)
                first = (p - lo) // max_docs if not whole else 0
                cost = int(low[p - lo : end - lo].sum())
                rows.extend((len(table), first, int(whole), p, end, cost))
            table.append(
                {
                    "folder": folder,
                    "prefix": prefix,
                    "max_docs": int(max_docs),
                    "units": [first_unit, len(rows) // len(UNIT_COLUMNS)],
                }
            )
            lo = hi
    units = Units(np.array(rows, np.int64), table)
    del rows
    h = hashlib.sha256()  # of the documents' then the clusters' int64 bytes: plan.npy's data
    for path in tmp.values():
        with open(path, "rb") as fh:
            while chunk := fh.read(1 << 24):
                h.update(chunk)
    # the units (each one's name follows from its stream's folder and prefix and its row)
    key = _key("write", *key_parts, h.hexdigest(), hashlib.sha256(units.rows.tobytes()).hexdigest(), table)
    wdir = work / "write"
    (out / "manifest.json").unlink(
        missing_ok=True
    )  # first: a crash below never leaves one that looks complete
    old, _ = workdir.read_json(wdir / PLAN)
    if old is None or old.get("key") != key:
        (wdir / PLAN).unlink(missing_ok=True)
        for d in ("shards", "probe", "heldout"):
            shutil.rmtree(out / d, ignore_errors=True)
        shutil.rmtree(wdir, ignore_errors=True)
    wdir.mkdir(parents=True, exist_ok=True)
    todo = (units[u] for u in range(len(units)))
    todo_bytes = sum(u["cost"] for u in todo if _record_key(wdir, u) != _unit_key(key, u))
    workdir.require_space(out, todo_bytes, "the shards (a lower bound)")
    if old is None or old.get("key") != key or not _same_rows(wdir / UNITS, units.rows):
        _save_plan_npy(wdir / "plan.npy", lo, tmp)
        _atomic_npy(wdir / UNITS, units.rows)
        _atomic_json(wdir / PLAN, {"key": key, "streams": table})  # last: it names a complete plan
    for path in tmp.values():
        path.unlink()
    return {"key": key, "units": units, "streams": table}


def _same_rows(path: Path, rows: np.ndarray) -> bool:
    """Whether `path` holds `rows` (a plan whose units file went missing or was damaged is rewritten)."""
    try:
        return np.array_equal(np.load(path), rows)
    except (OSError, ValueError):
        return False


def _load_plan(wdir: Path) -> tuple[dict, Units]:
    p = json.loads((wdir / PLAN).read_text())
    return p, Units(np.load(wdir / UNITS), p["streams"])


def _save_plan_npy(path: Path, n: int, parts: dict[str, Path]) -> None:
    """`np.save(path, np.stack([docs, clusters]))`, int64 (2, n), from the two files of raw
    bytes (C order: every document, then every cluster), copied a piece at a time."""
    header = {
        "descr": np.lib.format.dtype_to_descr(np.dtype(np.int64)),
        "fortran_order": False,
        "shape": (2, n),
    }
    with workdir.atomic_file(path) as fh:
        np.lib.format.write_array_header_1_0(fh, header)
        for part in (parts["docs"], parts["clusters"]):
            with open(part, "rb") as src:
                shutil.copyfileobj(src, fh, 1 << 24)


def _record(work_write: Path, unit: dict) -> Path:
    return work_write / (unit["name"].replace("/", "__") + ".json")


def _unit_key(plan_key: str, unit: dict) -> str:
    return _key("write-unit", plan_key, unit["name"])


def _record_key(wdir: Path, unit: dict) -> str | None:
    rec, _ = workdir.read_json(_record(wdir, unit))
    return rec.get("key") if rec else None


def assign(costs: list[int], world: int) -> list[list[int]]:
    """Unit indices of each rank: largest cost first, each to the least loaded rank (the lowest
    rank on a tie), then in plan order within a rank. Deterministic; within 4/3 of the best
    balance (Graham's bound)."""
    loads = [(0, r) for r in range(world)]
    mine: list[list[int]] = [[] for _ in range(world)]
    for u in sorted(range(len(costs)), key=lambda u: (-costs[u], u)):
        load, r = heapq.heappop(loads)
        mine[r].append(u)
        heapq.heappush(loads, (load + costs[u], r))
    return [sorted(m) for m in mine]


def _unit_ok(out: Path, rec: dict) -> str | None:
    """None if every shard of the unit's record is on disk with its recorded sha256 and index."""
    shards = rec.get("shards")
    if not isinstance(shards, list):
        return "no shard list"
    for s in shards:
        path = out / s["path"]
        try:
            if _file_sha256(path) != s["sha256"]:
                return f"{path}: does not match the checksum recorded when it was written"
        except OSError:
            return f"{path}: missing"
        problem = workdir.npy_problem(index_path(path), (s["n_docs"], 2), np.int64)
        if problem:
            return f"{index_path(path)}: {problem}"
    return None


def _clear(out: Path, unit: dict) -> None:
    """Remove what an earlier, unfinished attempt at `unit` may have left."""
    folder = out / unit["folder"]
    if unit["whole"]:
        victims = folder.glob(f"{unit['prefix']}-*") if folder.is_dir() else []
    else:
        stem = f"{unit['prefix']}-{unit['first']:06d}"
        victims = [folder / f"{stem}{s}" for s in (".tar", ".tar.tmp", ".idx.npy", ".idx.npy.tmp")]
    for v in victims:
        v.unlink(missing_ok=True)


def write(out: Path, work: Path, store, tokens, dtype: str, rank: int, world: int, progress: bool) -> int:
    """Write this rank's units of the plan on disk; every rank calls it. Returns the documents
    written by every rank together (0 when every unit was finished by an earlier run). Raises
    on every rank when a unit failed on any."""
    from tqdm import tqdm

    wdir = work / "write"
    p, units = _load_plan(wdir)
    docs, clusters = np.load(wdir / "plan.npy", mmap_mode="r")
    mine = assign(units.costs, world)[rank]
    n_written, error, own = 0, None, None
    bar = tqdm(
        total=sum(units[u]["hi"] - units[u]["lo"] for u in mine),
        desc="write shards" if world == 1 else f"write shards (rank 0's {len(mine)} of {len(units)} units)",
        unit="doc",
        disable=not progress or rank != 0,
        mininterval=5.0,
    )
    for u in mine:
        unit = units[u]
        try:
            n_written += _write_unit(out, wdir, p["key"], unit, docs, clusters, store, tokens, dtype, rank)
        except BaseException as exc:
            print(f"error: grip prepare: rank {rank}: writing {unit['name']} failed: {exc}", file=sys.stderr)
            error, own = (unit["name"], f"{type(exc).__name__}: {exc}"), exc
            if world == 1 or not isinstance(exc, Exception):
                raise
            break
        bar.update(unit["hi"] - unit["lo"])
    bar.close()
    gathered = distributed.all_gather((error, n_written))
    failed = [(r, e) for r, (e, _) in enumerate(gathered) if e is not None]
    if own is not None:
        raise own
    if failed:
        r, (name, why) = failed[0]
        raise RuntimeError(
            f"write: {name} failed on rank {r} ({why}); re-run the same command: finished units are kept"
        )
    return sum(n for _, n in gathered)


def _write_unit(out, wdir, plan_key, unit, docs, clusters, store, tokens, dtype, rank) -> int:
    """Write one unit unless its record checks out; returns the documents written."""
    rec_path, ukey = _record(wdir, unit), _unit_key(plan_key, unit)
    rec = _finished(rec_path, ukey, f"write ({unit['name']})")
    if rec is not None:
        problem = _unit_ok(out, rec)
        if problem is None:
            return 0
        print(f"note: {problem}; rewriting {unit['name']}")
    started = rec_path.with_suffix(".started")  # left behind only when a process died in the unit
    if started.exists():
        who, _ = workdir.read_json(started)
        by = f"rank {who['rank']}" if isinstance(who, dict) and "rank" in who else "a process"
        print(
            f"note: grip prepare: write: {unit['name']} was left unfinished by {by} of an earlier run "
            "(it died or failed while writing it); rewriting it",
            file=sys.stderr,
        )
    rec_path.unlink(missing_ok=True)
    started.write_text(json.dumps({"rank": rank, "pid": os.getpid()}))
    _clear(out, unit)
    lo, hi = unit["lo"], unit["hi"]
    start = unit["first"] * unit["max_docs"]  # the position in the stream of the unit's first document
    mine = np.asarray(docs[lo:hi])
    size = np.dtype(dtype).itemsize
    with ShardWriter(
        out / unit["folder"],
        token_dtype=dtype,
        prefix=unit["prefix"],
        max_docs=unit["max_docs"],
        first=unit["first"],
    ) as w:
        rows = zip(
            mine.tolist(),
            clusters[lo:hi].tolist(),
            store.encoded(mine),
            tokens.encoded(mine, dtype),
            strict=True,
        )
        for pos, (i, k, (txt, doc), ids) in enumerate(rows, start):
            w.write_encoded(f"{i:09d}", ids, txt, meta_json(doc, len(ids) // size, k, pos))
            if not pos & 255:
                workdir.trim_maps()  # the stores' pages read so far are not kept resident
        infos = [s.under(unit["folder"]) for s in w.close()]
    _atomic_json(rec_path, {"key": ukey, "shards": [vars(s) for s in infos], "rank": rank})
    started.unlink()
    return hi - lo


_esc = json.encoder.encode_basestring_ascii  # what json.dumps writes for a str


def meta_json(doc: dict, length: int, cluster: int, position: int) -> bytes:
    """The `.json` member of a document: `json.dumps(meta, sort_keys=True)` of its id, language,
    path, token count, cluster and position in the stream, formatted directly (3x faster)."""
    d, lang, path = doc["id"], doc["lang"], doc["path"]
    if type(d) is str and type(lang) is str and type(path) is str:
        return (
            f'{{"cluster": {cluster:d}, "doc_id": {_esc(d)}, "lang": {_esc(lang)}, "length": {length:d}, '
            f'"path": {_esc(path)}, "position": {position:d}}}'
        ).encode("ascii")
    meta = {
        "doc_id": d,
        "length": length,
        "lang": lang,
        "path": path,
        "cluster": cluster,
        "position": position,
    }
    return json.dumps(meta, sort_keys=True).encode("utf-8")


def shard_lists(work: Path):
    """Rank 0, after `write`: the shards of every stream of the plan, in plan order, from the
    units' records on disk; a generator (one stream's list at a time)."""
    wdir = work / "write"
    p, units = _load_plan(wdir)
    for s in p["streams"]:
        infos: list[ShardInfo] = []
        for u in range(*s["units"]):
            rec = json.loads(_record(wdir, units[u]).read_text())
            infos += [ShardInfo(**d) for d in rec["shards"]]
        yield infos
