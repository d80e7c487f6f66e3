"""A stand-in for the MiniLM encoder in fault tests: deterministic unit vectors from each
text's sha256, no model to load, so a whole `grip prepare` of a few dozen documents takes a
second. `python -m tests.reliability._fake_encoder [--dim D] [--sleep S] -- <grip prepare
args>` runs the CLI with it (S: seconds to sleep per embedding block, to hold a run open)."""

from __future__ import annotations

import hashlib
import sys
import time

import numpy as np


class FakeEncoder:
    dim = 16
    sleep = 0.0
    calls = 0  # embedding blocks computed, over every instance

    def __init__(self, cfg) -> None:
        self.cfg = cfg

    def embed(self, texts) -> np.ndarray:
        type(self).calls += 1
        if self.sleep:
            time.sleep(self.sleep)
        rows = []
        for t in texts:
            seed = int.from_bytes(hashlib.sha256(t.encode("utf-8", "surrogatepass")).digest()[:8], "little")
            rows.append(np.random.default_rng(seed).standard_normal(self.dim))
        emb = np.asarray(rows)
        return (emb / np.linalg.norm(emb, axis=1, keepdims=True)).astype(np.float32)


def install(monkeypatch=None, dim: int = 16, sleep: float = 0.0) -> type[FakeEncoder]:
    import grip_loop.embed

    cls = type("FakeEncoder", (FakeEncoder,), {"dim": dim, "sleep": sleep, "calls": 0})
    if monkeypatch is not None:
        monkeypatch.setattr(grip_loop.embed, "Encoder", cls)
    else:
        grip_loop.embed.Encoder = cls
    return cls


def main(argv: list[str]) -> int:
    own, args = argv[: argv.index("--")], argv[argv.index("--") + 1 :]
    opts = dict(zip(own[0::2], own[1::2], strict=True))
    install(dim=int(opts.get("--dim", 16)), sleep=float(opts.get("--sleep", 0)))
    from train.cli import main as cli

    return cli(["prepare", *args])


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
