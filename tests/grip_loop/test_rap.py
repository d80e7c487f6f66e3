"""Rapid Adaptation Probe: leaves the live model untouched, ranks clusters, matches naive references."""

from __future__ import annotations

import copy
import dataclasses
import warnings

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from transformers import Qwen3MoeConfig, Qwen3MoeForCausalLM

from grip_loop import rap
from grip_loop.rap import ProbeBatch, RAPConfig, RAPResult, rapid_adaptation_probe, spearman

VOCAB = 256


def lit(**kw) -> RAPConfig:
    """The literal protocol (same batch, full-batch steps, from L_init) with test-sized settings."""
    kw.setdefault("vmap", False)
    return RAPConfig.literal(**kw)


# vmap over sdpa backward falls back to a loop on CPU in some paths; harmless for correctness.
warnings.filterwarnings("ignore", message="There is a performance drop")


def tiny_model(seed: int = 0, dropout: float = 0.0, tie: bool = False) -> Qwen3MoeForCausalLM:
    cfg = Qwen3MoeConfig(
        vocab_size=VOCAB,
        hidden_size=64,
        intermediate_size=128,
        moe_intermediate_size=32,
        num_hidden_layers=4,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=16,
        num_experts=8,
        num_experts_per_tok=2,
        max_position_embeddings=256,
        attention_dropout=dropout,
        tie_word_embeddings=tie,
    )
    torch.manual_seed(seed)
    return Qwen3MoeForCausalLM(cfg)


def random_batches(k: int, n: int = 4, t: int = 24, seed: int = 1) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(0, VOCAB, (n, t), generator=g) for _ in range(k)]


def train_steps(model, batches, opt, steps):
    model.train()
    for i in range(steps):
        ids = batches[i % len(batches)]
        loss = model(input_ids=ids, labels=ids).loss
        opt.zero_grad(set_to_none=False)
        loss.backward()
        opt.step()


def snapshot(model, opt):
    return {
        "params": {k: v.detach().clone() for k, v in model.named_parameters()},
        "grads": {k: v.grad.clone() for k, v in model.named_parameters() if v.grad is not None},
        "buffers": {k: v.clone() for k, v in model.named_buffers()},
        "opt": copy.deepcopy(opt.state_dict()),
        "training": [m.training for m in model.modules()],
        "rng": torch.get_rng_state().clone(),
        "requires_grad": [p.requires_grad for p in model.parameters()],
    }


def assert_same(a, b):
    assert a.keys() == b.keys()
    for key in ("params", "grads", "buffers"):
        assert a[key].keys() == b[key].keys(), key
        for name in a[key]:
            assert torch.equal(a[key][name], b[key][name]), (key, name)
    for (ka, va), (kb, vb) in zip(a["opt"]["state"].items(), b["opt"]["state"].items(), strict=True):
        assert ka == kb
        for s in va:
            assert torch.equal(va[s], vb[s]), (ka, s)
    assert a["opt"]["param_groups"] == b["opt"]["param_groups"]
    assert a["training"] == b["training"]
    assert a["requires_grad"] == b["requires_grad"]
    assert torch.equal(a["rng"], b["rng"])


# ------------------------------------------------------------------ the live model is untouched


@pytest.mark.parametrize("depth", [0, 2])
def test_probe_leaves_model_optimizer_grads_and_rng_bit_identical(depth):
    model = tiny_model(dropout=0.1)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    data = random_batches(2, seed=3)
    train_steps(model, data, opt, 2)  # grads and optimizer state exist
    model.train()
    before = snapshot(model, opt)
    kernels = (model.config._attn_implementation, model.config._experts_implementation)
    for vmap, base in ((False, "null"), (True, "null"), (False, "init")):
        cfg = RAPConfig(
            reset_depth=depth, epochs=1, micro_batch=2, min_docs=2, baseline=base, vmap=vmap, vmap_on_cpu=True
        )
        res = rapid_adaptation_probe(model, random_batches(3), cfg)
        assert np.all(np.isfinite(res.delta))
        assert_same(before, snapshot(model, opt))
    assert (model.config._attn_implementation, model.config._experts_implementation) == kernels


def test_training_with_and_without_probe_is_bit_identical():
    data = random_batches(3, seed=5)
    runs = []
    for probe in (False, True):
        model = tiny_model(seed=7, dropout=0.1)  # dropout: the loop consumes the global RNG
        opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
        torch.manual_seed(11)
        train_steps(model, data, opt, 3)
        if probe:
            rapid_adaptation_probe(model, random_batches(2), RAPConfig(reset_depth=1, epochs=1, min_docs=2))
        train_steps(model, data, opt, 3)
        runs.append({k: v.detach().clone() for k, v in model.state_dict().items()})
    for name in runs[0]:
        assert torch.equal(runs[0][name], runs[1][name]), name


