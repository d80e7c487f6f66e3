import numpy as np
import pytest

from grip_loop.embed import Encoder, EncoderConfig, HashedEncoder, embed_corpus
from tests.devices import requires_gpu

TEXTS = [
    "def add(a, b):\n    return a + b\n",
    "import os\nprint(os.getcwd())\n",
    ("class Stack:\n    def __init__(self):\n        self.items = []\n" * 30),  # several windows
    "SELECT * FROM users WHERE id = 1;",
    "x = 1\n",
]


@pytest.fixture(scope="module")
def encoder():
    return Encoder(EncoderConfig(max_tokens=32, max_chunks=3, batch_size=4))


def _naive(encoder, text):
    """Reference: encode each chosen window alone, mean over every token of every window."""
    import torch

    vecs, counts = [], []
    with torch.inference_mode():
        for w in encoder.windows(text):
            h = encoder.model(input_ids=torch.tensor([w])).last_hidden_state[0]
            vecs.append(h.sum(0).numpy().astype(np.float64))
            counts.append(len(w))
    v = np.sum(vecs, axis=0) / np.sum(counts)
    return v / np.linalg.norm(v)


def test_windows_cover_the_document_within_the_token_limit(encoder):
    wins = encoder.windows(TEXTS[2])
    assert len(wins) == 3 and all(len(w) <= 32 for w in wins)
    cls, sep = encoder.tokenizer.cls_token_id, encoder.tokenizer.sep_token_id
    assert all(w[0] == cls and w[-1] == sep for w in wins)
    body = encoder.tokenizer(TEXTS[2], add_special_tokens=False)["input_ids"]
    assert (
        wins[0][1:-1] == body[:30]
        and wins[-1][1:-1] == body[(len(wins[-1]) and (-(-len(body) // 30) - 1) * 30) :]
    )
    assert len(encoder.windows("x = 1")) == 1


def test_batched_padded_embedding_matches_naive_reference(encoder):
    emb = encoder.embed(TEXTS)
    assert emb.shape == (5, 384) and emb.dtype == np.float32
    assert np.allclose(np.linalg.norm(emb, axis=1), 1, atol=1e-5)
    ref = np.stack([_naive(encoder, t) for t in TEXTS])
    assert np.allclose(emb, ref, atol=2e-5)
    # deterministic and independent of the other documents in the call
    assert np.array_equal(encoder.embed(TEXTS), emb)
    assert np.allclose(encoder.embed(TEXTS[1:2])[0], emb[1], atol=2e-5)


def test_cache_resumes_after_interruption(tmp_path, monkeypatch):
    texts = TEXTS * 3
    cfg = EncoderConfig(max_tokens=32, max_chunks=2, batch_size=8, block_size=4)
    full = np.array(embed_corpus(texts, cfg, tmp_path / "a", "k", progress=False))

    calls = {"n": 0}
    real = Encoder.embed

    def flaky(self, t):
        calls["n"] += 1
        if calls["n"] == 3:
            raise KeyboardInterrupt("killed")
        return real(self, t)

    monkeypatch.setattr(Encoder, "embed", flaky)
    with pytest.raises(KeyboardInterrupt):
        embed_corpus(texts, cfg, tmp_path / "b", "k", progress=False)
    done = np.load(tmp_path / "b" / "embeddings.done.npy")
    assert done.tolist() == [1, 1, 0, 0]
    calls["n"] = -100  # no more failures; count the blocks the resume computes
    resumed = np.array(embed_corpus(texts, cfg, tmp_path / "b", "k", progress=False))
    assert calls["n"] == -98  # only the two unfinished blocks were embedded
    assert np.array_equal(resumed, full)
    # another key (changed corpus or encoder settings) recomputes everything
    calls["n"] = -100
    embed_corpus(texts, cfg, tmp_path / "b", "other", progress=False)
    assert calls["n"] == -96


def test_bad_encoder_name_is_a_clear_error():
    with pytest.raises(ValueError, match="encoder.name"):
        Encoder(EncoderConfig(name="/no/such/encoder"))
    with pytest.raises(ValueError, match="encoder.max_tokens"):
        EncoderConfig(max_tokens=2)


@pytest.mark.gpu
@requires_gpu
def test_cuda_embedding_matches_cpu(encoder):
    gpu = Encoder(EncoderConfig(max_tokens=32, max_chunks=3, batch_size=4, device="cuda"))
    assert np.allclose(gpu.embed(TEXTS), encoder.embed(TEXTS), atol=1e-4)


# ---------------------------------------------------------------------------------------
# kind: hashed


def _hashed_naive(cfg: EncoderConfig, text: str) -> np.ndarray:
    """Reference from the definition: tokens, n-grams, crc32 bucket and sign, 1 + log count,
    the seeded projection row by row in float64, L2 norm."""
    import math
    import re
    import zlib

    toks = re.findall(r"\w+|[^\w\s]", text)
    grams = []
    for n in range(1, cfg.ngram + 1):
        grams += [" ".join(toks[i : i + n]) for i in range(len(toks) - n + 1)]
    grams = grams or ["\x00empty"]
    proj = HashedEncoder(cfg).proj.astype(np.float64)
    crc_seed = int(np.random.SeedSequence([cfg.seed, 1]).generate_state(1)[0])
    v = np.zeros(cfg.dim)
    for g in set(grams):
        h = zlib.crc32(g.encode("utf-8"), crc_seed)
        sign = -1.0 if h >= 2**31 else 1.0
        v += sign * (1.0 + math.log(grams.count(g))) * proj[h % cfg.hash_buckets]
    return v / np.linalg.norm(v)


def test_hashed_encoder_matches_naive_reference_and_is_deterministic():
    from grip_loop.embed import make_encoder

    texts = [*TEXTS, "", "   ", "ünïcödé → ∑ x_i", "(((("]
    for seed, ngram in [(0, 2), (3, 1), (7, 3)]:
        cfg = EncoderConfig(kind="hashed", dim=64, hash_buckets=1 << 10, ngram=ngram, seed=seed)
        enc = make_encoder(cfg)
        assert isinstance(enc, HashedEncoder)
        emb = enc.embed(texts)
        assert emb.shape == (len(texts), 64) and emb.dtype == np.float32
        assert np.allclose(np.linalg.norm(emb, axis=1), 1, atol=1e-5)
        ref = np.stack([_hashed_naive(cfg, t) for t in texts])
        assert np.allclose(emb, ref, atol=1e-5)
        # a fresh encoder (another process) gives the same bytes; a row ignores its neighbours
        assert np.array_equal(HashedEncoder(cfg).embed(texts), emb)
        assert np.array_equal(enc.embed(texts[2:3])[0], emb[2])
    other = HashedEncoder(EncoderConfig(kind="hashed", dim=64, hash_buckets=1 << 10, seed=1)).embed(texts)
    assert not np.allclose(
        other, HashedEncoder(EncoderConfig(kind="hashed", dim=64, hash_buckets=1 << 10)).embed(texts)
    )


def test_hashed_encoder_puts_similar_texts_closer_than_unrelated_ones():
    enc = HashedEncoder(EncoderConfig(kind="hashed"))
    rng = np.random.default_rng(0)
    words = [f"w{i}" for i in range(2000)]
    wins = 0
    for _ in range(20):
        base = list(rng.choice(words, 60))
        near = list(base)
        for j in rng.choice(60, 6, replace=False):  # 10% of the words edited
            near[j] = str(rng.choice(words))
        far = list(rng.choice(words, 60))
        a, b, c = enc.embed([" ".join(base), " ".join(near), " ".join(far)])
        wins += float(a @ b) > float(a @ c) + 0.3
    assert wins == 20
    a, b, c = enc.embed(
        [
            "def add(a, b):\n    return a + b\n",
            "def add(x, y):\n    return x + y\n",
            "SELECT name FROM users WHERE id = 1;",
        ]
    )
    assert a @ b > a @ c


def test_hashed_encoder_config_is_checked():
    with pytest.raises(ValueError, match="encoder.kind"):
        EncoderConfig(kind="bert")
    with pytest.raises(ValueError, match="encoder.dim"):
        EncoderConfig(kind="hashed", dim=0)
