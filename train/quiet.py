"""The one place where known-harmless messages of dependencies are silenced (`grip` commands and
`python -m train.main`). Each entry says where it comes from and why it is harmless; anything
not listed here still reaches the user. Set GRIP_VERBOSE=1 to see everything.

Python warnings (`warnings.filterwarnings`, matched on the message):
- torchdata's StatefulDataLoader calls the deprecated `torch.set_vital` at every loader start
  ("'set_vital' is deprecated"): torch's telemetry hook, no effect on the data.
- Lightning's `_pytree` checks `isinstance(treespec, LeafSpec)`, deprecated in torch 2.13
  ("`isinstance(treespec, LeafSpec)` is deprecated"): Lightning's own call, same result.

Log records (a `logging.Filter` on the emitting logger):
- Lightning's "Tip: ... try installing litlogger" advertisement at every Trainer start, and its
  note that the configured model summary (train/progress.py) replaces its default one.

W&B terminal warnings (`wandb.termwarn`, wrapped once W&B is imported by a configured logger):
- "The anonymous setting has no effect": Lightning's WandbLogger always passes `anonymous`.
- "git root ... does not exist": W&B probes the run folder for git before Lightning creates it
  (train.main creates the folder first; the filter catches other paths).

Not silenced but fixed where they arise: Lightning's "Epoch 0/-2" progress description and the
"FLOPs 0" model summary (train/progress.py), the project's own deprecated transformers argument
(grip_loop/rap.py `causal_mask` passes `cache`).
"""

from __future__ import annotations

import logging
import os
import re
import warnings

# (message regex, category) of Python warnings that are harmless (see the module docstring)
WARNINGS: list[tuple[str, type[Warning]]] = [
    (r".*'set_vital' is deprecated", UserWarning),
    (r".*isinstance\(treespec, LeafSpec\)` is deprecated", Warning),
]
# substrings of log records dropped from Lightning's loggers
LOG_RECORDS = ["try installing [litlogger]", "Skipping setting a default `ModelSummary`"]
# regexes of W&B terminal warnings dropped
WANDB_WARNINGS = [
    re.compile(r"The anonymous setting has no effect"),
    re.compile(r"git root .* does not exist"),
]

_installed = False


class _DropRecords(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        msg = record.getMessage()
        return not any(s in msg for s in LOG_RECORDS)


def install() -> None:
    """Install the filters above (idempotent; a no-op with GRIP_VERBOSE=1)."""
    global _installed
    if _installed or os.environ.get("GRIP_VERBOSE"):
        return
    _installed = True
    for message, category in WARNINGS:
        warnings.filterwarnings("ignore", message=message, category=category)
    for name in ("lightning.pytorch.utilities.rank_zero", "lightning.fabric.utilities.rank_zero"):
        logging.getLogger(name).addFilter(_DropRecords())


def quiet_wandb() -> None:
    """Wrap `wandb.termwarn` so the W&B warnings listed above are dropped (imports wandb)."""
    if os.environ.get("GRIP_VERBOSE"):
        return
    try:
        import wandb
    except ImportError:
        return
    warn = wandb.termwarn
    if getattr(warn, "_grip_quiet", False):
        return

    def termwarn(string, *args, **kwargs):
        if any(p.search(str(string)) for p in WANDB_WARNINGS):
            return None
        return warn(string, *args, **kwargs)

    termwarn._grip_quiet = True
    wandb.termwarn = termwarn
