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
  integer keys in [0, 10]; anything else is retried (`max_retries`), then the document
  counts as unscored. Results are cached in a JSONL file keyed by sha256(model, text),
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
import hashlib
import json
import math
import re
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

import numpy as np

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


def parse_scores(reply: str) -> Scores:
    """The four scores from a judge reply: exactly one JSON object with the four integer keys in [0, 10].

    Tolerates a Markdown code fence around the object (models add them despite the
    prompt); rejects missing/extra keys, non-integers and out-of-range values (ValueError).
    """
    objs = re.findall(r"\{[^{}]*\}", reply, flags=re.S)
    if len(objs) != 1:
        raise ValueError(f"expected exactly one JSON object in the reply, found {len(objs)}")
    data = json.loads(objs[0])
    if set(data) != set(SCORE_KEYS):
        raise ValueError(f"expected keys {sorted(SCORE_KEYS)}, got {sorted(data)}")
    out = {}
    for k in SCORE_KEYS:
        v = data[k]
        if isinstance(v, bool) or not isinstance(v, int) or not 0 <= v <= 10:
            raise ValueError(f"{k}: expected an integer in [0, 10], got {v!r}")
        out[k] = float(v)
    return out


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
# LLM judge over an OpenAI-compatible endpoint


class LLMJudge:
    """Appendix A.1 protocol over an OpenAI-compatible chat endpoint, cached by document hash."""

    def __init__(
        self,
        base_url: str,
        model: str,
        *,
        api_key: str | None = None,
        cache_path: str | Path | None = None,
        max_retries: int = 3,
        timeout_s: float = 120.0,
        max_chars: int = 16_000,
        concurrency: int = 8,
        max_tokens: int = 256,
    ) -> None:
        self.url = base_url.rstrip("/") + "/chat/completions"
        self.model, self.api_key = model, api_key
        self.max_retries, self.timeout_s, self.max_chars = max_retries, timeout_s, max_chars
        self.concurrency, self.max_tokens = concurrency, max_tokens
        self.cache_path = Path(cache_path) if cache_path else None
        self._cache: dict[str, Scores] = {}
        self._lock = threading.Lock()
        self.stats = {"requests": 0, "cache_hits": 0, "parse_failures": 0, "http_failures": 0, "unscored": 0}
        if self.cache_path and self.cache_path.is_file():
            for line in self.cache_path.read_text().splitlines():
                try:
                    rec = json.loads(line)
                    self._cache[rec["key"]] = {k: float(rec["scores"][k]) for k in SCORE_KEYS}
                except (json.JSONDecodeError, KeyError, TypeError):
                    continue  # a line torn by a crash: that document is simply scored again

    def _key(self, text: str) -> str:
        return text_sha256(self.model + "\x00" + text[: self.max_chars])

    def _request(self, text: str) -> str:
        body = {
            "model": self.model,
            "messages": [
                {"role": "system", "content": RUBRIC_PROMPT},
                {"role": "user", "content": text[: self.max_chars]},
            ],
            "temperature": 0.0,
            "max_tokens": self.max_tokens,
        }
        headers = {"Content-Type": "application/json"}
        if self.api_key:
            headers["Authorization"] = f"Bearer {self.api_key}"
        req = urllib.request.Request(self.url, data=json.dumps(body).encode(), headers=headers, method="POST")
        with urllib.request.urlopen(req, timeout=self.timeout_s) as resp:
            payload = json.loads(resp.read())
        return payload["choices"][0]["message"]["content"]

    def _score_one(self, doc: JudgeInput) -> Scores | None:
        key = self._key(doc.text)
        with self._lock:
            if key in self._cache:
                self.stats["cache_hits"] += 1
                return self._cache[key]
        for attempt in range(self.max_retries + 1):
            try:
                with self._lock:
                    self.stats["requests"] += 1
                scores = parse_scores(self._request(doc.text))
            except (
                urllib.error.URLError,
                TimeoutError,
                ConnectionError,
                KeyError,
                IndexError,
                TypeError,
            ) as exc:
                with self._lock:
                    self.stats["http_failures"] += 1
                if isinstance(exc, urllib.error.URLError) and not isinstance(exc, urllib.error.HTTPError):
                    time.sleep(min(2.0**attempt, 10.0) * 0.1)
                continue
            except ValueError:  # includes json.JSONDecodeError
                with self._lock:
                    self.stats["parse_failures"] += 1
                continue
            with self._lock:
                self._cache[key] = scores
                if self.cache_path:
                    self.cache_path.parent.mkdir(parents=True, exist_ok=True)
                    with open(self.cache_path, "a") as fh:
                        fh.write(json.dumps({"key": key, "id": doc.id, "scores": scores}) + "\n")
            return scores
        with self._lock:
            self.stats["unscored"] += 1
        return None

    def score(self, docs: Sequence[JudgeInput]) -> list[Scores | None]:
        with ThreadPoolExecutor(max_workers=max(1, self.concurrency)) as pool:
            return list(pool.map(self._score_one, docs))


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
    concurrency: int = 8
    timeout_s: float = 120.0
    scores_path: str | None = None
    """file: JSONL of precomputed scores."""

    def __post_init__(self) -> None:
        if self.kind not in JUDGES:
            raise ValueError(f"judge.kind: must be one of {sorted(JUDGES)}, got {self.kind!r}")
        if self.kind == "llm" and not (self.base_url and self.model):
            raise ValueError("judge.base_url and judge.model: both are required for kind 'llm'")
        if self.kind == "file" and not self.scores_path:
            raise ValueError("judge.scores_path: required for kind 'file'")
        if self.max_retries < 0:
            raise ValueError(f"judge.max_retries: must be >= 0, got {self.max_retries}")

    def build(self, cache_dir: str | Path | None = None) -> Judge:
        import os

        if self.kind == "llm":
            return LLMJudge(
                self.base_url,
                self.model,
                api_key=os.environ.get(self.api_key_env),
                cache_path=Path(cache_dir) / "judge_cache.jsonl" if cache_dir else None,
                max_retries=self.max_retries,
                timeout_s=self.timeout_s,
                concurrency=self.concurrency,
            )
        return JUDGES[self.kind](self.scores_path) if self.kind == "file" else JUDGES[self.kind]()


JUDGES: dict[str, type] = {"heuristic": HeuristicJudge, "llm": LLMJudge, "file": FileJudge}


def doc_quality(scores: Scores) -> float:
    """One document's quality on [0, 1]: mean of the four 0-10 scores / 10."""
    return float(np.mean([scores[k] for k in SCORE_KEYS])) / 10.0


def cluster_quality(per_cluster: Sequence[Sequence[Scores | None]]) -> tuple[np.ndarray, list[Scores]]:
    """(Q_k on [0, 1], mean score per dimension) per cluster; see the module docstring for gaps."""
    q = np.full(len(per_cluster), np.nan)
    dims: list[Scores] = []
    for k, scores in enumerate(per_cluster):
        ok = [s for s in scores if s is not None]
        if ok:
            q[k] = float(np.mean([doc_quality(s) for s in ok]))
            dims.append({key: float(np.mean([s[key] for s in ok])) for key in SCORE_KEYS})
        else:
            dims.append({})
    if np.isnan(q).all():
        q[:] = 0.5
    else:
        q[np.isnan(q)] = np.nanmean(q)
    return q, dims
