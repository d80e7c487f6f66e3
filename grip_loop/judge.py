"""Static quality: judges that score a document on the four rubric dimensions of Appendix A.1.

A `Judge` maps documents to four 0-10 scores (`SCORE_KEYS`, the JSON keys of the paper's
schema). Three implementations, picked by `JudgeConfig.kind` from the `JUDGES` registry:

* `heuristic` (default, offline): scores the same four dimensions from the code itself:
  does it parse (Python: `ast`; other languages: balanced brackets), naming and line
  length; functions/classes and error handling; comment/docstring density; size, control
  flow and imports. It is a cheap, deterministic stand-in, not a replacement for a model:
  it cannot tell a clever algorithm from a long boring one.
* `llm`: the paper's protocol. The Appendix A.1 system prompt verbatim, the document as the
  user message, temperature 0, any OpenAI-compatible `/chat/completions` endpoint (vLLM,
  SGLang, llama.cpp server). The reply must contain exactly one JSON object with the four
  integer keys in [0, 10] (no key twice); anything else is retried (`max_retries`), then the
  document counts as unscored. A request has a total deadline (`timeout_s`) and a reply a
  size bound; no reply, however hostile, raises out of `score` (docs/reliability.md). Results are cached in a JSONL file keyed by sha256(model, text),
  so re-runs and other clusters never pay twice.
* `file`: precomputed scores from a JSONL file, one object per document with `id` (the
  document id) or `sha256` (of its text) plus the four keys.

Q_k (`cluster_quality`) is the mean over the cluster's probe documents of the mean of the
four scores, divided by 10: on [0, 1], as `grip_loop.budget` expects. Unscored documents
are left out; a cluster with no scored document gets the mean Q of the other clusters
(neutral: neither favoured nor gated), and if nothing was scored every Q_k is 0.5.
"""

from __future__ import annotations

import ast
import json
import math
import os
import re
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from grip_loop._checks import check_choice, check_int, check_number
from grip_loop.llm_judge import JudgeFailure, LLMJudge  # noqa: F401  (re-exported)
from grip_loop.rubric import (  # noqa: F401  (re-exported: the judge API in one import)
    RUBRIC_PROMPT,
    SCORE_KEYS,
    Judge,
    JudgeInput,
    Scores,
    parse_scores,
    strict_json,
    text_sha256,
)

# ---------------------------------------------------------------------------------------
# heuristic judge


def _clip10(x: float) -> float:
    return float(min(10.0, max(0.0, round(x, 2))))


def _balanced(text: str) -> bool:
    pairs, stack = {")": "(", "]": "[", "}": "{"}, []
    for ch in re.sub(r"(\"(\\.|[^\"\\\n])*\"|'(\\.|[^'\\\n])*')", "", text):
        if ch in "([{":
            stack.append(ch)
        elif ch in pairs:
            if not stack or stack.pop() != pairs[ch]:
                return False
    return not stack


