"""Rapid Adaptation Probe: leaves the live model untouched, ranks clusters, matches naive references."""

from __future__ import annotations

import copy
import os
import socket
import warnings

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from transformers import Qwen3MoeConfig, Qwen3MoeForCausalLM

from grip_loop import rap
from grip_loop.rap import RAPConfig, RAPResult, rapid_adaptation_probe

VOCAB = 256

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
    for vmap in (False, True):
        cfg = RAPConfig(reset_depth=depth, steps=2, vmap=vmap, vmap_on_cpu=True)
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
            rapid_adaptation_probe(model, random_batches(2), RAPConfig(reset_depth=1, steps=2))
        train_steps(model, data, opt, 3)
        runs.append({k: v.detach().clone() for k, v in model.state_dict().items()})
    for name in runs[0]:
        assert torch.equal(runs[0][name], runs[1][name]), name


def test_tied_head_is_copied_and_untied():
    model = tiny_model(tie=True)
    assert model.lm_head.weight is model.model.embed_tokens.weight
    emb = model.model.embed_tokens.weight.detach().clone()
    rapid_adaptation_probe(model, random_batches(2), RAPConfig(steps=2))
    assert model.lm_head.weight is model.model.embed_tokens.weight
    assert torch.equal(model.model.embed_tokens.weight, emb)


# ------------------------------------------------------------------ it measures learnability


