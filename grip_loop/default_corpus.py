"""The embedded default corpus: real, multi-language source code already on every machine.

Nothing can be downloaded at run time, so the quick start trains on what Python installs:
the standard library's own Python sources, CPython's C headers, and the C/C++ headers and
type stubs shipped by installed packages (numpy, torch, ...). `collect` picks files by
language with a seeded sample and copies them (copies, not symlinks: the corpus stays
valid if the environment changes, and no symlink loop can reach the reader) into
`<out>/<origin>/<relative path>`.

Tests, site-packages inside the stdlib tree, caches and vendored test data are skipped.
The result is a few thousand files (about 15-40 MB) of Python, C and C++.
"""

from __future__ import annotations

import os
import shutil
import sysconfig
from collections.abc import Iterator
from pathlib import Path

import numpy as np

from grip_loop.corpus import EXTENSION_LANG as LANGUAGES

SKIP_DIRS = {
    "test",
    "tests",
    "site-packages",
    "dist-packages",
    "__pycache__",
    "idle_test",
    "testing",
    "_vendor",
}


def _walk(root: Path, exts: set[str], max_bytes: int) -> Iterator[Path]:
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = sorted(d for d in dirnames if d not in SKIP_DIRS and not d.startswith("."))
        for name in sorted(filenames):
            p = Path(dirpath) / name
            if p.suffix in exts and not p.is_symlink():
                try:
                    if 0 < p.stat().st_size <= max_bytes:
                        yield p
                except OSError:
                    continue


def sources() -> dict[str, Path]:
    """Origin name -> root directory of the installed sources used by the default corpus."""
    roots = {
        "stdlib": Path(sysconfig.get_paths()["stdlib"]),
        "cpython-include": Path(sysconfig.get_paths()["include"]),
    }
    purelib = Path(sysconfig.get_paths()["purelib"])
    for pkg in ("numpy", "torch", "tokenizers", "lightning", "transformers"):
        if (purelib / pkg).is_dir():
            roots[pkg] = purelib / pkg
    return {k: v for k, v in roots.items() if v.is_dir()}


def collect(
    out: str | os.PathLike, *, max_files: int = 3000, max_bytes: int = 65536, seed: int = 0
) -> dict[str, int]:
    """Copy up to `max_files` installed source files into `out`; returns files per language.

    Every eligible stdlib file and CPython header comes first (sampled if there are more
    than `max_files`); the rest is filled round-robin from the installed packages.
    """
    out = Path(out)
    exts = {e for e, lang in LANGUAGES.items() if lang in ("python", "c", "cpp", "cuda")}
    rng = np.random.default_rng(seed)
    found: dict[str, list[tuple[str, Path]]] = {}
    for origin, root in sources().items():
        for p in _walk(root, exts, max_bytes):
            found.setdefault(origin, []).append((origin, p))
    stdlib = found.pop("stdlib", []) + found.pop("cpython-include", [])
    n_std = min(len(stdlib), max_files)
    picked = [stdlib[i] for i in sorted(rng.choice(len(stdlib), n_std, replace=False))] if n_std else []
    # Fill the rest round-robin over the installed packages, so no single package (torch
    # ships ~10^4 headers) dominates.
    pools = [[found[o][i] for i in rng.permutation(len(found[o]))] for o in sorted(found)]
    while len(picked) < max_files and any(pools):
        for pool in pools:
            if pool and len(picked) < max_files:
                picked.append(pool.pop())
    counts: dict[str, int] = {}
    roots = sources()
    for origin, p in picked:
        dest = out / origin / p.relative_to(roots[origin])
        dest.parent.mkdir(parents=True, exist_ok=True)
        if not dest.exists():
            shutil.copyfile(p, dest)
        lang = LANGUAGES[p.suffix]
        counts[lang] = counts.get(lang, 0) + 1
    return counts