class HeuristicJudge:
    """Offline rubric scores from static features of the code (see the module docstring)."""

    def score(self, docs: Sequence[JudgeInput]) -> list[Scores | None]:
        return [self.score_one(d.text, d.lang) for d in docs]

    def score_one(self, text: str, lang: str = "python") -> Scores:
        lines = text.splitlines() or [""]
        code = [ln for ln in lines if ln.strip()]
        n_code = max(1, len(code))
        long_frac = sum(len(ln) > 100 for ln in lines) / len(lines)
        comment_lines = sum(ln.strip().startswith(("#", "//", "/*", "*", "--")) for ln in code)
        n_funcs = n_classes = n_try = n_branch = n_docstrings = n_imports = 0
        top_level_stmts = 0
        names: list[str] = []
        if lang == "python":
            try:
                tree = ast.parse(text)
                parses = True
            except (SyntaxError, ValueError, RecursionError, MemoryError):
                tree, parses = None, False
            if tree is not None:
                for node in ast.walk(tree):
                    if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
                        n_funcs += not isinstance(node, ast.ClassDef)
                        n_classes += isinstance(node, ast.ClassDef)
                        names.append(node.name)
                        n_docstrings += ast.get_docstring(node) is not None
                    elif isinstance(node, (ast.Try, ast.Raise, ast.Assert)):
                        n_try += 1
                    elif isinstance(node, (ast.If, ast.For, ast.While, ast.With, ast.comprehension)):
                        n_branch += 1
                    elif isinstance(node, (ast.Import, ast.ImportFrom)):
                        n_imports += 1
                n_docstrings += ast.get_docstring(tree) is not None
                top_level_stmts = sum(
                    not isinstance(
                        s, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef, ast.Import, ast.ImportFrom)
                    )
                    and not (isinstance(s, ast.Expr) and isinstance(getattr(s, "value", None), ast.Constant))
                    for s in tree.body
                )
        else:
            parses = _balanced(text)
            n_funcs = len(re.findall(r"\b(def|fn|func|function|void|int|static)\s+\w+\s*\(", text))
            n_classes = len(re.findall(r"\b(class|struct|trait|interface|impl)\s+\w+", text))
            n_try = len(re.findall(r"\b(try|catch|except|throw|raise|Result|Err\(|panic!)\b", text))
            n_branch = len(re.findall(r"\b(if|for|while|switch|match)\b", text))
            n_imports = len(re.findall(r"^\s*(import|#include|use|using|require)\b", text, flags=re.M))
        good_names = [n for n in names if re.fullmatch(r"_*[a-z][a-z0-9_]*|_*[A-Z][A-Za-z0-9]*", n)]
        naming = len(good_names) / len(names) if names else 0.7

        syntax = (6.0 if parses else 1.5) + (
            2.5 * naming + 1.5 * (1 - min(1.0, 5 * long_frac)) if parses else 0
        )
        units = n_funcs + n_classes
        design = (
            2.0
            + min(4.0, 1.5 * math.log2(1 + units))
            + min(2.0, 0.7 * n_try)
            + (1.0 if n_classes else 0.0)
            + (1.0 if units and top_level_stmts <= 3 else 0.0)
        )
        density = (comment_lines + 3 * n_docstrings) / n_code
        educational = (
            1.0 + min(6.0, 30 * density) + (2.0 if n_docstrings and units else 0.0) + (1.0 if parses else 0)
        )
        depth = (
            min(4.0, 1.2 * math.log2(1 + n_code / 10))
            + min(3.5, 0.9 * math.log2(1 + n_branch))
            + min(2.5, 0.8 * math.log2(1 + n_imports))
        )
        return {
            "syntax_integrity_score": _clip10(syntax),
            "architecture_score": _clip10(design if parses else min(design, 4.0)),
            "educational_value_score": _clip10(educational),
            "technical_depth_score": _clip10(depth),
        }


# ---------------------------------------------------------------------------------------
# precomputed scores


class FileJudge:
    """Scores read from a JSONL file: {"id" | "sha256": ..., <the four keys>}."""

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        if not self.path.is_file():
            raise ValueError(f"judge.scores_path: {self.path} not found")
        self.by_id: dict[str, Scores] = {}
        self.by_hash: dict[str, Scores] = {}
        for lineno, line in enumerate(self.path.read_text().splitlines(), 1):
            if not line.strip():
                continue
            try:
                rec = json.loads(line)
                scores = {k: float(rec[k]) for k in SCORE_KEYS}
            except (json.JSONDecodeError, KeyError, TypeError, ValueError):
                raise ValueError(
                    f"{self.path}:{lineno}: expected a JSON object with 'id' or 'sha256' and {list(SCORE_KEYS)}"
                ) from None
            if not all(0 <= v <= 10 for v in scores.values()):
                raise ValueError(f"{self.path}:{lineno}: scores must lie in [0, 10]")
            if "id" in rec:
                self.by_id[str(rec["id"])] = scores
            if "sha256" in rec:
                self.by_hash[str(rec["sha256"])] = scores

    def score(self, docs: Sequence[JudgeInput]) -> list[Scores | None]:
        return [self.by_id.get(d.id) or self.by_hash.get(text_sha256(d.text)) for d in docs]


# ---------------------------------------------------------------------------------------


