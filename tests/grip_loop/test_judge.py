import json
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import numpy as np
import pytest

from grip_loop.judge import (
    RUBRIC_PROMPT,
    SCORE_KEYS,
    FileJudge,
    HeuristicJudge,
    JudgeConfig,
    JudgeInput,
    LLMJudge,
    cluster_quality,
    parse_scores,
    score_clusters,
    text_sha256,
)

GOOD = '''"""Binary search over a sorted list."""


def bisect_left(items: list[int], target: int) -> int:
    """Index of the first element >= target (len(items) if none)."""
    if items is None:
        raise ValueError("items must be a list")
    lo, hi = 0, len(items)
    while lo < hi:
        mid = (lo + hi) // 2  # floor division keeps mid in range
        if items[mid] < target:
            lo = mid + 1
        else:
            hi = mid
    return lo


class Index:
    """A sorted index supporting membership queries."""

    def __init__(self, items):
        self.items = sorted(items)

    def __contains__(self, x):
        i = bisect_left(self.items, x)
        return i < len(self.items) and self.items[i] == x
'''
BROKEN = "print 'hello'\nx=1;y=2;print x+y\nif x:\n"
TRIVIAL = "print(1)\n"


def test_parse_scores_is_strict():
    ok = {k: 7 for k in SCORE_KEYS}
    assert parse_scores(json.dumps(ok)) == {k: 7.0 for k in SCORE_KEYS}
    assert parse_scores("```json\n" + json.dumps(ok) + "\n```") == {k: 7.0 for k in SCORE_KEYS}
    for bad in [
        "no json here",
        json.dumps({**ok, "extra": 1}),
        json.dumps({k: 7 for k in SCORE_KEYS[:3]}),
        json.dumps({**ok, SCORE_KEYS[0]: 11}),
        json.dumps({**ok, SCORE_KEYS[0]: 7.5}),
        json.dumps(ok) + json.dumps(ok),
    ]:
        with pytest.raises(ValueError):
            parse_scores(bad)


def test_heuristic_ranks_good_over_broken_and_trivial():
    j = HeuristicJudge()
    good, broken, trivial = (j.score_one(t, "python") for t in (GOOD, BROKEN, TRIVIAL))
    for s in (good, broken, trivial):
        assert set(s) == set(SCORE_KEYS) and all(0 <= v <= 10 for v in s.values())
    assert good["syntax_integrity_score"] > broken["syntax_integrity_score"] + 3
    assert good["architecture_score"] > trivial["architecture_score"]
    assert good["educational_value_score"] > trivial["educational_value_score"]
    assert good["technical_depth_score"] > trivial["technical_depth_score"]
    rust = j.score_one('fn main() {\n    // say hi\n    println!("hi");\n}\n', "rust")
    assert rust["syntax_integrity_score"] > j.score_one("fn main() {\n", "rust")["syntax_integrity_score"]


class _FakeOpenAI(BaseHTTPRequestHandler):
    """Answers /v1/chat/completions; the first reply per document is malformed, then valid."""

    seen: dict = {}
    bodies: list = []

    def do_POST(self):
        body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
        type(self).bodies.append(body)
        text = body["messages"][1]["content"]
        n = type(self).seen[text] = type(self).seen.get(text, 0) + 1
        if n == 1:
            content = "Sure! Here are my thoughts, no JSON"
        else:
            score = min(10, len(text) % 11)
            content = "```json\n" + json.dumps({k: score for k in SCORE_KEYS}) + "\n```"
        payload = json.dumps({"choices": [{"message": {"role": "assistant", "content": content}}]}).encode()
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(payload)))
        self.end_headers()
        self.wfile.write(payload)

    def log_message(self, *args):
        pass


@pytest.fixture
def server():
    _FakeOpenAI.seen, _FakeOpenAI.bodies = {}, []
    srv = ThreadingHTTPServer(("127.0.0.1", 0), _FakeOpenAI)
    t = threading.Thread(target=srv.serve_forever, daemon=True)
    t.start()
    yield f"http://127.0.0.1:{srv.server_address[1]}/v1"
    srv.shutdown()
    srv.server_close()


def test_llm_judge_retries_parses_and_caches(server, tmp_path):
    docs = [JudgeInput(f"d{i}", "x" * (i + 3)) for i in range(5)]
    judge = LLMJudge(server, "fake-model", cache_path=tmp_path / "cache.jsonl", concurrency=3)
    scores = judge.score(docs)
    assert [s[SCORE_KEYS[0]] for s in scores] == [float((i + 3) % 11) for i in range(5)]
    assert judge.stats["parse_failures"] == 5 and judge.stats["requests"] == 10
    body = _FakeOpenAI.bodies[0]
    assert body["model"] == "fake-model" and body["temperature"] == 0.0
    assert body["messages"][0] == {"role": "system", "content": RUBRIC_PROMPT}
    # a second judge reads the cache and sends nothing
    n_before = len(_FakeOpenAI.bodies)
    again = LLMJudge(server, "fake-model", cache_path=tmp_path / "cache.jsonl")
    assert again.score(docs) == scores
    assert len(_FakeOpenAI.bodies) == n_before and again.stats["cache_hits"] == 5


