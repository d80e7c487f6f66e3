"""The `llm` judge: Appendix A.1 over an OpenAI-compatible `/chat/completions` endpoint, with a
total deadline per request, a bounded reply, retries and a JSONL cache (docs/reliability.md)."""

from __future__ import annotations

import http.client
import json
import socket
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from grip_loop.rubric import (
    RUBRIC_PROMPT,
    SCORE_KEYS,
    JudgeInput,
    Scores,
    parse_scores,
    strict_json,
    text_sha256,
)

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
            # the socket's own timeout can fire before the deadline's timer does (a loaded
            # machine, a connect that never completes): a timeout too, not a connection failure
            timed_out = isinstance(exc, TimeoutError) or isinstance(
                getattr(exc, "reason", None), TimeoutError
            )
            if deadline.expired or timed_out:
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