def test_tied_head_is_copied_and_untied():
    model = tiny_model(tie=True)
    assert model.lm_head.weight is model.model.embed_tokens.weight
    emb = model.model.embed_tokens.weight.detach().clone()
    rapid_adaptation_probe(model, random_batches(2), RAPConfig(epochs=1, min_docs=2))
    assert model.lm_head.weight is model.model.embed_tokens.weight
    assert torch.equal(model.model.embed_tokens.weight, emb)


# ------------------------------------------------------------------ it measures learnability


def repeated_text(n: int, t: int, period: int, offset_seed: int) -> torch.Tensor:
    pattern = torch.arange(period) * 7 % VOCAB + 3  # a fixed "sentence" of `period` tokens
    g = torch.Generator().manual_seed(offset_seed)
    rows = [
        pattern.roll(int(torch.randint(0, period, (1,), generator=g))).repeat(t // period + 1)[:t]
        for _ in range(n)
    ]
    return torch.stack(rows)


def unigram_text(n: int, t: int, seed: int) -> torch.Tensor:
    """Tokens drawn i.i.d. from a peaked (Zipf-like) unigram: nothing beyond the unigram to learn."""
    g = torch.Generator().manual_seed(seed)
    p = 1.0 / torch.arange(1, VOCAB + 1).float()
    return torch.multinomial(p / p.sum(), n * t, replacement=True, generator=g).view(n, t)


def trained_model(seed: int) -> Qwen3MoeForCausalLM:
    model = tiny_model(seed=seed)
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    train = [repeated_text(8, 32, 16, offset_seed=100 * seed + i) for i in range(4)]
    train_steps(model, train, opt, 40)
    return model


@pytest.mark.slow
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_repeated_text_is_learnable_and_random_tokens_are_not(seed):
    model = trained_model(seed)
    g = torch.Generator().manual_seed(seed)
    probes = {
        0: repeated_text(64, 32, 16, offset_seed=999 + seed),  # rows alternate adapt / eval
        1: torch.randint(0, VOCAB, (64, 32), generator=g),
        2: unigram_text(64, 32, seed),
    }
    for depth in (0, 2):
        res = rapid_adaptation_probe(model, probes, RAPConfig(reset_depth=depth, seed=seed))
        # easy = large drop over the null baseline; random tokens (uniform or from a peaked
        # unigram) hold nothing beyond their unigram, so their drop is near zero
        assert res.delta_abs[0] > 0.5, (depth, res.delta_abs)
        # (it can be negative: a head with reset blocks over-fits random adaptation windows and then
        # does worse than the feature-free baseline on other windows; Eq. 7 clips it to 0)
        assert res.delta_abs[0] > 10 * max(res.delta_abs[1], res.delta_abs[2], 0.0), (depth, res.delta_abs)
        # from a fresh head every cluster starts near the uniform loss ln(V)
        np.testing.assert_allclose(res.loss_init, np.log(VOCAB), rtol=0.05)


@pytest.mark.slow
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_init_baseline_rewards_a_peaked_unigram_and_the_null_baseline_does_not(seed):
    """The confound the null baseline removes: from L(theta_init) = ln V, i.i.d. tokens from a
    peaked unigram 'drop' far more than uniform tokens, though neither has anything to learn."""
    model = trained_model(seed)
    g = torch.Generator().manual_seed(seed)
    probes = {0: torch.randint(0, VOCAB, (64, 32), generator=g), 1: unigram_text(64, 32, seed)}
    init = rapid_adaptation_probe(model, probes, RAPConfig(baseline="init", metric="absolute"))
    null = rapid_adaptation_probe(model, probes, RAPConfig(baseline="null", metric="absolute"))
    assert init.delta[1] > init.delta[0] + 0.5, init.delta
    assert abs(null.delta[1] - null.delta[0]) < 0.15, null.delta


# ------------------------------------------------------------------ against naive references


def naive_features(model, ids, depth):
    """Input of the reset part, from a plain full-model forward (not the probe's trunk code)."""
    with torch.no_grad():
        out = model.model(input_ids=ids, output_hidden_states=True)
    n = len(model.model.layers)
    return (out.last_hidden_state if depth == 0 else out.hidden_states[n - depth]).float()


def naive_upper(model, depth, cfg, refresh_index):
    """Own copy of the upper part: deepcopied modules, theta_init drawn by name order."""
    blocks = copy.deepcopy(list(model.model.layers)[len(model.model.layers) - depth :]) if depth else []
    norm = copy.deepcopy(model.model.norm) if depth else None
    head = torch.nn.Linear(model.config.hidden_size, VOCAB, bias=False)
    upper = torch.nn.ModuleDict({"blocks": torch.nn.ModuleList(blocks), "head": head})
    if norm is not None:
        upper["norm"] = norm
    gen = torch.Generator().manual_seed(rap._seed_for(cfg.seed, refresh_index))
    names = dict(upper.named_parameters())
    # the probe names its parameters blocks.*, norm.*, head.*: the same sorted order here
    with torch.no_grad():
        for name in sorted(names):
            p = names[name]
            if (
                name.startswith("norm.")
                or ".input_layernorm." in name
                or "post_attention_layernorm" in name
                or name.endswith("_norm.weight")
            ):
                p.copy_(torch.ones_like(p))
            else:
                p.copy_(torch.randn(p.shape, generator=gen) * model.config.initializer_range)
    upper.float().eval()
    for p in upper.parameters():
        p.requires_grad_(True)
    return upper


def naive_hidden(model, upper, h):
    """The upper part's blocks and norm (none at depth 0): the head's input."""
    t = h.shape[1]
    pos = torch.arange(t).unsqueeze(0)
    pe = tuple(x.float() for x in model.model.rotary_emb(h, pos))
    mask = torch.full((t, t), float("-inf")).triu(1)[None, None]
    for block in upper["blocks"]:
        h = block(h, attention_mask=mask, position_ids=pos, position_embeddings=pe)
        h = h[0] if isinstance(h, tuple) else h
    if "norm" in upper:
        h = upper["norm"](h)
    return h


def naive_forward(model, upper, h):
    return upper["head"](naive_hidden(model, upper, h))


def nll_sum(logits, ids, pad):
    tg = ids[:, 1:].clone()
    if pad is not None:
        tg[tg == pad] = -100
    ce = F.cross_entropy(
        logits[:, :-1].reshape(-1, VOCAB), tg.reshape(-1), reduction="sum", ignore_index=-100
    )
    return ce, int((tg != -100).sum())


def naive_probe(model, adapt, ev, half, depth, cfg, refresh_index=0, calibration=None):
    """(L_init, L_final, L_base, delta_half) from an independent implementation: own head and
    blocks, torch.optim.AdamW (foreach=False), its own epoch / micro-batch loop, and the null
    baseline trained on real (n, T, d) constant-input batches (not the probe's count shortcut)."""
    ha, he = naive_features(model, adapt, depth), naive_features(model, ev, depth)
    n_a = adapt.shape[0]
    mb = cfg.micro_batch or n_a
    steps = cfg.num_steps(n_a)
    gen = torch.Generator().manual_seed(rap._seed_for(rap._seed_for(cfg.seed, refresh_index), n_a))
    batches = []
    while len(batches) < steps:
        order = (
            torch.arange(n_a) if cfg.micro_batch is None or mb >= n_a else torch.randperm(n_a, generator=gen)
        )
        batches += [order[i : i + mb] for i in range(0, n_a, mb)]
    batches = batches[:steps]
    pad = cfg.pad_id

    # lr auto: mean L1 norm of the head input at theta_init over the calibration windows (the
    # first adaptation window of every probed cluster)
    ref = naive_upper(model, depth, cfg, refresh_index)
    cal = adapt[:1] if calibration is None else calibration
    with torch.no_grad():
        x = naive_hidden(model, ref, naive_features(model, cal, depth))
        tg = cal[:, 1:]
        valid = tg != (pad if pad is not None else -1)
        m1 = float(x[:, :-1][valid].abs().sum() / valid.sum())
    lr = cfg.auto_lr_nats / (steps * m1) if cfg.lr == "auto" else cfg.lr

    def evaluate(upper, h, ids):
        sums, counts = [], []
        with torch.no_grad():
            for part in (half == 0, half == 1):
                s, n = nll_sum(naive_forward(model, upper, h[part]), ids[part], pad)
                sums.append(float(s))
                counts.append(n)
        return np.array(sums), np.array(counts)

    def fit(upper, inputs):
        opt = torch.optim.AdamW(
            upper.parameters(), lr=lr, weight_decay=cfg.weight_decay, betas=cfg.betas, foreach=False
        )
        for idx in batches:
            s, n = nll_sum(naive_forward(model, upper, inputs[idx]), adapt[idx], pad)
            opt.zero_grad()
            (s / max(n, 1)).backward()
            opt.step()
        return upper

    upper = naive_upper(model, depth, cfg, refresh_index)
    init, counts = evaluate(upper, he, ev)
    final, _ = evaluate(fit(upper, ha), he, ev)
    if cfg.baseline == "null":
        tg = adapt[:, 1:]
        valid = tg != (pad if pad is not None else -1)
        flat = ha[:, :-1][valid]
        c = flat.mean(0) * (flat.abs().sum(1).mean() / flat.mean(0).abs().sum())
        null = fit(naive_upper(model, depth, cfg, refresh_index), c.expand_as(ha).contiguous())
        base, _ = evaluate(null, c.expand_as(he).contiguous(), ev)
    elif cfg.baseline == "unigram":
        tg = adapt[:, 1:].reshape(-1)
        tg = tg[tg != pad] if pad is not None else tg
        p = (torch.bincount(tg, minlength=VOCAB).double() + 0.5) / (len(tg) + 0.5 * VOCAB)
        base = []
        for part in (half == 0, half == 1):
            t = ev[part][:, 1:].reshape(-1)
            t = t[t != pad] if pad is not None else t
            base.append(float(-p.log()[t].sum()))
        base = np.array(base)
    else:
        base = init
    n = counts.sum()
    lb, lf = base / counts, final / counts
    dh = (lb - lf) / lb if cfg.metric == "relative" else lb - lf
    return init.sum() / n, final.sum() / n, base.sum() / n, dh


@pytest.mark.parametrize(
    ("depth", "baseline", "micro_batch", "steps", "lr"),
    [
        (0, "null", 3, None, "auto"),  # the default protocol: split, epochs of micro-batches, lr auto
        (0, "unigram", 4, None, 2e-3),
        (0, "init", None, 3, 1e-3),
        (1, "null", 5, None, "auto"),
        (1, "init", 2, 7, 1e-3),  # steps that do not divide into epochs
    ],
)
def test_matches_naive_reference(depth, baseline, micro_batch, steps, lr):
    model = tiny_model(seed=3)
    g = torch.Generator().manual_seed(4)
    data = {
        k: ProbeBatch(
            adapt=torch.randint(1, VOCAB, (n_a, 20), generator=g),
            eval=torch.randint(1, VOCAB, (6, 20), generator=g),
            eval_half=torch.tensor([0, 1, 1, 0, 0, 1]),
        )
        for k, n_a in enumerate((9, 10))
    }
    data[1].adapt[2, 15:] = 0  # right padding
    data[1].eval[4, 12:] = 0
    cfg = RAPConfig(
        reset_depth=depth,
        baseline=baseline,
        micro_batch=micro_batch,
        steps=steps,
        epochs=2,
        lr=lr,
        weight_decay=0.1,
        min_docs=1,
        pad_id=0,
        vmap=False,
        seed=5,
    )
    res = rapid_adaptation_probe(model, data, cfg, refresh_index=2)
    calibration = torch.cat([pb.adapt[:1] for pb in data.values()])
    for k, pb in data.items():
        li, lf, lb, dh = naive_probe(
            model, pb.adapt, pb.eval, pb.eval_half, depth, cfg, refresh_index=2, calibration=calibration
        )
        np.testing.assert_allclose(
            [res.loss_init[k], res.loss_final[k], res.loss_base[k]], [li, lf, lb], rtol=2e-5
        )
        np.testing.assert_allclose(res.delta_half[:, k], dh, rtol=1e-3, atol=1e-6)
    np.testing.assert_allclose(res.delta_abs, res.loss_base - res.loss_final)
    np.testing.assert_allclose(res.delta_rel, res.delta_abs / res.loss_base)
    np.testing.assert_array_equal(res.delta, res.delta_rel)
    if lr == "auto":
        np.testing.assert_allclose(res.ceiling, cfg.auto_lr_nats, rtol=1e-9)


@pytest.mark.parametrize("depth", [0, 1])
def test_literal_protocol_matches_a_same_batch_reference(depth):
    """`RAPConfig.literal()`: train and measure on the same batch, full-batch steps, from L_init."""
    model = tiny_model(seed=3)
    batches = random_batches(2, seed=4)
    cfg = lit(reset_depth=depth, steps=4, lr=1e-3, weight_decay=0.1)
    res = rapid_adaptation_probe(model, batches, cfg)
    for k, ids in enumerate(batches):
        half = torch.arange(len(ids)) % 2
        li, lf, lb, _ = naive_probe(model, ids, ids, half, depth, cfg)
        np.testing.assert_allclose([res.loss_init[k], res.loss_final[k]], [li, lf], rtol=1e-5)
        assert res.loss_base[k] == res.loss_init[k]
    np.testing.assert_allclose(res.delta_abs, res.loss_init - res.loss_final)


def test_the_probe_never_trains_on_its_evaluation_windows():
    model = tiny_model(seed=1)
    g = torch.Generator().manual_seed(0)
    adapt = torch.randint(0, VOCAB, (8, 16), generator=g)
    ev = [torch.randint(0, VOCAB, (4, 16), generator=g) for _ in range(2)]
    cfg = RAPConfig(min_docs=1, epochs=2, micro_batch=4)
    a = rapid_adaptation_probe(model, [ProbeBatch(adapt, ev[0])], cfg)
    b = rapid_adaptation_probe(model, [ProbeBatch(adapt, ev[1])], cfg)
    # other evaluation windows: other losses, but the same adapted head (same lr, same schedule)
    assert a.loss_final[0] != b.loss_final[0]
    np.testing.assert_array_equal(a.lr, b.lr)
    same = rapid_adaptation_probe(model, [ProbeBatch(adapt, adapt)], cfg)
    assert same.loss_final[0] < a.loss_final[0]  # measured on what it trained on: memorised


@pytest.mark.parametrize("depth", [0, 1, 2])
def test_vmap_equals_sequential(depth):
    model = tiny_model(seed=5)
    batches = random_batches(5, n=8, seed=6)
    batches[3] = batches[3][:6]  # a differently shaped cluster runs on its own
    cfg = RAPConfig(reset_depth=depth, epochs=1, micro_batch=2, min_docs=2)
    seq = rapid_adaptation_probe(model, batches, dataclasses.replace(cfg, vmap=False))
    vm = rapid_adaptation_probe(model, batches, dataclasses.replace(cfg, vmap=True, vmap_on_cpu=True))
    np.testing.assert_allclose(vm.loss_init, seq.loss_init, rtol=1e-5)
    # after the adaptation steps: float32 sums in another order (batched vs one cluster, 1 vs N
    # intra-op threads) drift by ~1e-5 relative through AdamW's normalised updates
    np.testing.assert_allclose(vm.loss_final, seq.loss_final, rtol=1e-4)
    np.testing.assert_allclose(vm.loss_base, seq.loss_base, rtol=1e-4)
    np.testing.assert_allclose(vm.delta_abs, seq.delta_abs, rtol=1e-3, atol=1e-5)


def test_vmap_chunking_gives_the_same_result():
    model = tiny_model(seed=5)
    batches = random_batches(5, n=8, seed=6)
    cfg = RAPConfig(epochs=1, micro_batch=4, min_docs=2, vmap_on_cpu=True)
    whole = rapid_adaptation_probe(model, batches, cfg)
    # room for 2 clusters per chunk: chunks of 2, 2, 1
    upper = rap._build_upper(model, 0, 0)
    fa = rap._trunk(model, batches[0][0::2], 0, None)
    fe = rap._trunk(model, batches[0][1::2], 0, None)
    sched = rap._schedule(4, cfg, 0)
    inp = rap._inputs(fa, fe, torch.arange(4) % 2, sched, VOCAB)
    one = 2e9 / rap._chunk_size(upper, inp, VOCAB, cfg, model.config)
    small = dataclasses.replace(cfg, vmap_max_bytes=2.5 * one)
    assert rap._chunk_size(upper, inp, VOCAB, small, model.config) == 2
    chunked = rapid_adaptation_probe(model, batches, small)
    np.testing.assert_allclose(chunked.loss_final, whole.loss_final, rtol=1e-6)


def test_padding_is_ignored():
    model = tiny_model(seed=2)
    ids = random_batches(1, n=6, t=20, seed=8)[0]
    pad = 0
    ids[ids == pad] = 1
    padded = torch.cat([ids, torch.full((6, 6), pad)], dim=1)
    cfg = RAPConfig(reset_depth=1, epochs=2, micro_batch=2, pad_id=pad, min_docs=1, vmap=False)
    a = rapid_adaptation_probe(model, [ids], cfg)
    b = rapid_adaptation_probe(model, [padded], cfg)
    for field in ("loss_init", "loss_final", "loss_base"):
        np.testing.assert_allclose(getattr(b, field), getattr(a, field), rtol=1e-5)
    c = rapid_adaptation_probe(model, [padded], dataclasses.replace(cfg, pad_id=None))
    assert not np.allclose(c.loss_init, a.loss_init, rtol=1e-5)  # without pad_id the pads count


def test_unigram_baseline_is_the_smoothed_unigram_of_the_adaptation_targets():
    model = tiny_model(seed=2)
    g = torch.Generator().manual_seed(3)
    adapt, ev = torch.randint(0, 10, (6, 12), generator=g), torch.randint(0, 12, (4, 12), generator=g)
    res = rapid_adaptation_probe(model, [ProbeBatch(adapt, ev)], RAPConfig(baseline="unigram", min_docs=1))
    counts = np.bincount(adapt[:, 1:].reshape(-1).numpy(), minlength=VOCAB)
    p = (counts + 0.5) / (counts.sum() + 0.5 * VOCAB)
    want = -np.log(p[ev[:, 1:].reshape(-1).numpy()]).mean()
    assert res.loss_base[0] == pytest.approx(want, rel=1e-5)


# ------------------------------------------------------------------ reliability, flags, lr


def naive_spearman(a, b):
    def ranks(x):
        return np.array([np.mean([i for i, y in enumerate(sorted(x)) if y == v]) for v in x])

    ra, rb = ranks(list(a)), ranks(list(b))
    return float(np.corrcoef(ra, rb)[0, 1])


@pytest.mark.parametrize("seed", range(6))
def test_spearman_matches_a_naive_reference(seed):
    rng = np.random.default_rng(seed)
    a = rng.integers(0, 5, 12).astype(float)  # ties
    b = a + rng.normal(0, 2, 12)
    assert spearman(a, b) == pytest.approx(naive_spearman(a, b), abs=1e-12)
    c = a.copy()
    c[3] = np.nan  # non-finite entries drop out pairwise
    keep = np.arange(12) != 3
    assert spearman(c, b) == pytest.approx(naive_spearman(a[keep], b[keep]), abs=1e-12)
    assert np.isnan(spearman(a[:2], b[:2])) and np.isnan(spearman(np.ones(5), b[:5]))


@pytest.mark.slow
def test_reliability_is_the_split_half_spearman_and_high_for_separated_clusters():
    model = trained_model(0)
    g = torch.Generator().manual_seed(0)
    probes = {}
    for k in range(5):  # learnability falls with k: repeated text with more and more random tokens
        ids = repeated_text(32, 32, 16, offset_seed=k)
        noise = torch.rand(ids.shape, generator=g) < 0.2 * k
        probes[k] = torch.where(noise, torch.randint(0, VOCAB, ids.shape, generator=g), ids)
    res = rapid_adaptation_probe(model, probes, RAPConfig(min_docs=4))
    assert res.reliability == pytest.approx(spearman(res.delta_half[0], res.delta_half[1]))
    assert res.reliability > 0.8
    assert spearman(res.delta, -np.arange(5)) > 0.8
    assert res.shrink(0.5) == 1.0


def test_shrink_rule():
    r = RAPResult(*[np.zeros(1)] * 6, seconds=0.0, flops=0.0, reliability=0.2)
    assert r.shrink(0.5) == pytest.approx(0.4) and r.shrink(0.1) == 1.0
    for bad in (float("nan"), -0.3, 0.0):
        r.reliability = bad
        assert r.shrink(0.5) == 0.0


def test_clusters_with_too_few_documents_are_flagged_not_probed():
    model = tiny_model()
    b = random_batches(3, n=8)
    data = {0: b[0], 1: ProbeBatch(b[1][:6], b[1][6:], adapt_docs=6, eval_docs=2), 2: b[2]}
    res = rapid_adaptation_probe(model, data, RAPConfig(min_docs=4, epochs=1))
    assert res.flagged.tolist() == [False, True, False]
    assert np.isnan(res.delta[1]) and np.isfinite(res.delta[[0, 2]]).all()
    # the estimate counts only what is probed
    assert rap.estimate_probe_flops(model, data, RAPConfig(min_docs=4, epochs=1)) == pytest.approx(res.flops)
    # no evaluation window at all (a one-document cluster): flagged, not probed, whatever min_docs
    res = rapid_adaptation_probe(model, [ProbeBatch(b[0], b[0][:0])], RAPConfig(min_docs=1, epochs=1))
    assert res.flagged.tolist() == [True] and np.isnan(res.delta[0])


@pytest.mark.slow
def test_auto_lr_moves_the_logits_as_far_as_configured():
    model = trained_model(1)
    batches = {0: repeated_text(16, 32, 16, offset_seed=3)}
    for nats in (1.0, 4.0):
        cfg = RAPConfig(auto_lr_nats=nats, min_docs=4, epochs=3, micro_batch=4, baseline="init")
        res = rapid_adaptation_probe(model, batches, cfg)
        h = rap._trunk(model, batches[0][0::2][:1], 0, None).h
        m1 = float(h[:, :-1].abs().sum(-1).mean())
        assert res.lr[0] == pytest.approx(nats / (cfg.num_steps(8) * m1), rel=1e-5)
        assert res.ceiling[0] == pytest.approx(nats)
        # the bound holds: no loss moved further than the ceiling allows (twice the logit move)
        assert res.loss_init[0] - res.loss_final[0] < 2 * nats


# ------------------------------------------------------------------ determinism, inputs, config


def test_same_seed_and_refresh_is_identical_other_refresh_differs():
    model = tiny_model(seed=1)
    batches = random_batches(3, n=8)
    cfg = RAPConfig(epochs=2, min_docs=2)
    a = rapid_adaptation_probe(model, batches, cfg, refresh_index=4)
    b = rapid_adaptation_probe(model, batches, cfg, refresh_index=4)
    c = rapid_adaptation_probe(model, batches, cfg, refresh_index=5)
    np.testing.assert_array_equal(a.loss_init, b.loss_init)
    np.testing.assert_array_equal(a.loss_final, b.loss_final)
    np.testing.assert_array_equal(a.loss_base, b.loss_base)
    assert not np.array_equal(a.loss_init, c.loss_init)
    up = [rap._build_upper(model, 1, rap._seed_for(0, r)) for r in (4, 4, 5)]
    w = [u.head.weight for u in up]
    assert torch.equal(w[0], w[1]) and not torch.equal(w[0], w[2])
    # theta_init and the schedule are shared by all clusters: the same batch twice gives the same numbers
    twin = rapid_adaptation_probe(model, [batches[0], batches[0]], cfg, refresh_index=4)
    assert twin.loss_final[0] == pytest.approx(twin.loss_final[1], rel=1e-6)


@pytest.mark.parametrize("depth", [0, 1, 2, 4])
def test_reset_depths(depth):
    model = tiny_model()
    res = rapid_adaptation_probe(
        model, random_batches(3, n=8), RAPConfig(reset_depth=depth, epochs=1, min_docs=2)
    )
    assert res.delta.shape == (3,) and res.delta.dtype == np.float64
    assert np.all(np.isfinite(res.delta)) and np.all(np.isfinite(res.loss_base))
    assert res.seconds > 0 and res.flops > 0 and np.isfinite(res.reliability)


def test_reset_depth_beyond_layers_raises():
    with pytest.raises(ValueError, match="reset_depth"):
        rapid_adaptation_probe(tiny_model(), random_batches(1), RAPConfig(reset_depth=5))


@pytest.mark.parametrize(
    ("field", "value"),
    [
        ("reset_depth", -1),
        ("steps", 0),
        ("epochs", 0),
        ("micro_batch", 0),
        ("lr", 0.0),
        ("lr", "fast"),
        ("auto_lr_nats", -1.0),
        ("weight_decay", -1.0),
        ("seed", -3),
        ("batch_size", 0),
        ("metric", "ratio"),
        ("eval_split", "halves"),
        ("baseline", "zero"),
        ("min_docs", 0),
        ("reliability_threshold", 2.0),
        ("vmap_max_bytes", 0),
    ],
)
def test_config_validation_names_the_field(field, value):
    with pytest.raises(ValueError, match=f"^{field}: expected"):
        RAPConfig(**{field: value})


def test_missing_clusters_are_nan_and_dict_input_and_batch_size():
    model = tiny_model()
    b = random_batches(2, n=12)
    cfg = RAPConfig(epochs=1, batch_size=4, min_docs=2, lr=1e-3)  # a fixed lr: same for one cluster alone
    res = rapid_adaptation_probe(model, {0: b[0], 2: b[1], 3: b[1][:0]}, cfg, num_clusters=5)
    assert res.delta.shape == (5,)
    assert np.isfinite(res.delta[[0, 2]]).all() and np.isnan(res.delta[[1, 3, 4]]).all()
    assert not res.flagged.any()
    small = rapid_adaptation_probe(model, [ProbeBatch(b[0][0::2][:4], b[0][1::2][:4])], cfg)
    assert res.loss_final[0] == pytest.approx(small.loss_final[0], rel=1e-6)
    with pytest.raises(ValueError, match="probe_batches"):
        rapid_adaptation_probe(model, [b[0].float()], RAPConfig())
    with pytest.raises(ValueError, match="num_clusters"):
        rapid_adaptation_probe(model, {4: b[0]}, RAPConfig(), num_clusters=2)


def param_counts(model, depth):
    cfg = model.config
    frac = cfg.num_experts_per_tok / cfg.num_experts

    def count(named):
        return sum(p.numel() * (frac if ".experts." in n else 1.0) for n, p in named)

    n_layers = cfg.num_hidden_layers
    reset = [f"layers.{i}." for i in range(n_layers - depth, n_layers)]
    named = [(n, p) for n, p in model.model.named_parameters() if "embed_tokens" not in n]
    upper = count(
        (n, p) for n, p in named if depth and (any(n.startswith(b) for b in reset) or n.startswith("norm."))
    )
    trunk = count(named) - upper
    return trunk, upper + model.lm_head.weight.numel()


@pytest.mark.parametrize("depth", [0, 1, 2])
@pytest.mark.parametrize("baseline", ["null", "init"])
def test_flops_count_every_forward_and_backward_once(depth, baseline):
    model = tiny_model()
    trunk, upper = param_counts(model, depth)
    t = 24
    data = [
        ProbeBatch(torch.randint(0, VOCAB, (7, t)), torch.randint(0, VOCAB, (5, t))),
        random_batches(1, n=6, t=t)[0],
    ]
    cfg = RAPConfig(reset_depth=depth, baseline=baseline, epochs=2, micro_batch=3, min_docs=2)
    want = 0.0
    for n_a, n_e in ((7, 5), (3, 3)):
        steps = 2 * -(-n_a // 3)
        trained = 2 * n_a * t  # every window twice: two epochs
        want += 2 * trunk * (n_a + n_e) * t + 6 * upper * trained + 4 * upper * n_e * t
        want += (6 * steps + 2) * upper if baseline == "null" else 0.0
    want += 2 * (trunk + (upper if depth else 0)) * 2 * t  # lr auto: one calibration window per cluster
    res = rapid_adaptation_probe(model, data, cfg)
    assert res.flops == pytest.approx(want)
    assert rap.estimate_probe_flops(model, data, cfg) == pytest.approx(want)
    lit_cfg = lit(reset_depth=depth, steps=3)
    res = rapid_adaptation_probe(model, data[1:], lit_cfg)
    tokens = 6 * t
    want = tokens * (2 * trunk + (6 * 3 + 4) * upper)
    want += 2 * (trunk + (upper if depth else 0)) * t  # fixed lr: the calibration still runs (the ceiling)
    assert res.flops == pytest.approx(want)


def test_cost_fraction():
    model = tiny_model()
    res = rapid_adaptation_probe(model, random_batches(2, n=8), RAPConfig(epochs=1, min_docs=2))
    train = rap.estimate_train_flops(model, tokens=1e6)
    assert res.cost_fraction(train) == pytest.approx(res.flops / train)
    with pytest.raises(ValueError, match="train_flops_between_refreshes"):
        res.cost_fraction(0.0)


def test_refresh_interval_is_the_shortest_cadence_within_budget():
    for probe, per_step, lo, cap in [
        (1e9, 1e8, 50, 0.005),
        (1e6, 1e9, 50, 0.005),
        (3e9, 1e9, 1, 1.0),
        (0.0, 1.0, 7, 0.5),
    ]:
        e = rap.refresh_interval(probe, per_step, lo, cap)
        assert e >= lo and probe <= cap * per_step * e * (1 + 1e-12)
        assert e == lo or probe > cap * per_step * (e - 1)  # one step shorter would exceed the budget
    assert rap.refresh_interval(1e9, 1e8, 50, 0.005) == 2000
    assert rap.refresh_interval(1e6, 1e9, 50, 0.005) == 50
    with pytest.raises(ValueError, match="refresh_interval"):
        rap.refresh_interval(1.0, 0.0, 50, 0.005)


# ------------------------------------------------------------------ distributed (gloo, CPU)


DIST_CFG = RAPConfig(reset_depth=1, epochs=1, micro_batch=2, min_docs=2)


def _worker(rank, world):
    model = torch.nn.parallel.DistributedDataParallel(tiny_model(seed=9))
    res = rapid_adaptation_probe(model, random_batches(5, n=8, seed=2), DIST_CFG)
    return res.loss_init, res.loss_final, res.loss_base, res.reliability, res.flops


@pytest.mark.slow
def test_two_gloo_ranks_equal_one_process(tmp_path):
    from tests.ranks import run_ranks

    got = run_ranks(_worker, 2, tmp_path)
    single = rapid_adaptation_probe(tiny_model(seed=9), random_batches(5, n=8, seed=2), DIST_CFG)
    for li, lf, lb, rel, flops in got:
        np.testing.assert_allclose(li, single.loss_init, rtol=1e-5)
        np.testing.assert_allclose(lf, single.loss_final, rtol=1e-5)
        np.testing.assert_allclose(lb, single.loss_base, rtol=1e-5)
        assert rel == pytest.approx(single.reliability, abs=1e-6)
        assert flops == pytest.approx(single.flops)


def test_the_causal_mask_uses_no_deprecated_transformers_argument():
    """rap.causal_mask must not pass `past_key_values` (deprecated in transformers 5, removed in
    5.40): every training run printed its FutureWarning."""
    from grip_loop.rap import causal_mask
    from models import build_model

    lm = build_model("tiny", vocab_size=64)
    x, pos = torch.zeros(2, 8, lm.config.hidden_size), torch.arange(8).expand(2, 8)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        causal_mask(lm.config, x, pos)


@pytest.mark.slow
def test_the_probe_bar_starts_before_the_trunk_features(capfd):
    """A log shows a probe has begun before its (possibly minutes-long) feature pass, and its end."""
    model = tiny_model()
    rapid_adaptation_probe(model, random_batches(3), RAPConfig(epochs=1, min_docs=2), progress=True)
    err = capfd.readouterr().err
    assert "probe (features, then adaptation):   0%" in err and "6/6" in err  # 2 steps per cluster
