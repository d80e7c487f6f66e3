"""Test-only Lightning callbacks and datasets used by the reliability tests' training runs
(imported by class path from the YAML configs those tests write)."""

from __future__ import annotations

import hashlib
import os
import signal
import time
from pathlib import Path

import lightning as L


class BatchLog(L.Callback):
    """Appends `<step> <sha1 of input_ids>` of every trained batch to <out>/batches-rank<r>.txt."""

    def __init__(self, out: str) -> None:
        self.out = Path(out)

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        self.out.mkdir(parents=True, exist_ok=True)
        digest = hashlib.sha1(batch["input_ids"].cpu().numpy().tobytes()).hexdigest()
        with open(self.out / f"batches-rank{trainer.global_rank}.txt", "a") as fh:
            fh.write(f"{trainer.global_step} {digest}\n")


class Throttle(L.Callback):
    """Sleeps after every step, so a test polling the run folder can kill it mid-run."""

    def __init__(self, seconds: float = 0.1) -> None:
        self.seconds = seconds

    def on_train_batch_end(self, *args) -> None:
        time.sleep(self.seconds)


def read_log(path: Path) -> dict[int, str]:
    out = {}
    for line in Path(path).read_text().splitlines():
        step, digest = line.split()
        out[int(step)] = digest
    return out


class KillerDataset:
    """Wraps a dataset; a DataLoader worker SIGKILLs itself at its `at`-th block once the
    file `flag` exists (a worker dying the hard way: OOM killer, segfault in a reader)."""

    def __new__(cls, inner, flag: str, at: int = 3):
        from torch.utils.data import IterableDataset, get_worker_info

        class _Killer(IterableDataset):
            def __init__(self):
                self.inner, self.flag, self.at = inner, flag, at

            def __iter__(self):
                for i, block in enumerate(self.inner):
                    info = get_worker_info()
                    if info is not None and i >= self.at and os.path.exists(self.flag):
                        os.kill(os.getpid(), signal.SIGKILL)
                    yield block

            def state_dict(self):
                return self.inner.state_dict()

            def load_state_dict(self, state):
                self.inner.load_state_dict(state)

        return _Killer()
