"""The scoring rubric of Appendix A.1 that every judge answers: the four score keys, the system
prompt verbatim, the strict JSON reply parser, and the `Judge` protocol (`grip_loop.judge`)."""

from __future__ import annotations

import hashlib
import json
import re
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Protocol

SCORE_KEYS = (
    "syntax_integrity_score",
    "architecture_score",
    "educational_value_score",
    "technical_depth_score",
)

RUBRIC_PROMPT = """System Instruction: Comprehensive Code Audit Protocol
You are acting as a Senior Technical Auditor. Your objective is to rigorously evaluate the provided code snippet against four core performance indicators. Unlike simple correctness checks, you must assess the code's readiness for high-quality pre-training datasets. Use a granular 0 to 10 scale for each dimension.

1. Code Quality & Compliance (0-10)
Focus: Syntax, naming, and readability.
0-3 (Low): Severe syntax errors; code cannot run; messy formatting or naming makes it unreadable.
4-7 (Mid): Executable and generally correct; minor formatting issues or inconsistent naming; readable but not polished.
8-10 (High): Error-free and standard compliant (e.g., PEP8); precise naming; clean and professional structure.

2. Algorithmic & Engineering Design (0-10)
Focus: Modularity, robustness, and structure.
0-3 (Low): All code in one block (global scope); no functions/classes; lacks input validation or error handling.
4-7 (Mid): Split into functions; basic error checking; logic is structured but lacks extensibility.
8-10 (High): High modularity (classes/functions); robust error handling; follows best engineering practices.

3. Training Suitability (0-10)
Focus: Educational value and clarity for learning.
0-3 (Low): No comments; confusing logic; uses "magic numbers"; hard for a model or human to learn from.
4-7 (Mid): Clear logic; includes basic comments for key steps; suitable for general training.
8-10 (High): Excellent comments explaining the "why"; demonstrates best practices; highly suitable for fine-tuning/teaching.

4. Knowledge Density (0-10)
Focus: Technical insight and complexity.
0-3 (Low): Trivial code (e.g., simple print statements, basic loops); contains little domain knowledge.
4-7 (Mid): Standard algorithms or typical business logic; useful but not unique.
8-10 (High): complex algorithms, deep optimizations, or cross-domain knowledge; high technical value.

Response Requirement: Analyze the input code and output a JSON object strictly adhering to this schema:
{
  "syntax_integrity_score": <int 0-10>,
  "architecture_score": <int 0-10>,
  "educational_value_score": <int 0-10>,
  "technical_depth_score": <int 0-10>
}"""

Scores = dict[str, float]


@dataclass(frozen=True)
class JudgeInput:
    id: str
    text: str
    lang: str = "unknown"


class Judge(Protocol):
    """Scores documents; None for a document it could not score."""

    def score(self, docs: Sequence[JudgeInput]) -> list[Scores | None]: ...


def text_sha256(text: str) -> str:
    return hashlib.sha256(text.encode("utf-8", "surrogatepass")).hexdigest()


def _reject_duplicates(pairs: list[tuple[str, object]]) -> dict:
    out: dict = {}
    for k, v in pairs:
        if k in out:
            raise ValueError(f"duplicate key {k!r} in a JSON object")
        out[k] = v
    return out


def _reject_constant(name: str):
    raise ValueError(f"{name} is not valid JSON")


def strict_json(text: str | bytes):
    """`json.loads` that rejects what a well-behaved server never sends and Python's parser
    lets through: duplicate keys (otherwise the last one silently wins), NaN and Infinity, and
    nesting deep enough to exhaust the recursion limit (ValueError for all of them)."""
    try:
        return json.loads(text, object_pairs_hook=_reject_duplicates, parse_constant=_reject_constant)
    except RecursionError:
        raise ValueError("JSON nested too deeply") from None


def parse_scores(reply: str) -> Scores:
    """The four scores from a judge reply: exactly one JSON object with the four integer keys in [0, 10].

    Tolerates a Markdown code fence around the object (models add them despite the
    prompt); rejects missing/extra keys, non-integers and out-of-range values (ValueError).
    """
    objs = re.findall(r"\{[^{}]*\}", reply, flags=re.S)
    if len(objs) != 1:
        raise ValueError(f"expected exactly one JSON object in the reply, found {len(objs)}")
    data = strict_json(objs[0])  # a duplicated key is an error, not "the last one wins"
    if set(data) != set(SCORE_KEYS):
        raise ValueError(f"expected keys {sorted(SCORE_KEYS)}, got {sorted(data)}")
    out = {}
    for k in SCORE_KEYS:
        v = data[k]
        if isinstance(v, bool) or not isinstance(v, int) or not 0 <= v <= 10:
            raise ValueError(f"{k}: expected an integer in [0, 10], got {v!r}")
        out[k] = float(v)
    return out
