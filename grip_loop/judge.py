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
import hashlib
import http.client
import json
import math
import re
import socket
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


class JudgeFailure(Exception):
    """One failed request: `reason` is a short category (counted in `LLMJudge.stats`)."""

    def __init__(self, reason: str, detail: str) -> None:
        super().__init__(f"{reason}: {detail}")
        self.reason, self.detail = reason, detail


_TRANSPORT = ("timeout", "http", "connection", "truncated", "too_large")


class _Deadline:
    """The total time of one request. When it is up, every connection the request opened is
    shut down, which wakes whatever call is blocked on it (connect, TLS handshake, the status
    line, a header, the body): a server that trickles a byte every few seconds cannot hold a
    request past it. `close` (always call it) cancels the timer."""

    def __init__(self, seconds: float) -> None:
        self.seconds = seconds
        self.expired = False
        self._socks: list[socket.socket] = []  # duplicates: TLS wrapping closes the original object
        self._lock = threading.Lock()
        self._closed = False
        self._timer = threading.Timer(seconds, self._expire)
        self._timer.daemon = True
        self._timer.start()

    @staticmethod
    def _shutdown(sock: socket.socket) -> None:
        try:  # shutdown acts on the connection, not on the descriptor: every copy sees EOF
            sock.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass

    def attach(self, sock: socket.socket) -> socket.socket:
        with self._lock:
            if not self._closed:
                dup = sock.dup()
                self._socks.append(dup)
                if self.expired:
                    self._shutdown(dup)
        return sock

    def _expire(self) -> None:
        with self._lock:
            if self._closed:
                return
            self.expired = True
            for sock in self._socks:
                self._shutdown(sock)

    def close(self) -> None:
        self._timer.cancel()
        with self._lock:
            self._closed = True
            for sock in self._socks:
                sock.close()
            self._socks.clear()

    def opener(self) -> urllib.request.OpenerDirector:
        """A urllib opener (proxies and redirects as usual) whose connections obey this deadline."""
        deadline = self

        def bound(http_class):
            class Bound(http_class):
                def __init__(self, *a, **kw):
                    super().__init__(*a, **kw)
                    create = self._create_connection
                    self._create_connection = lambda *a2, **kw2: deadline.attach(create(*a2, **kw2))

            return Bound

        class HTTP(urllib.request.HTTPHandler):
            def do_open(self, http_class, req, **kw):
                return super().do_open(bound(http_class), req, **kw)

        class HTTPS(urllib.request.HTTPSHandler):
            def do_open(self, http_class, req, **kw):
                return super().do_open(bound(http_class), req, **kw)

        return urllib.request.build_opener(HTTP(), HTTPS())


