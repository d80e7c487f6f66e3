"""`python -m tests.reliability._prepare_killer STAGE N LOG -- <grip prepare args>`: runs
`grip prepare` and SIGKILLs its own process at the N-th call of the stage's unit of work
(STAGE "embed": an embedding block; "write": a shard document; "none": never). Every call
is appended to LOG, so a test can see which work a resumed run redid."""

from __future__ import annotations

import os
import signal
import sys


def main(argv: list[str]) -> int:
    stage, n, log = argv[0], int(argv[1]), argv[2]
    args = argv[argv.index("--") + 1 :]
    from grip_loop.embed import Encoder
    from grip_loop.shards import ShardWriter

    calls = {"embed": 0, "write": 0}

    def hook(cls, name, key):
        real = getattr(cls, name)

        def wrapped(self, *a, **kw):
            calls[key] += 1
            with open(log, "a") as fh:
                fh.write(f"{key}\n")
            if key == stage and calls[key] == n:
                os.kill(os.getpid(), signal.SIGKILL)  # no cleanup, no finally: the real thing
            return real(self, *a, **kw)

        setattr(cls, name, wrapped)

    hook(Encoder, "embed", "embed")
    hook(ShardWriter, "write_encoded", "write")  # every document passes through it
    from train.cli import main as cli

    return cli(["prepare", *args])


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