def repeated_text(n: int, t: int, period: int, offset_seed: int) -> torch.Tensor:
    pattern = torch.arange(period) * 7 % VOCAB + 3  # a fixed "sentence" of `period` tokens
    g = torch.Generator().manual_seed(offset_seed)
    rows = [pattern.roll(int(torch.randint(0, period, (1,), generator=g))).repeat(t // period + 1)[:t]]
    rows += [
        pattern.roll(int(torch.randint(0, period, (1,), generator=g))).repeat(t // period + 1)[:t]
        for _ in range(n - 1)
    ]
    return torch.stack(rows)


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_repeated_text_is_easy_and_random_tokens_are_hard(seed):
    model = tiny_model(seed=seed)
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    train = [repeated_text(8, 32, 16, offset_seed=100 * seed + i) for i in range(4)]
    train_steps(model, train, opt, 40)
    g = torch.Generator().manual_seed(seed)
    # 32 docs: on a small batch a fresh head can partly memorise random tokens (drop ~ 1/n)
    probes = {
        0: repeated_text(32, 32, 16, offset_seed=999 + seed),
        1: torch.randint(0, VOCAB, (32, 32), generator=g),
    }
    for depth in (0, 2):
        res = rapid_adaptation_probe(model, probes, RAPConfig(reset_depth=depth, seed=seed))
        # easy = large drop, hard (random tokens) = small drop; in both metrics
        assert res.delta_rel[0] > 1.5 * res.delta_rel[1], (depth, res.delta_rel)
        assert res.delta_abs[0] > 1.5 * res.delta_abs[1], (depth, res.delta_abs)
        # from a fresh head every cluster starts near the uniform loss ln(V)
        np.testing.assert_allclose(res.loss_init, np.log(VOCAB), rtol=0.05)


# ------------------------------------------------------------------ against naive references


def naive_probe(model, ids, depth, cfg, refresh_index=0):
    """Full model forward for features, a module copy and torch.optim.AdamW (foreach=False)."""
    upper = rap._build_upper(model, depth, rap._seed_for(cfg.seed, refresh_index))
    with torch.no_grad():
        out = model.model(input_ids=ids, output_hidden_states=True)
        n = len(model.model.layers)
        h = out.last_hidden_state if depth == 0 else out.hidden_states[n - depth]
    pos = torch.arange(ids.shape[1]).unsqueeze(0)
    pe = tuple(t.float() for t in model.model.rotary_emb(h, pos))
    for p in upper.parameters():
        p.requires_grad_(True)
    opt = torch.optim.AdamW(upper.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay, foreach=False)

    def loss():
        logits = upper(h.float(), pe, None, pos)[:, :-1]
        return F.cross_entropy(logits.reshape(-1, VOCAB), ids[:, 1:].reshape(-1))

    losses = []
    for _ in range(cfg.steps):
        val = loss()
        losses.append(val.item())
        opt.zero_grad()
        val.backward()
        opt.step()
    with torch.no_grad():
        return losses[0], loss().item()


@pytest.mark.parametrize("depth", [0, 1])
def test_matches_naive_reference(depth):
    model = tiny_model(seed=3)
    batches = random_batches(2, seed=4)
    cfg = RAPConfig(reset_depth=depth, steps=4, lr=1e-3, weight_decay=0.1, vmap=False)
    res = rapid_adaptation_probe(model, batches, cfg)
    for k, ids in enumerate(batches):
        li, lf = naive_probe(model, ids, depth, cfg)
        np.testing.assert_allclose([res.loss_init[k], res.loss_final[k]], [li, lf], rtol=1e-5)
    np.testing.assert_allclose(res.delta_abs, res.loss_init - res.loss_final)
    np.testing.assert_allclose(res.delta_rel, res.delta_abs / res.loss_init)
    np.testing.assert_array_equal(res.delta, res.delta_rel)


@pytest.mark.parametrize("depth", [0, 1, 2])
def test_vmap_equals_sequential(depth):
    model = tiny_model(seed=5)
    batches = random_batches(5, seed=6)
    batches[3] = batches[3][:2]  # a differently shaped cluster runs on its own
    seq = rapid_adaptation_probe(model, batches, RAPConfig(reset_depth=depth, steps=3, vmap=False))
    vm = rapid_adaptation_probe(
        model, batches, RAPConfig(reset_depth=depth, steps=3, vmap=True, vmap_on_cpu=True)
    )
    np.testing.assert_allclose(vm.loss_init, seq.loss_init, rtol=1e-5)
    np.testing.assert_allclose(vm.loss_final, seq.loss_final, rtol=1e-5)
    np.testing.assert_allclose(vm.delta_abs, seq.delta_abs, rtol=1e-3, atol=1e-6)


def test_vmap_chunking_gives_the_same_result():
    model = tiny_model(seed=5)
    batches = random_batches(5, seed=6)
    whole = rapid_adaptation_probe(model, batches, RAPConfig(steps=3, vmap_on_cpu=True))
    # room for 2 clusters per chunk: chunks of 2, 2, 1
    upper = rap._build_upper(model, 0, 0)
    feats = rap._trunk(model, batches[0], 0, None)
    one = 2e9 / rap._chunk_size(upper, feats, VOCAB, model.config, 2e9)
    assert rap._chunk_size(upper, feats, VOCAB, model.config, 2.5 * one) == 2
    chunked = rapid_adaptation_probe(
        model, batches, RAPConfig(steps=3, vmap_on_cpu=True, vmap_max_bytes=2.5 * one)
    )
    np.testing.assert_allclose(chunked.loss_final, whole.loss_final, rtol=1e-6)


def test_padding_is_ignored():
    model = tiny_model(seed=2)
    ids = random_batches(1, n=3, t=20, seed=8)[0]
    pad = 0
    ids[ids == pad] = 1
    padded = torch.cat([ids, torch.full((3, 6), pad)], dim=1)
    cfg = RAPConfig(reset_depth=1, steps=3, pad_id=pad, vmap=False)
    a = rapid_adaptation_probe(model, [ids], cfg)
    b = rapid_adaptation_probe(model, [padded], cfg)
    np.testing.assert_allclose(b.loss_init, a.loss_init, rtol=1e-5)
    np.testing.assert_allclose(b.loss_final, a.loss_final, rtol=1e-5)
    c = rapid_adaptation_probe(model, [padded], RAPConfig(reset_depth=1, steps=3, vmap=False))
    assert not np.allclose(c.loss_init, a.loss_init, rtol=1e-5)  # without pad_id the pads count


# ------------------------------------------------------------------ determinism, inputs, config


def test_same_seed_and_refresh_is_identical_other_refresh_differs():
    model = tiny_model(seed=1)
    batches = random_batches(3)
    cfg = RAPConfig(steps=3)
    a = rapid_adaptation_probe(model, batches, cfg, refresh_index=4)
    b = rapid_adaptation_probe(model, batches, cfg, refresh_index=4)
    c = rapid_adaptation_probe(model, batches, cfg, refresh_index=5)
    np.testing.assert_array_equal(a.loss_init, b.loss_init)
    np.testing.assert_array_equal(a.loss_final, b.loss_final)
    assert not np.array_equal(a.loss_init, c.loss_init)
    up = [rap._build_upper(model, 1, rap._seed_for(0, r)) for r in (4, 4, 5)]
    w = [u.head.weight for u in up]
    assert torch.equal(w[0], w[1]) and not torch.equal(w[0], w[2])
    # theta_init is shared by all clusters: the same batch twice gives the same numbers
    twin = rapid_adaptation_probe(model, [batches[0], batches[0]], cfg, refresh_index=4)
    assert twin.loss_final[0] == pytest.approx(twin.loss_final[1], rel=1e-6)


@pytest.mark.parametrize("depth", [0, 1, 2, 4])
def test_reset_depths(depth):
    model = tiny_model()
    res = rapid_adaptation_probe(model, random_batches(2), RAPConfig(reset_depth=depth, steps=2))
    assert res.delta.shape == (2,) and res.delta.dtype == np.float64
    assert np.all(np.isfinite(res.delta)) and np.all(res.delta_abs > 0)
    assert res.seconds > 0 and res.flops > 0


def test_reset_depth_beyond_layers_raises():
    with pytest.raises(ValueError, match="reset_depth"):
        rapid_adaptation_probe(tiny_model(), random_batches(1), RAPConfig(reset_depth=5))


@pytest.mark.parametrize(
    ("field", "value"),
    [
        ("reset_depth", -1),
        ("steps", 0),
        ("lr", 0.0),
        ("weight_decay", -1.0),
        ("seed", -3),
        ("batch_size", 0),
        ("metric", "ratio"),
        ("vmap_max_bytes", 0),
    ],
)
def test_config_validation_names_the_field(field, value):
    with pytest.raises(ValueError, match=field):
        RAPConfig(**{field: value})


def test_missing_clusters_are_nan_and_dict_input_and_batch_size():
    model = tiny_model()
    b = random_batches(2, n=6)
    res = rapid_adaptation_probe(
        model, {0: b[0], 2: b[1], 3: b[1][:0]}, RAPConfig(steps=2, batch_size=4), num_clusters=5
    )
    assert res.delta.shape == (5,)
    assert np.isfinite(res.delta[[0, 2]]).all() and np.isnan(res.delta[[1, 3, 4]]).all()
    small = rapid_adaptation_probe(model, [b[0][:4]], RAPConfig(steps=2))
    assert res.loss_final[0] == pytest.approx(small.loss_final[0], rel=1e-6)
    with pytest.raises(ValueError, match="probe_batches"):
        rapid_adaptation_probe(model, [b[0].float()], RAPConfig())
    with pytest.raises(ValueError, match="num_clusters"):
        rapid_adaptation_probe(model, {4: b[0]}, RAPConfig(), num_clusters=2)


def test_metric_and_flops_and_cost_fraction():
    model = tiny_model()
    batches = random_batches(2, n=4, t=24)
    res = rapid_adaptation_probe(model, batches, RAPConfig(metric="absolute", steps=3))
    np.testing.assert_array_equal(res.delta, res.delta_abs)
    # depth 0: the trunk is every block + final norm (experts at top_k / E), the upper part is the head
    cfg = model.config
    frac = cfg.num_experts_per_tok / cfg.num_experts
    trunk = sum(
        p.numel() * (frac if ".experts." in n else 1.0)
        for n, p in model.model.named_parameters()
        if "embed_tokens" not in n
    )
    head = model.lm_head.weight.numel()
    tokens = 2 * 4 * 24
    assert res.flops == pytest.approx(tokens * (2 * trunk + (6 * 3 + 2) * head))
    train = rap.estimate_train_flops(model, tokens=1e6)
    assert res.cost_fraction(train) == pytest.approx(res.flops / train)
    with pytest.raises(ValueError, match="train_flops_between_refreshes"):
        res.cost_fraction(0.0)
    assert isinstance(res, RAPResult)


@pytest.mark.parametrize("depth", [1, 2])
def test_probe_flops_at_depth_count_the_reset_blocks_once(depth):
    model = tiny_model()
    cfg = model.config
    frac = cfg.num_experts_per_tok / cfg.num_experts
    n_layers = cfg.num_hidden_layers

    def count(named):
        return sum(p.numel() * (frac if ".experts." in n else 1.0) for n, p in named)

    reset_blocks = [f"layers.{i}." for i in range(n_layers - depth, n_layers)]
    named = [(n, p) for n, p in model.model.named_parameters() if "embed_tokens" not in n]
    upper = count(
        (n, p) for n, p in named if any(n.startswith(b) for b in reset_blocks) or n.startswith("norm.")
    )
    upper += model.lm_head.weight.numel()
    trunk = count(named) - (upper - model.lm_head.weight.numel())
    want = 96 * (2 * trunk + (6 * 3 + 2) * upper) + 48 * (2 * trunk + (6 * 3 + 2) * upper)
    config = RAPConfig(reset_depth=depth, steps=3)
    assert rap.estimate_probe_flops(model, [96, 48], config) == pytest.approx(want)
    res = rapid_adaptation_probe(
        model, [random_batches(1, n=4, t=24)[0], random_batches(1, n=2, t=24)[0]], config
    )
    assert res.flops == pytest.approx(want)


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


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _worker(rank, world, port, queue):
    import torch.distributed as dist

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world)
    try:
        torch.set_num_threads(1)
        model = torch.nn.parallel.DistributedDataParallel(tiny_model(seed=9))
        res = rapid_adaptation_probe(model, random_batches(5, seed=2), RAPConfig(reset_depth=1, steps=3))
        queue.put((rank, res.loss_init, res.loss_final, res.flops))
    finally:
        dist.destroy_process_group()


@pytest.mark.slow
def test_two_gloo_ranks_equal_one_process():
    import torch.multiprocessing as mp

    ctx = mp.get_context("spawn")
    queue = ctx.Queue()
    port = _free_port()
    procs = [ctx.Process(target=_worker, args=(r, 2, port, queue)) for r in range(2)]
    for p in procs:
        p.start()
    got = [queue.get(timeout=120) for _ in procs]
    for p in procs:
        p.join(timeout=60)
        assert p.exitcode == 0
    single = rapid_adaptation_probe(
        tiny_model(seed=9), random_batches(5, seed=2), RAPConfig(reset_depth=1, steps=3)
    )
    for _, li, lf, flops in got:
        np.testing.assert_allclose(li, single.loss_init, rtol=1e-5)
        np.testing.assert_allclose(lf, single.loss_final, rtol=1e-5)
        assert flops == pytest.approx(single.flops)
