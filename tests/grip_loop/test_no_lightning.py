"""The library's rule: no module of `grip_loop` imports Lightning (or the `train` package that
does) but `grip_loop/callback.py`; the loop's state and arithmetic (`grip_loop.loop`) run
without it. Read from the source, so lazy imports inside functions count too."""

from __future__ import annotations

import ast
from pathlib import Path

LIB = Path(__file__).resolve().parents[2] / "grip_loop"
FORBIDDEN = {"lightning", "pytorch_lightning", "train"}


def _imported(path: Path) -> set[str]:
    out = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            out |= {a.name.split(".")[0] for a in node.names}
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            out.add(node.module.split(".")[0])
    return out


def test_only_the_callback_imports_lightning():
    files = sorted(LIB.glob("*.py"))
    assert len(files) > 30
    offenders = {p.name: sorted(_imported(p) & FORBIDDEN) for p in files if p.name != "callback.py"}
    assert {k: v for k, v in offenders.items() if v} == {}
    assert "lightning" in _imported(LIB / "callback.py")  # the check can see an import
