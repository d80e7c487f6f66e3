"""The LLM judge client against a hostile server: every reply, however malformed, slow or
large, leaves the document unscored and counted, within the request's total deadline, and
never raises out of `score()` or `grip prepare`."""

from __future__ import annotations

import json
import shutil
import subprocess
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest

from grip_loop.judge import SCORE_KEYS, JudgeInput, LLMJudge, parse_scores, strict_json
from grip_loop.prepare import prepare
from tests.reliability._fake_encoder import install
from tests.reliability.test_prepare_faults import _cfg, small_corpus


def _reply(content) -> bytes:
    return json.dumps({"choices": [{"message": {"role": "assistant", "content": content}}]}).encode()


GOOD_SCORES = {k: 7 for k in SCORE_KEYS}
GOOD = _reply(json.dumps(GOOD_SCORES))
DUP_SCORES = '{"syntax_integrity_score": 1, ' + json.dumps(GOOD_SCORES)[1:]  # the first key twice
DEEP = 100_000


class _Hostile(BaseHTTPRequestHandler):
    """`POST /<mode>/chat/completions` answers with the hostile reply named by <mode>."""

    stop = threading.Event()
    protocol_version = "HTTP/1.1"

    def _send(self, body: bytes, status: int = 200, length: int | None = None, chunked: bool = False) -> None:
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        if chunked:
            self.send_header("Transfer-Encoding", "chunked")
        elif length is not None:
            self.send_header("Content-Length", str(length))
        self.send_header("Connection", "close")
        self.end_headers()
        self.wfile.write(body)

    def _trickle(self, raw: bytes) -> None:
        for i in range(len(raw)):
            if self.stop.wait(0.5):
                return
            self.wfile.write(raw[i : i + 1])
            self.wfile.flush()

    def do_POST(self):  # noqa: C901  (one branch per hostile reply)
        self.rfile.read(int(self.headers["Content-Length"]))
        mode = self.path.split("/")[1]
        self.close_connection = True
        try:
            if mode == "good":
                self._send(GOOD, length=len(GOOD))
            elif mode == "nested":  # the whole body 100k arrays deep
                body = b"[" * DEEP + b"]" * DEEP
                self._send(body, length=len(body))
            elif mode == "nested_field":  # a valid reply with a 100k-deep extra field
                body = GOOD[:-1] + b', "x": ' + b"[" * DEEP + b"]" * DEEP + b"}"
                self._send(body, length=len(body))
            elif mode == "truncated":  # Content-Length says more than comes
                self._send(GOOD[: len(GOOD) // 2], length=len(GOOD))
            elif mode == "truncated_chunked":
                self._send(b"%x\r\n" % len(GOOD) + GOOD[:20], chunked=True)
            elif mode == "trickle":  # a valid reply, one byte every half second
                self.send_response(200)
                self.send_header("Content-Length", str(len(GOOD)))
                self.end_headers()
                self._trickle(GOOD)
            elif mode == "trickle_headers":  # even the status line trickles
                self._trickle(b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\n\r\n" % len(GOOD) + GOOD)
            elif mode == "silent":
                self.stop.wait(30)
            elif mode == "dup_scores":
                body = _reply(DUP_SCORES)
                self._send(body, length=len(body))
            elif mode == "dup_envelope":  # a bad reply, then a good one under the same key
                body = b'{"choices": [], ' + GOOD[1:]
                self._send(body, length=len(body))
            elif mode == "huge":  # a valid reply padded to 8 MiB, announced
                body = GOOD + b" " * (8 << 20)
                self._send(body, length=len(body))
            elif mode == "huge_unannounced":  # the same, no Content-Length: read until close
                self.send_response(200)
                self.end_headers()
                for _ in range(128):
                    self.wfile.write(b" " * (64 << 10))
                self.wfile.write(GOOD)
            elif mode == "choices_str":
                body = b'{"choices": "7"}'
                self._send(body, length=len(body))
            elif mode == "content_int":
                body = _reply(7)
                self._send(body, length=len(body))
            elif mode == "content_null":
                body = _reply(None)
                self._send(body, length=len(body))
            elif mode == "scores_str":
                body = _reply(json.dumps({k: "7" for k in SCORE_KEYS}))
                self._send(body, length=len(body))
            elif mode == "scores_nan":
                body = _reply(json.dumps(GOOD_SCORES).replace(": 7", ": NaN", 1))
                self._send(body, length=len(body))
            elif mode == "envelope_nan":
                body = GOOD[:-1] + b', "usage": NaN}'
                self._send(body, length=len(body))
            elif mode == "http500":
                self._send(b"oops", status=500, length=4)
            elif mode == "not_utf8":
                body = b"\xff\xfe\x00{\x00" * 10
                self._send(body, length=len(body))
            elif mode == "empty":
                self._send(b"", length=0)
        except OSError:
            pass  # the client hung up: that is the point

    def log_message(self, *args):
        pass


@pytest.fixture(scope="module")
def hostile():
    _Hostile.stop.clear()
    srv = ThreadingHTTPServer(("127.0.0.1", 0), _Hostile)
    srv.daemon_threads = True
    t = threading.Thread(target=srv.serve_forever, daemon=True)
    t.start()
    yield f"http://127.0.0.1:{srv.server_address[1]}"
    _Hostile.stop.set()
    srv.shutdown()
    srv.server_close()


HOSTILE = {  # mode -> the failure it is counted as
    "nested": "bad_json",
    "nested_field": "bad_json",
    "truncated": "truncated",
    "truncated_chunked": "truncated",
    "trickle": "timeout",
    "trickle_headers": "timeout",
    "silent": "timeout",
    "dup_scores": "bad_scores",
    "dup_envelope": "bad_json",
    "huge": "too_large",
    "huge_unannounced": "too_large",
    "choices_str": "bad_shape",
    "content_int": "bad_shape",
    "content_null": "bad_shape",
    "scores_str": "bad_scores",
    "scores_nan": "bad_scores",
    "envelope_nan": "bad_json",
    "http500": "http",
    "not_utf8": "bad_json",
    "empty": "bad_json",
}
TIMEOUT = 1.0


def test_the_hostile_server_answers_well_when_asked_to(hostile):
    judge = LLMJudge(f"{hostile}/good", "m", max_retries=0, timeout_s=TIMEOUT)
    assert judge.score([JudgeInput("a", "print(1)")]) == [{k: 7.0 for k in SCORE_KEYS}]


@pytest.mark.parametrize("mode", sorted(HOSTILE))
def test_every_hostile_reply_leaves_the_document_unscored_and_counted_within_the_deadline(
    hostile, mode, capsys
):
    judge = LLMJudge(f"{hostile}/{mode}", "m", max_retries=0, timeout_s=TIMEOUT, max_reply_bytes=1 << 20)
    t0 = time.monotonic()
    got = judge.score([JudgeInput("a", "def f():\n    return 1\n")])
    took = time.monotonic() - t0
    assert got == [None]
    assert judge.stats["unscored"] == 1 and judge.stats["requests"] == 1
    assert judge.stats["failure_reasons"] == {HOSTILE[mode]: 1}
    assert judge.stats["http_failures"] + judge.stats["parse_failures"] == 1
    assert took < TIMEOUT + 15.0, f"{mode}: {took:.1f} s for a {TIMEOUT} s deadline"
    assert "1 of 1 documents left unscored" in capsys.readouterr().out


def test_the_deadline_bounds_every_retry(hostile):
    judge = LLMJudge(f"{hostile}/trickle", "m", max_retries=2, timeout_s=TIMEOUT, concurrency=2)
    t0 = time.monotonic()
    assert judge.score([JudgeInput("a", "x = 1"), JudgeInput("b", "y = 2")]) == [None, None]
    assert time.monotonic() - t0 < 3 * TIMEOUT + 20.0
    assert judge.stats["failure_reasons"] == {"timeout": 6} and judge.stats["unscored"] == 2


def test_parse_scores_rejects_duplicate_keys_and_nan():
    with pytest.raises(ValueError, match="duplicate key 'syntax_integrity_score'"):
        parse_scores(DUP_SCORES)
    with pytest.raises(ValueError, match="NaN"):
        parse_scores(json.dumps(GOOD_SCORES).replace("7", "NaN", 1))
    with pytest.raises(ValueError, match="duplicate key"):
        strict_json('{"a": {"b": 1, "b": 2}}')
    with pytest.raises(ValueError, match="nested too deeply"):
        strict_json("[" * DEEP + "]" * DEEP)


def test_prepare_with_a_hostile_judge_finishes_with_every_probe_document_unscored(
    hostile, tmp_path, monkeypatch, capsys
):
    install(monkeypatch)  # a fake encoder: the judge is what is tested
    corpus = small_corpus(tmp_path / "corpus")
    judge = {"kind": "llm", "base_url": f"{hostile}/nested", "model": "m", "max_retries": 0, "timeout_s": 5}
    m = prepare(_cfg(corpus, tmp_path / "out", judge=judge))
    stats = m.stats["judge"]
    assert stats["unscored"] == m.stats["probe_docs"] == stats["failure_reasons"]["bad_json"]
    assert all(c.quality == 0.5 for c in m.clusters)  # nothing scored: neutral Q_k
    assert (
        f"{m.stats['probe_docs']} of {m.stats['probe_docs']} documents left unscored"
        in capsys.readouterr().out
    )


def test_a_damaged_judge_cache_is_skipped_line_by_line_and_appending_starts_a_fresh_line(hostile, tmp_path):
    cache = tmp_path / "judge_cache.jsonl"
    ok = json.dumps({"key": "k1", "id": "a", "scores": GOOD_SCORES})
    bad = [
        b"\xff\xfe not utf-8",
        json.dumps({"key": "k2", "scores": {k: "x" for k in SCORE_KEYS}}).encode(),
        json.dumps({"key": "k3", "scores": {k: 11 for k in SCORE_KEYS}}).encode(),
        b'{"key": "k4", "scores": {"syntax_integrity_score": NaN}}',
        b"[" * DEEP,
    ]
    cache.write_bytes(ok.encode() + b"\n" + b"\n".join(bad) + b'\n{"key": "k5", "sco')  # torn last line
    judge = LLMJudge(f"{hostile}/good", "m", cache_path=cache, max_retries=0, timeout_s=TIMEOUT)
    assert list(judge._cache) == ["k1"]
    assert judge.score([JudgeInput("a", "print(2)")]) == [{k: 7.0 for k in SCORE_KEYS}]
    last = cache.read_bytes().splitlines()[-1]
    assert json.loads(last)["id"] == "a"  # on its own line, not glued to the torn one
    again = LLMJudge(f"{hostile}/good", "m", cache_path=cache)
    assert len(again._cache) == 2


def test_a_cache_that_cannot_be_written_does_not_stop_scoring(hostile, tmp_path, capsys):
    cache = tmp_path / "cache_is_a_directory"
    cache.mkdir()
    judge = LLMJudge(f"{hostile}/good", "m", cache_path=cache, max_retries=0, timeout_s=TIMEOUT)
    docs = [JudgeInput("a", "print(3)"), JudgeInput("b", "print(4)")]
    assert judge.score(docs) == [{k: 7.0 for k in SCORE_KEYS}] * 2
    assert capsys.readouterr().out.count("judge scores are no longer cached") == 1


@pytest.mark.skipif(
    shutil.which("openssl") is None, reason="needs the openssl command for a test certificate"
)
def test_the_deadline_holds_over_tls(tmp_path, monkeypatch):
    """Over HTTPS the socket the deadline must shut down is the one TLS wraps (the wrapping
    closes the original socket object): a trickling TLS server is cut off in time too."""
    import ssl

    cert, key = tmp_path / "cert.pem", tmp_path / "key.pem"
    subprocess.run(
        ["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-keyout", str(key), "-out", str(cert)]
        + ["-days", "1", "-subj", "/CN=127.0.0.1", "-addext", "subjectAltName=IP:127.0.0.1"],
        check=True,
        capture_output=True,
    )
    monkeypatch.setenv("SSL_CERT_FILE", str(cert))  # the client trusts this certificate
    _Hostile.stop.clear()
    srv = ThreadingHTTPServer(("127.0.0.1", 0), _Hostile)
    srv.daemon_threads = True
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.load_cert_chain(cert, key)
    srv.socket = ctx.wrap_socket(srv.socket, server_side=True)
    threading.Thread(target=srv.serve_forever, daemon=True).start()
    base = f"https://127.0.0.1:{srv.server_address[1]}"
    try:
        judge = LLMJudge(f"{base}/good", "m", max_retries=0, timeout_s=TIMEOUT)
        assert judge.score([JudgeInput("a", "x = 1")]) == [{k: 7.0 for k in SCORE_KEYS}]
        for mode in ("trickle", "trickle_headers"):
            judge = LLMJudge(f"{base}/{mode}", "m", max_retries=0, timeout_s=TIMEOUT)
            t0 = time.monotonic()
            assert judge.score([JudgeInput("a", "x = 1")]) == [None]
            assert time.monotonic() - t0 < TIMEOUT + 15.0  # a trickled reply takes > 60 s
            assert judge.stats["failure_reasons"] == {"timeout": 1}
    finally:
        _Hostile.stop.set()
        srv.shutdown()
        srv.server_close()