@dataclass
class JudgeConfig:
    kind: str = "heuristic"
    """One of JUDGES: heuristic (offline default), llm, file."""
    base_url: str | None = None
    """llm: OpenAI-compatible endpoint root, e.g. http://127.0.0.1:8000/v1."""
    model: str | None = None
    """llm: the served model name."""
    api_key_env: str = "OPENAI_API_KEY"
    """llm: environment variable holding the API key (unset = no auth header)."""
    max_retries: int = 3
    """llm: retries of a failed request; then the document is left unscored (and counted)."""
    concurrency: int = 8
    """llm: requests in flight at once."""
    timeout_s: float = 120.0
    """llm: total seconds of one request (connect, headers and body together), not per read."""
    scores_path: str | None = None
    """file: JSONL of precomputed scores."""

    def __post_init__(self) -> None:
        check_choice("judge.kind", self.kind, tuple(sorted(JUDGES)))
        if self.kind == "llm" and not (self.base_url and self.model):
            raise ValueError(
                f"judge.base_url and judge.model: expected both for kind 'llm', got {self.base_url!r} and {self.model!r}"
            )
        if self.kind == "file" and not self.scores_path:
            raise ValueError(
                f"judge.scores_path: expected a JSONL path for kind 'file', got {self.scores_path!r}"
            )
        check_int("judge.max_retries", self.max_retries, 0)
        check_number("judge.timeout_s", self.timeout_s, 0.0, open_lo=True, unit="seconds")
        check_int("judge.concurrency", self.concurrency, 1)

    def build(self, cache_dir: str | Path | None = None) -> Judge:
        """The `kind` judge of `JUDGES`, built from this config (`cache_dir`: the llm judge's cache)."""
        return JUDGES[self.kind](self, cache_dir)


def _llm(cfg: JudgeConfig, cache_dir: str | Path | None) -> LLMJudge:
    return LLMJudge(
        cfg.base_url,
        cfg.model,
        api_key=os.environ.get(cfg.api_key_env),
        cache_path=Path(cache_dir) / "judge_cache.jsonl" if cache_dir else None,
        max_retries=cfg.max_retries,
        timeout_s=cfg.timeout_s,
        concurrency=cfg.concurrency,
    )


#: `JudgeConfig.kind` -> how to build that judge from the config (and the cache directory).
JUDGES: dict[str, Callable[[JudgeConfig, str | Path | None], Judge]] = {
    "heuristic": lambda cfg, cache_dir: HeuristicJudge(),
    "llm": _llm,
    "file": lambda cfg, cache_dir: FileJudge(cfg.scores_path),
}


def doc_quality(scores: Scores) -> float:
    """One document's quality on [0, 1]: mean of the four 0-10 scores / 10."""
    return float(np.mean([scores[k] for k in SCORE_KEYS])) / 10.0


def cluster_quality(per_cluster: Sequence[Sequence[Scores | None]]) -> tuple[np.ndarray, list[Scores]]:
    """(Q_k on [0, 1], mean score per dimension) per cluster; see the module docstring for gaps."""
    results = [_one_cluster(scores) for scores in per_cluster]
    return _fill_gaps(np.array([q for q, _ in results], np.float64)), [d for _, d in results]


def score_clusters(
    judge: Judge, clusters: Iterable[Sequence[JudgeInput]], *, chunk: int = 4096
) -> tuple[np.ndarray, list[Scores], int]:
    """(Q_k, mean score per dimension, documents scored): `cluster_quality([judge.score(docs) for
    docs in clusters])`, with the clusters' documents sent to `judge.score` together, about
    `chunk` at a time (several small probes per call, so a remote judge keeps its requests in
    flight), and only each cluster's two results kept. What this holds is one chunk's documents
    and scores, whatever the number of clusters; `clusters` may be a generator."""
    check_int("chunk", chunk, lo=1)
    q: list[float] = []
    dims: list[Scores] = []
    batch: list[JudgeInput] = []
    sizes: list[int] = []
    n_docs = 0

    def flush() -> None:
        scores, s = judge.score(batch), 0
        if len(scores) != len(batch):
            raise ValueError(f"judge: {len(scores)} scores for {len(batch)} documents (one per document)")
        for n in sizes:
            qk, dk = _one_cluster(scores[s : s + n])
            q.append(qk)
            dims.append(dk)
            s += n
        batch.clear()
        sizes.clear()

    for docs in clusters:
        batch.extend(docs)
        sizes.append(len(docs))
        n_docs += len(docs)
        if len(batch) >= chunk:
            flush()
    if sizes:
        flush()
    return _fill_gaps(np.array(q, np.float64)), dims, n_docs


def _one_cluster(scores: Sequence[Scores | None]) -> tuple[float, Scores]:
    """(Q of the scored documents, or NaN when none was scored; their mean per dimension)."""
    ok = [s for s in scores if s is not None]
    if not ok:
        return math.nan, {}
    return float(np.mean([doc_quality(s) for s in ok])), {
        key: float(np.mean([s[key] for s in ok])) for key in SCORE_KEYS
    }


def _fill_gaps(q: np.ndarray) -> np.ndarray:
    """A cluster with no scored document gets the mean Q of the others; 0.5 each when none was."""
    if np.isnan(q).all():
        q[:] = 0.5
    else:
        q[np.isnan(q)] = np.nanmean(q)
    return q