class LLMJudge:
    """Appendix A.1 protocol over an OpenAI-compatible chat endpoint, cached by document hash.

    Every request has a total deadline of `timeout_s` (connect, headers and body together) and
    a reply is read up to `max_reply_bytes`. Any failure (no connection, an HTTP error, the
    deadline, a reply cut short, too large, not JSON, nested too deeply, duplicate keys, NaN,
    another shape, scores out of range) is retried up to `max_retries` times; then the document
    is left unscored. Nothing a server sends can raise out of `score`. `stats` counts requests,
    failures by reason (`failure_reasons`) and unscored documents; `score` prints a one-line
    warning when documents were left unscored.
    """

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
        max_reply_bytes: int = 1 << 20,
    ) -> None:
        self.url = base_url.rstrip("/") + "/chat/completions"
        self.model, self.api_key = model, api_key
        self.max_retries, self.timeout_s, self.max_chars = max_retries, timeout_s, max_chars
        self.concurrency, self.max_tokens, self.max_reply_bytes = concurrency, max_tokens, max_reply_bytes
        self.cache_path = Path(cache_path) if cache_path else None
        self._cache: dict[str, Scores] = {}
        self._cache_ok = True
        self._cache_needs_newline = False
        self._lock = threading.Lock()
        self.stats: dict = {
            "requests": 0,
            "cache_hits": 0,
            "parse_failures": 0,
            "http_failures": 0,
            "unscored": 0,
            "failure_reasons": {},
        }
        self._examples: dict[str, str] = {}
        if self.cache_path and self.cache_path.is_file():
            raw = self.cache_path.read_bytes()
            self._cache_needs_newline = bool(raw) and not raw.endswith(b"\n")
            for line in raw.splitlines():
                try:  # a line torn by a crash or a full disk: that document is simply scored again
                    rec = strict_json(line)
                    scores = {k: float(rec["scores"][k]) for k in SCORE_KEYS}
                except (ValueError, KeyError, TypeError):
                    continue
                if all(0 <= v <= 10 for v in scores.values()) and isinstance(rec.get("key"), str):
                    self._cache[rec["key"]] = scores

    def _key(self, text: str) -> str:
        return text_sha256(self.model + "\x00" + text[: self.max_chars])

    def _post(self, body: bytes, headers: dict) -> bytes:
        """The reply body of one POST, within the deadline and the size bound (JudgeFailure if not)."""
        deadline = _Deadline(self.timeout_s)
        req = urllib.request.Request(self.url, data=body, headers=headers, method="POST")
        try:
            with deadline.opener().open(req, timeout=self.timeout_s) as resp:
                length = resp.headers.get("Content-Length")
                if length and length.strip().isdigit() and int(length) > self.max_reply_bytes:
                    raise JudgeFailure(
                        "too_large", f"Content-Length {int(length)} > {self.max_reply_bytes} bytes"
                    )
                chunks, size = [], 0
                while chunk := resp.read(1 << 16):
                    size += len(chunk)
                    if size > self.max_reply_bytes:
                        raise JudgeFailure("too_large", f"reply over {self.max_reply_bytes} bytes")
                    chunks.append(chunk)
                    if deadline.expired:
                        break
                if not deadline.expired and isinstance(resp.length, int) and resp.length > 0:
                    raise JudgeFailure(
                        "truncated", f"reply cut short: {resp.length} of Content-Length missing"
                    )
        except JudgeFailure:
            raise
        except urllib.error.HTTPError as exc:
            exc.close()
            raise JudgeFailure("http", f"HTTP {exc.code} {exc.reason}") from None
        except http.client.IncompleteRead as exc:
            if deadline.expired:
                raise JudgeFailure("timeout", f"no complete reply within {self.timeout_s} s") from None
            raise JudgeFailure("truncated", f"reply cut short after {len(exc.partial)} bytes") from None
        except (OSError, http.client.HTTPException, ValueError) as exc:  # URLError is an OSError
            if deadline.expired:
                raise JudgeFailure("timeout", f"no complete reply within {self.timeout_s} s") from None
            raise JudgeFailure("connection", f"{type(exc).__name__}: {exc}") from None
        finally:
            deadline.close()
        if deadline.expired:  # the socket was shut down: what was read is a prefix at best
            raise JudgeFailure("timeout", f"no complete reply within {self.timeout_s} s")
        return b"".join(chunks)

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
        raw = self._post(json.dumps(body).encode(), headers)
        try:
            payload = strict_json(raw)
        except ValueError as exc:  # includes JSONDecodeError and UnicodeDecodeError
            raise JudgeFailure("bad_json", str(exc)[:200]) from None
        try:
            content = payload["choices"][0]["message"]["content"]
        except (KeyError, IndexError, TypeError):
            raise JudgeFailure("bad_shape", "no choices[0].message.content") from None
        if not isinstance(content, str):
            raise JudgeFailure("bad_shape", f"message content is {type(content).__name__}, not a string")
        return content

    def _fail(self, exc: JudgeFailure) -> None:
        with self._lock:
            self.stats["http_failures" if exc.reason in _TRANSPORT else "parse_failures"] += 1
            reasons = self.stats["failure_reasons"]
            reasons[exc.reason] = reasons.get(exc.reason, 0) + 1
            self._examples.setdefault(exc.reason, exc.detail)

    def _remember(self, key: str, doc: JudgeInput, scores: Scores) -> None:
        with self._lock:
            self._cache[key] = scores
            if not (self.cache_path and self._cache_ok):
                return
            line = json.dumps({"key": key, "id": doc.id, "scores": scores}) + "\n"
            if self._cache_needs_newline:  # the last line was torn: start on a fresh one
                line = "\n" + line
            try:
                self.cache_path.parent.mkdir(parents=True, exist_ok=True)
                with open(self.cache_path, "a", encoding="utf-8") as fh:
                    fh.write(line)
                self._cache_needs_newline = False
            except OSError as exc:  # a full disk: keep scoring, stop caching
                self._cache_ok = False
                print(
                    f"warning: {self.cache_path}: cannot append ({exc.strerror}); judge scores are no longer cached"
                )

    def _score_one(self, doc: JudgeInput) -> Scores | None:
        key = self._key(doc.text)
        with self._lock:
            if key in self._cache:
                self.stats["cache_hits"] += 1
                return self._cache[key]
        for attempt in range(self.max_retries + 1):
            with self._lock:
                self.stats["requests"] += 1
            try:
                try:
                    content = self._request(doc.text)
                except JudgeFailure:
                    raise
                except Exception as exc:  # anything else a reply can provoke: still this document's failure
                    raise JudgeFailure("error", f"{type(exc).__name__}: {exc}") from None
                try:
                    scores = parse_scores(content)
                except (ValueError, TypeError) as exc:
                    raise JudgeFailure("bad_scores", str(exc)[:200]) from None
            except JudgeFailure as exc:
                self._fail(exc)
                if exc.reason == "connection":
                    time.sleep(min(2.0**attempt, 10.0) * 0.1)
                continue
            self._remember(key, doc, scores)
            return scores
        with self._lock:
            self.stats["unscored"] += 1
        return None

    def score(self, docs: Sequence[JudgeInput]) -> list[Scores | None]:
        with ThreadPoolExecutor(max_workers=max(1, self.concurrency)) as pool:
            out = list(pool.map(self._score_one, docs))
        missing = sum(s is None for s in out)
        if missing:
            why = "; ".join(
                f"{reason} x{n} (e.g. {self._examples.get(reason, '')[:120]})"
                for reason, n in sorted(self.stats["failure_reasons"].items())
            )
            print(f"warning: judge {self.url}: {missing} of {len(docs)} documents left unscored: {why}")
        return out


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
    timeout_s: float = 120.0
    """llm: total seconds of one request (connect, headers and body together), not per read."""
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
        t = self.timeout_s
        if isinstance(t, bool) or not isinstance(t, int | float) or not math.isfinite(t) or t <= 0:
            raise ValueError(f"judge.timeout_s: must be a finite number of seconds > 0, got {t!r}")
        if self.concurrency < 1:
            raise ValueError(f"judge.concurrency: must be >= 1, got {self.concurrency}")

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
