"""Session fixtures: a small real corpus (stdlib files) and one `grip prepare` run of it on CPU.

Imported by tests/conftest.py so every test module shares the one prepared directory.
"""

import shutil
import sysconfig
from pathlib import Path

import pytest

from grip_loop.prepare import load_config, prepare

ROOT = Path(__file__).resolve().parents[1]
TINY = ROOT / "configs" / "prepare" / "tiny.yaml"
PACKAGES = [
    "json",
    "email",
    "asyncio",
    "concurrent",
    "importlib",
    "logging",
    "http",
    "urllib",
    "xml",
    "unittest",
]
PACKAGES += ["multiprocessing", "collections", "sqlite3", "wsgiref"]
N_DOCS = 120  # 2 embedding blocks of 64 (tiny.yaml); ~10 s of MiniLM on 2 CPU cores


def _cfg(corpus, out, **kw):
    return load_config(TINY, corpus=str(corpus), out=str(out), **kw)


@pytest.fixture(scope="session")
def stdlib_corpus(tmp_path_factory):
    src = Path(sysconfig.get_paths()["stdlib"])
    dst = tmp_path_factory.mktemp("stdlib")
    files = [f for p in PACKAGES for f in sorted((src / p).rglob("*.py")) if 200 < f.stat().st_size < 16_000]
    assert len(files) >= N_DOCS
    for f in files[:N_DOCS]:
        t = dst / f.relative_to(src)
        t.parent.mkdir(parents=True, exist_ok=True)
        shutil.copy(f, t)
    (dst / "junk.py").write_bytes(b"\x00\x01\x02 binary")
    (dst / "empty.py").write_text("")
    return dst


@pytest.fixture(scope="session")
def stdlib_prepared(stdlib_corpus, tmp_path_factory):
    out = tmp_path_factory.mktemp("stdlib_prepared")
    prepare(_cfg(stdlib_corpus, out))
    return out
