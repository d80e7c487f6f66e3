"""GRASP attribution: sketches match exact gradients then projection, the surrogate matches
brute-force utility where its model is exact, the jackknife LCB covers, the protocol is finite."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from transformers import Qwen3MoeConfig, Qwen3MoeForCausalLM

from grip_loop import attribution as A
from grip_loop.attribution import AttributionError, SketchConfig, Sketches, Surrogate
from grip_loop.rap import spearman

VOCAB = 97


def tiny_model(seed: int = 0) -> Qwen3MoeForCausalLM:
    cfg = Qwen3MoeConfig(
        vocab_size=VOCAB,
        hidden_size=32,
        intermediate_size=64,
        moe_intermediate_size=16,
        num_hidden_layers=2,
        num_attention_heads=2,
        num_key_value_heads=1,
        head_dim=16,
        num_experts=4,
        num_experts_per_tok=2,
        max_position_embeddings=64,
    )
    torch.manual_seed(seed)
    return Qwen3MoeForCausalLM(cfg).eval()


def windows(n: int, t: int = 12, seed: int = 0, hi: int = VOCAB) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(1, hi, (n, t), generator=g)


def naive_group_grad(model, names, ids, pad_id=None) -> torch.Tensor:
    """All parameters trainable, one full-batch backward, the named gradients concatenated."""
    m = model
    for p in m.parameters():
        p.grad = None
        p.requires_grad_(True)
    logits = m(input_ids=ids).logits[:, :-1]
    tgt = ids[:, 1:].clone()
    if pad_id is not None:
        tgt[tgt == pad_id] = -100
    F.cross_entropy(logits.reshape(-1, VOCAB), tgt.reshape(-1), ignore_index=-100).backward()
    params = dict(m.named_parameters())
    out = torch.cat([params[n].grad.reshape(-1) for n in names])
    for p in m.parameters():
        p.grad = None
    return out


def test_upper_parameters_are_the_head_then_the_last_blocks_and_norm():
    model = tiny_model()
    assert [n for n, _ in A.upper_parameters(model, 0)] == ["lm_head.weight"]
    names = [n for n, _ in A.upper_parameters(model, 1)]
    assert names[-1] == "lm_head.weight" and "model.norm.weight" in names
    assert any(n.startswith("model.layers.1.") for n in names)
    assert not any(n.startswith("model.layers.0.") or "embed" in n for n in names)


def test_sketch_is_the_projection_of_the_exact_gradient():
    """Micro-batches of 3 windows, pads, a cluster without data vs one full-batch backward of
    the whole model, then an explicit projection matrix."""
    layers = 1
    model = tiny_model()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    flags = {n: p.requires_grad for n, p in model.named_parameters()}
    cfg = SketchConfig(dim=24, layers=layers, splits=2, seed=3, micro_batch=3, pad_id=0)
    clusters = {0: windows(6, seed=1), 2: windows(4, seed=2)}
    target = windows(4, seed=5)
    target[0, 8:] = 0  # padding is not a target
    sk = A.sketch(model, clusters, target, cfg, num_clusters=3)

    named = A.upper_parameters(model, layers)
    names = [n for n, _ in named]
    p_full = A.projection_matrix([(n, p.numel()) for n, p in named], cfg.dim, cfg.seed).double()

    def ref(ids):
        return (naive_group_grad(model, names, ids, pad_id=0).double() @ p_full).numpy()

    for s, idx in enumerate(A.split_rows(4, 2)):
        np.testing.assert_allclose(sk.target[s], ref(target[idx]), rtol=1e-4, atol=1e-6)
    for c, w in clusters.items():
        for s, idx in enumerate(A.split_rows(w.shape[0], 2)):
            np.testing.assert_allclose(sk.clusters[c, s], ref(w[idx]), rtol=1e-4, atol=1e-6)
    assert np.isnan(sk.clusters[1]).all() and list(sk.present) == [True, False, True]
    assert sk.target_tokens.tolist() == [2 * 11 - 4, 2 * 11]  # row 0: ids 8..11 are pads
    # the model is untouched: weights, grads, flags, mode
    for k, v in model.state_dict().items():
        assert torch.equal(v, before[k])
    assert all(p.grad is None for p in model.parameters())
    assert {n: p.requires_grad for n, p in model.named_parameters()} == flags
    assert not model.training


def test_projection_streams_the_same_matrix_and_preserves_inner_products():
    sizes = [("a.weight", 70_000), ("b.bias", 5)]  # > one chunk
    p = sum(s for _, s in sizes)
    g = torch.Generator().manual_seed(0)
    x = torch.randn(3, p, generator=g)
    full = A.projection_matrix(sizes, 16, seed=1)
    np.testing.assert_allclose(
        A.project(x, sizes, 16, 1).numpy(), (x.double() @ full.double()).numpy(), rtol=1e-4
    )
    assert torch.equal(A.projection_matrix(sizes, 16, 1), full)
    assert not torch.equal(A.projection_matrix(sizes, 16, 2), full)
    # E<Pa, Pb> = <a, b>: the relative error of inner products shrinks like 1/sqrt(d)
    small = [("w", 400)]
    a, b = torch.randn(2, 400, generator=g).double()
    b = 0.6 * a + 0.8 * b
    errs = []
    for seed in range(20):
        z = A.project(torch.stack([a, b]), small, 1024, seed)
        errs.append(abs(float(z[0] @ z[1]) - float(a @ b)) / float(a.norm() * b.norm()))
    assert np.mean(errs) < 0.06


# ----------------------------------------------------------------------------- surrogate


def quadratic_problem(k: int, p: int, seed: int):
    rng = np.random.default_rng(seed)
    base = rng.normal(size=(3, p))  # a few shared directions: redundancy between clusters
    g = rng.normal(size=(k, 3)) @ base + 0.5 * rng.normal(size=(k, p))
    theta_star = rng.normal(size=p)
    beta = float(rng.uniform(0.5, 3.0))
    return g, theta_star, beta


@pytest.mark.parametrize("seed", range(4))
def test_surrogate_equals_brute_force_utility_on_a_quadratic_target(seed):
    """For L_t = beta/2 |theta - theta*|^2 (isotropic curvature, where the second-order model is
    exact) the surrogate with gamma from the line search at w0 is the brute-force loss drop of
    the step eta G w with that line-search eta, divided by eta."""
    k, p = 5, 40
    g, theta_star, beta = quadratic_problem(k, p, seed)
    theta0 = np.zeros(p)
    g_t = beta * (theta0 - theta_star)

    def loss(th):
        return 0.5 * beta * np.sum((th - theta_star) ** 2)

    present = np.ones(k, bool)
    sur = Surrogate.from_means(g, g_t, present)
    w0 = np.full(k, 1 / k)
    d0 = w0 @ g
    eta = abs(g_t @ d0) / (beta * d0 @ d0)  # the line-search step along w0
    rng = np.random.default_rng(100 + seed)
    ws = rng.dirichlet(np.ones(k), size=30)
    brute = np.array([(loss(theta0) - loss(theta0 - eta * (w @ g))) / eta for w in ws])
    np.testing.assert_allclose(sur.utility(ws), brute, rtol=1e-9, atol=1e-9)
    # with a Gaussian sketch of the gradients the ranking is kept (inner products ~preserved)
    sizes = [("g", p)]
    z = A.project(torch.from_numpy(np.vstack([g, g_t[None]])), sizes, 2048, seed).numpy()
    sk_sur = Surrogate.from_means(z[:k], z[k], present)
    assert spearman(sk_sur.utility(ws), brute) > 0.9
    # the additive baseline ignores redundancy: it is the eta -> 0 limit only
    assert np.allclose(sur.additive(ws), ws @ (g @ g_t))


def test_alignment_is_the_first_order_loss_drop_of_a_real_model():
    """Tiny LM, exact gradients (identity sketch): a small SGD step on the upper parameters
    along G w lowers the target loss by eta * a.w to first order, and ranks allocations as a.w does."""
    model = tiny_model(2)
    named = A.upper_parameters(model, 1)
    params = [p for _, p in named]
    clusters = [windows(4, seed=20 + c, hi=10 + 40 * c) for c in range(3)]  # different unigrams
    target = windows(4, seed=40, hi=30)
    g = torch.stack([A.group_gradient(model, params, w)[0] for w in clusters]).double()
    g_t = A.group_gradient(model, params, target)[0].double()
    sur = Surrogate.from_means(g.numpy(), g_t.numpy(), np.ones(3, bool))

    @torch.no_grad()
    def target_loss():
        logits = model(input_ids=target).logits[:, :-1]
        return float(F.cross_entropy(logits.reshape(-1, VOCAB), target[:, 1:].reshape(-1)))

    l0 = target_loss()
    eta = 3e-3  # small enough for the second-order term, large enough for float32 losses
    ws = np.random.default_rng(0).dirichlet(np.ones(3), size=5)
    drops = []
    for w in ws:
        step = torch.from_numpy(w) @ g
        saved = [p.detach().clone() for p in params]
        with torch.no_grad():
            off = 0
            for p in params:
                p -= eta * step[off : off + p.numel()].view_as(p)
                off += p.numel()
        drops.append((l0 - target_loss()) / eta)
        with torch.no_grad():
            for p, s in zip(params, saved, strict=True):
                p.copy_(s)
    drops = np.array(drops)
    np.testing.assert_allclose(drops, sur.additive(ws), rtol=0.05, atol=0.03 * np.abs(sur.a).max())
    assert spearman(drops, sur.additive(ws)) > 0.8


# ----------------------------------------------------------------------------- LCB and protocol


def fake_sketches(mu: np.ndarray, mu_t: np.ndarray, noise: float, s: int, rng) -> Sketches:
    k, d = mu.shape
    return Sketches(
        clusters=mu[:, None] + noise * rng.normal(size=(k, s, d)),
        target=mu_t[None] + noise * rng.normal(size=(s, d)),
        tokens=np.ones((k, s), int),
        target_tokens=np.ones(s, int),
        grad_norms=np.ones(k),
        target_grad_norm=1.0,
        params=d,
        seconds=0.0,
    )


def test_lcb_without_spread_is_the_estimate_and_covers_with_noise():
    rng = np.random.default_rng(0)
    k, d = 4, 32
    mu, mu_t = rng.normal(size=(k, d)), rng.normal(size=d)
    allocs = {f"w{i}": w for i, w in enumerate(rng.dirichlet(np.ones(k), size=6))}
    sur, cands = A.evaluate(fake_sketches(mu, mu_t, 0.0, 4, rng), allocs, reference="w0")
    for c in cands:
        assert c.se == pytest.approx(0.0, abs=1e-12) and c.lcb == pytest.approx(c.utility)
    truth = Surrogate.from_means(mu, mu_t, np.ones(k, bool))
    covered, total, widths = 0, 0, []
    for _ in range(150):
        _, cands = A.evaluate(fake_sketches(mu, mu_t, 0.6, 8, rng), allocs)
        for c in cands:
            covered += c.lcb <= float(truth.utility(c.w))
            total += 1
            widths.append(c.se)
    assert covered / total > 0.85  # nominal 0.95, one-sided
    assert np.mean(widths) > 0


def test_selection_protocol_is_finite_and_conservative():
    def cand(name, lcb, gain_lcb):
        return A.Candidate(
            name, np.ones(2) / 2, utility=lcb + 1, se=0.5, lcb=lcb, gain=1.0, gain_lcb=gain_lcb
        )

    out = A.select([cand("current", 0.0, 0.0), cand("alt", 1.0, 0.2), cand("alt2", 0.5, 0.9)], "current")
    assert out["best_lcb"] == "alt" and out["recommend"] == "alt2"  # the paired gain decides
    out = A.select([cand("current", 0.0, 0.0), cand("alt", 1.0, -0.1)], "current")
    assert out["best_lcb"] == "alt" and out["recommend"] == "current"
    out = A.select([cand("current", 2.0, 0.0), cand("alt", 1.0, 0.0)], "current")
    assert out["recommend"] == "current" and "no candidate" in out["reason"]
    # end to end: a candidate far better than the reference with little noise is recommended
    rng = np.random.default_rng(3)
    mu_t = rng.normal(size=16)
    mu = np.stack([mu_t, -mu_t, rng.normal(size=16)])
    sk = fake_sketches(mu, mu_t, 0.05, 4, rng)
    allocs = {"current": np.array([0.1, 0.8, 0.1]), "aligned": np.array([0.8, 0.1, 0.1])}
    _, cands = A.evaluate(sk, allocs, reference="current")
    assert A.select(cands, "current")["recommend"] == "aligned"
    _, cands = A.evaluate(sk, allocs, reference="aligned")
    assert A.select(cands, "aligned")["recommend"] == "aligned"


def test_evaluate_names_bad_allocations_and_drops_absent_clusters():
    rng = np.random.default_rng(1)
    sk = fake_sketches(rng.normal(size=(3, 8)), rng.normal(size=8), 0.1, 3, rng)
    sk.clusters[1] = np.nan
    sk.tokens[1] = 0
    _, cands = A.evaluate(sk, {"x": np.array([1.0, 5.0, 1.0])})
    np.testing.assert_allclose(cands[0].w, [0.5, 0.0, 0.5])
    with pytest.raises(ValueError, match="bad: expected 3 finite"):
        A.evaluate(sk, {"bad": np.array([1.0, -1.0, 1.0])})
    with pytest.raises(ValueError, match="only-absent: no weight"):
        A.evaluate(sk, {"only-absent": np.array([0.0, 1.0, 0.0])})


# ----------------------------------------------------------------------------- bad input


def test_empty_or_degenerate_inputs_raise_one_clear_error():
    model = tiny_model(3)
    cfg = SketchConfig(dim=8, layers=0, splits=2, pad_id=0)
    with pytest.raises(AttributionError, match="target: 1 of its 2 document groups"):
        A.sketch(model, {0: windows(4)}, windows(1), cfg)
    padded = windows(4)
    padded[:, 1:] = 0
    with pytest.raises(AttributionError, match="target: 2 of its 2 document groups have no target tokens"):
        A.sketch(model, {0: windows(4)}, padded, cfg)
    with pytest.raises(AttributionError, match="no cluster has documents in all 2 groups"):
        A.sketch(model, {0: windows(1)}, windows(4), cfg)
    with torch.no_grad():
        model.model.norm.weight.zero_()  # the head's input is 0: its gradient is exactly 0
    with pytest.raises(AttributionError, match="target: its loss gradient is zero"):
        A.sketch(model, {0: windows(4)}, windows(4), cfg)
    with pytest.raises(ValueError, match="layers: 3 exceeds"):
        A.sketch(model, {0: windows(4)}, windows(4), SketchConfig(layers=3))
    with pytest.raises(ValueError, match="splits: expected an int >= 2"):
        SketchConfig(splits=1)


# ----------------------------------------------------------------------------- the CLI


@pytest.mark.slow
def test_grip_attribute_report_and_bad_input(tmp_path, capsys):
    """`grip attribute` on a synthetic prepared corpus with a tiny HF model folder: the JSON
    report; an empty target, a target that is no prepared folder and a model whose vocabulary
    does not fit the corpus each exit 2 with one line naming the problem, writing nothing."""
    import json

    from tests.prepared import make_prepared
    from train.cli import main as grip

    data, other, empty = tmp_path / "data", tmp_path / "other", tmp_path / "empty"
    make_prepared(data, [10, 12, 9], n_probe=8, easy=(1,))
    make_prepared(other, [8, 8], seed=1, n_probe=6)
    make_prepared(empty, [0, 0], seed=2)
    cfg = tiny_model(4).config
    for name, vocab in (("model", 2048), ("small", 1024)):
        cfg.vocab_size = vocab
        torch.manual_seed(0)
        Qwen3MoeForCausalLM(cfg).save_pretrained(tmp_path / name)
    fast = ["--dim", "16", "--splits", "2", "--seq-len", "16", "--perturbations", "2", "--device", "cpu"]
    out = tmp_path / "rep" / "a.json"
    argv = ["attribute", "--ckpt", str(tmp_path / "model"), "--data", str(data), "--json", str(out)]
    assert grip([*argv, "--target", str(other), *fast]) == 0
    r = json.loads(out.read_text())
    names = [c["name"] for c in r["candidates"]]
    assert names == ["current", "static", "proportional", "uniform", "perturbed-0", "perturbed-1"]
    assert r["current_source"].startswith("manifest") and r["recommend"] in names
    assert r["best_lcb"] == max(r["candidates"], key=lambda c: c["lcb"])["name"]
    for c in r["candidates"]:
        assert abs(sum(c["token_shares"]) - 1) < 1e-9 and c["lcb"] <= c["utility"]
    assert [c["name"] for c in r["clusters"]] == ["synthetic-0", "synthetic-1", "synthetic-2"]
    assert len(r["redundant_pairs"]) == len(r["complementary_pairs"]) == 3
    assert r["gamma"] > 0 and r["target_docs"] == 12  # the folder's probe documents
    assert not list(out.parent.glob("*.tmp"))
    capsys.readouterr()
    for target, ckpt, msg in (
        (str(empty), "model", "the target set has no documents"),
        (str(tmp_path / "nowhere"), "model", "expected heldout, humaneval or a prepared folder"),
        (str(other), "small", "vocabulary (1024) is smaller than the prepared tokenizer's (2048"),
    ):
        bad = tmp_path / "bad.json"
        argv = ["attribute", "--ckpt", str(tmp_path / ckpt), "--data", str(data), "--json", str(bad)]
        rc = grip([*argv, "--target", target, *fast])
        err = [
            ln for ln in capsys.readouterr().err.splitlines() if ln.strip() and "Loading weights" not in ln
        ]
        assert rc == 2 and len(err) == 1 and err[0].startswith("grip attribute: error:") and msg in err[0]
        assert not bad.exists()