def test_llm_judge_gives_up_after_retries(server):
    judge = LLMJudge(server, "m", max_retries=0)
    assert judge.score([JudgeInput("a", "abc")]) == [None]
    assert judge.stats["unscored"] == 1


def test_llm_judge_unreachable_endpoint_is_unscored():
    judge = LLMJudge("http://127.0.0.1:9/v1", "m", max_retries=1, timeout_s=2)
    assert judge.score([JudgeInput("a", "abc")]) == [None]
    assert judge.stats["http_failures"] == 2


def test_file_judge_by_id_and_hash(tmp_path):
    path = tmp_path / "scores.jsonl"
    recs = [
        {"id": "a", **{k: 8 for k in SCORE_KEYS}},
        {"sha256": text_sha256("hello"), **{k: 2 for k in SCORE_KEYS}},
    ]
    path.write_text("\n".join(json.dumps(r) for r in recs))
    j = JudgeConfig(kind="file", scores_path=str(path)).build()
    got = j.score([JudgeInput("a", "zzz"), JudgeInput("b", "hello"), JudgeInput("c", "none")])
    assert got[0][SCORE_KEYS[0]] == 8 and got[1][SCORE_KEYS[3]] == 2 and got[2] is None
    path.write_text('{"id": "a", "syntax_integrity_score": 3}\n')
    with pytest.raises(ValueError, match="scores.jsonl:1"):
        FileJudge(path)


def test_cluster_quality_mean_over_probe_docs_and_gaps():
    s = lambda v: {k: float(v) for k in SCORE_KEYS}  # noqa: E731
    q, dims = cluster_quality([[s(8), s(6)], [None, s(2)], [None]])
    assert np.allclose(q, [0.7, 0.2, 0.45])
    assert dims[0][SCORE_KEYS[1]] == 7.0 and dims[2] == {}


def test_config_validation_names_fields():
    with pytest.raises(ValueError, match="judge.kind"):
        JudgeConfig(kind="oracle")
    with pytest.raises(ValueError, match="judge.base_url"):
        JudgeConfig(kind="llm")


class _CountingJudge:
    """Scores by a hash of the text, None for some documents; records the size of every call."""

    def __init__(self) -> None:
        self.calls: list[int] = []

    def score(self, docs):
        self.calls.append(len(docs))
        out = []
        for d in docs:
            h = int(text_sha256(d.text)[:8], 16)
            out.append(
                None if h % 5 == 0 else {k: float((h >> (3 * j)) % 11) for j, k in enumerate(SCORE_KEYS)}
            )
        return out


@pytest.mark.parametrize("seed", [0, 1, 2, 3])
def test_score_clusters_equals_scoring_every_cluster_at_once(seed):
    rng = np.random.default_rng(seed)
    sizes = rng.integers(0, 9, 60)
    sizes[rng.integers(0, 60, 3)] = 0  # clusters without a probe document
    clusters = [
        [JudgeInput(f"c{k}-{j}", f"doc {seed} {k} {j}") for j in range(n)] for k, n in enumerate(sizes)
    ]
    whole = _CountingJudge()
    ref_q, ref_dims = cluster_quality([whole.score(docs) for docs in clusters])
    for chunk in (1, 5, 64, 10_000):
        judge = _CountingJudge()
        q, dims, n = score_clusters(judge, (list(docs) for docs in clusters), chunk=chunk)
        assert n == sizes.sum()
        np.testing.assert_array_equal(q, ref_q)
        assert dims == ref_dims
        # a call holds at most one chunk and the cluster that crossed it
        assert sum(judge.calls) == sizes.sum() and max(judge.calls) <= chunk - 1 + sizes.max()
        if chunk == 10_000:
            assert judge.calls == [sizes.sum()]


def test_score_clusters_gaps_and_a_judge_that_drops_documents():
    s = lambda v: {k: float(v) for k in SCORE_KEYS}  # noqa: E731

    class Fixed:
        def __init__(self, scores):
            self.scores = scores

        def score(self, docs):
            return [self.scores.pop(0) for _ in docs]

    docs = lambda n: [JudgeInput(str(i), "x") for i in range(n)]  # noqa: E731
    q, dims, n = score_clusters(Fixed([s(8), s(6), None, s(2), None]), [docs(2), docs(2), docs(1)], chunk=2)
    assert np.allclose(q, [0.7, 0.2, 0.45]) and dims[2] == {} and n == 5
    q, _, _ = score_clusters(Fixed([None, None]), [docs(1), docs(1)])
    assert np.allclose(q, [0.5, 0.5])
    q, dims, n = score_clusters(Fixed([]), [])
    assert len(q) == 0 and dims == [] and n == 0

    class Short:
        def score(self, docs):
            return []

    with pytest.raises(ValueError, match="0 scores for 2 documents"):
        score_clusters(Short(), [docs(2)])
