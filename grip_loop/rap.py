"""Rapid Adaptation Probe (RAP): per-cluster learnability of the live model (paper Sec. 2.3, 3.2).

For every cluster k the probe measures how fast a freshly initialised "upper part" of the
model (the LM head, plus the last `reset_depth` decoder blocks and the final norm) learns
cluster k's probe batch on top of the current, frozen lower layers:

    L_init  = L(theta_init; C_k)        theta_init shared by all clusters of one refresh
    L_final = L(theta_N;   C_k)         after N full-batch AdamW steps on C_k's probe batch
    Delta L_k = L_init - L_final        (Eq. 6)     delta_rel = Delta L_k / L_init  (Sec. 3.2)

Losses are mean cross-entropy per target token (length normalised). A large drop means
the cluster is easy given the current features, a small one a representation deficit
(Eq. 7 then replays it more).

Design choices and their cost
-----------------------------
* The live model is never modified. The trunk (embeddings + lower blocks, and the final
  norm when `reset_depth == 0`) runs once per cluster batch under `torch.no_grad()` by
  calling the live submodules directly (so DDP/FSDP forward hooks and the autograd graph of
  the training step are not involved). The trainable part is a `copy.deepcopy` of the upper
  modules with its hooks stripped, re-initialised and cast to float32; it is trained through
  `torch.func.functional_call` with a functional AdamW, so live parameters, their `.grad`,
  the live optimizer, `training` flags and buffers are untouched. Every draw uses an
  explicit `torch.Generator`, and the whole probe runs inside `torch.random.fork_rng`, so
  the global CPU/CUDA RNG streams are the same as without a probe (tested bit-for-bit).
* theta_init: every parameter of the copy is redrawn in a fixed (name) order from one CPU
  generator seeded by `(seed, refresh_index)`: norm weights = 1, biases = 0, everything
  else ~ N(0, config.initializer_range) (what HF `_init_weights` does for Llama/Qwen/MoE
  routers and experts). Drawing on CPU makes theta_init identical on every device and rank.
  A head tied to the input embeddings is untied by the copy (only `lm_head` is copied).
* The upper part runs in eval mode (no dropout): the probe measures learnability, not noise.
* Padding: blocks are right-padded with `pad_id` (None = no padding). Pad positions are
  excluded as loss targets; no attention mask is needed because causal attention means no
  real token ever attends to a later pad.
* Batching over clusters: on accelerators, clusters whose probe batches have the same shape
  are trained together with `torch.func.vmap` (theta_init is shared, so it enters vmap
  unbatched and the per-cluster AdamW states appear inside it). For that the copy (only the
  copy) switches to eager attention and transformers' `batched_mm` experts kernel, the only
  ones without data-dependent control flow or missing batching rules. Chunks of clusters are
  sized so that an estimate of their memory (params, grads, Adam moments, activations, the
  per-token expert weights `batched_mm` gathers) stays under `vmap_max_bytes`; when not even
  two fit (MoE blocks of real-size models), clusters run one after another with the model's
  own kernels. On CPU vmap was measured slower than the loop (docs/rap.md), so it is used
  there only with `vmap_on_cpu=True` (the tests do, to check vmap == sequential).
* Distributed: under `torch.distributed`, cluster k is probed on rank `k % world_size`
  and the results are summed with one `all_reduce` (each value has one owner), so every rank
  returns the same `RAPResult`. DDP wrappers are unwrapped (replicas are full). FSDP is
  handled by `full_params()`: FSDP1 via `summon_full_params(writeback=False)`, FSDP2 /
  DTensor parameters via `unshard()` and `full_tensor()`. This gathers the full model on
  every rank for the duration of the probe (memory = one unsharded model); it is NOT tested
  on multi-GPU FSDP here (no GPU on the build machine), only the DDP/gloo path is.
* Cost, reported in `RAPResult.flops` (the usual 2*params per token forward, 6*params per
  token for forward+backward, MoE experts counted at top_k/num_experts):
      per cluster: 2 * P_trunk_active * tokens              (trunk, once)
                 + steps * 6 * P_upper_active * tokens      (N AdamW steps)
                 + 2 * P_upper_active * tokens              (the L_final forward)
"""

from __future__ import annotations

import contextlib
import copy
import time
import warnings
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

__all__ = [
    "RAPConfig",
    "RAPResult",
    "active_params",
    "estimate_probe_flops",
    "estimate_train_flops",
    "refresh_interval",
    "full_params",
    "rapid_adaptation_probe",
]

IGNORE = -100


@dataclass(kw_only=True)
class RAPConfig:
    """Settings of the Rapid Adaptation Probe (defaults follow the paper, Sec. 3.2)."""

    reset_depth: int = 0
    """0 = LM head only; N = the last N decoder blocks + the final norm + the head."""
    steps: int = 10
    """AdamW steps (full-batch passes) over each cluster's probe batch."""
    lr: float = 3e-4
    weight_decay: float = 0.0
    betas: tuple[float, float] = (0.9, 0.999)
    eps: float = 1e-8
    seed: int = 0
    """theta_init seed; combined with the refresh index, so each refresh draws a new shared init."""
    batch_size: int | None = None
    """Probe documents per cluster actually used (the first ones); None = all given."""
    metric: str = "relative"
    """Which value `RAPResult.delta` holds (feeds Eq. 7): "relative" or "absolute"."""
    pad_id: int | None = None
    """Token id of right padding; excluded as a loss target. None = blocks are fully packed."""
    vmap: bool = True
    """Train same-shaped clusters together with torch.func.vmap on accelerators; False = one by one."""
    vmap_on_cpu: bool = False
    """Also use vmap on CPU (slower there, measured; kept for testing vmap without a GPU)."""
    vmap_max_bytes: float = 2e9
    """Estimated memory cap of one vmap chunk (parameters, grads, Adam moments, activations)."""

    def __post_init__(self) -> None:
        if (
            isinstance(self.reset_depth, bool)
            or not isinstance(self.reset_depth, int)
            or self.reset_depth < 0
        ):
            raise ValueError(f"reset_depth: expected an int >= 0, got {self.reset_depth!r}")
        if isinstance(self.steps, bool) or not isinstance(self.steps, int) or self.steps < 1:
            raise ValueError(f"steps: expected an int >= 1, got {self.steps!r}")
        if (
            isinstance(self.lr, bool)
            or not isinstance(self.lr, int | float)
            or not np.isfinite(self.lr)
            or self.lr <= 0
        ):
            raise ValueError(f"lr: expected a finite number > 0, got {self.lr!r}")
        if not (np.isfinite(self.weight_decay) and self.weight_decay >= 0):
            raise ValueError(f"weight_decay: expected a finite number >= 0, got {self.weight_decay!r}")
        if len(self.betas) != 2 or not all(0.0 <= b < 1.0 for b in self.betas):
            raise ValueError(f"betas: expected two numbers in [0, 1), got {self.betas!r}")
        if not (np.isfinite(self.eps) and self.eps > 0):
            raise ValueError(f"eps: expected a finite number > 0, got {self.eps!r}")
        if not isinstance(self.seed, int) or self.seed < 0:
            raise ValueError(f"seed: expected an int >= 0, got {self.seed!r}")
        if self.batch_size is not None and (not isinstance(self.batch_size, int) or self.batch_size < 1):
            raise ValueError(f"batch_size: expected None or an int >= 1, got {self.batch_size!r}")
        if self.metric not in ("relative", "absolute"):
            raise ValueError(f"metric: expected 'relative' or 'absolute', got {self.metric!r}")
        if not (np.isfinite(self.vmap_max_bytes) and self.vmap_max_bytes > 0):
            raise ValueError(f"vmap_max_bytes: expected a number > 0, got {self.vmap_max_bytes!r}")


@dataclass
class RAPResult:
    """Per-cluster probe outcome; arrays are float64 [K], NaN where a cluster had no probe data."""

    delta: np.ndarray
    """The metric chosen by `RAPConfig.metric` (what Eq. 7 consumes)."""
    delta_abs: np.ndarray
    delta_rel: np.ndarray
    loss_init: np.ndarray
    loss_final: np.ndarray
    seconds: float
    flops: float
    """Estimated probe FLOPs over all clusters (all ranks together)."""

    def cost_fraction(self, train_flops_between_refreshes: float) -> float:
        """Probe FLOPs as a fraction of the training FLOPs spent between two refreshes."""
        if not train_flops_between_refreshes > 0:
            raise ValueError(
                f"train_flops_between_refreshes: expected > 0, got {train_flops_between_refreshes!r}"
            )
        return float(self.flops / train_flops_between_refreshes)


# ----------------------------------------------------------------------------- model access


def _unwrap(model: nn.Module) -> nn.Module:
    """The HF causal LM inside DDP / FSDP1 / torch.compile wrappers."""
    while True:
        if hasattr(model, "_orig_mod"):  # torch.compile
            model = model._orig_mod
        elif hasattr(model, "module") and isinstance(model.module, nn.Module):  # DDP, FSDP1
            model = model.module
        elif hasattr(model, "_fsdp_wrapped_module"):
            model = model._fsdp_wrapped_module
        else:
            return model


@contextlib.contextmanager
def full_params(model: nn.Module) -> Iterator[None]:
    """Make every parameter of `model` full (unsharded) on this rank for the duration.

    FSDP1: `FullyShardedDataParallel.summon_full_params(writeback=False)`. FSDP2
    (`fully_shard`): `unshard()` on every FSDPModule, `reshard()` afterwards. DDP and plain
    modules: nothing to do. Collective: every rank must enter it (the probe is called on all
    ranks at a refresh). Untested on multi-GPU FSDP; see the module docstring.
    """
    try:
        from torch.distributed.fsdp import FullyShardedDataParallel as FSDP1
    except ImportError:  # pragma: no cover - torch built without distributed
        FSDP1 = None
    try:
        from torch.distributed.fsdp import FSDPModule
    except ImportError:  # pragma: no cover - torch < 2.6
        FSDPModule = None

    if FSDP1 is not None and any(isinstance(m, FSDP1) for m in model.modules()):
        with FSDP1.summon_full_params(model, writeback=False, recurse=True):
            yield
        return
    fsdp2 = [m for m in model.modules() if FSDPModule is not None and isinstance(m, FSDPModule)]
    for m in fsdp2:
        m.unshard()
    try:
        yield
    finally:
        for m in fsdp2:
            m.reshard()


def _local(t: torch.Tensor) -> torch.Tensor:
    """A plain tensor holding the full value of `t` (DTensor shards are gathered)."""
    if hasattr(t, "full_tensor"):
        return t.full_tensor()
    return t


def _expert_fraction(config) -> float:
    e = getattr(config, "num_experts", None) or getattr(config, "num_local_experts", None)
    k = getattr(config, "num_experts_per_tok", None)
    return float(k) / float(e) if e and k else 1.0


def active_params(module: nn.Module, config) -> float:
    """Parameters touched per token: routed-expert weights count at top_k / num_experts."""
    frac = _expert_fraction(config)
    total = 0.0
    for name, p in module.named_parameters():
        total += p.numel() * (frac if ".experts." in f".{name}" and "shared" not in name else 1.0)
    return total


def estimate_train_flops(model: nn.Module, tokens: float) -> float:
    """6 * active non-embedding params * tokens: the training FLOPs for `tokens` tokens."""
    lm = _unwrap(model)
    trunk = lm.model
    p = active_params(trunk.layers, lm.config) + active_params(trunk.norm, lm.config)
    p += active_params(lm.lm_head, lm.config)
    return 6.0 * p * float(tokens)


def _probe_param_counts(lm: nn.Module, depth: int) -> tuple[float, float]:
    """(trunk, upper) active non-embedding parameters of a probe at reset depth `depth`."""
    cfg = lm.config
    layers = lm.model.layers
    reset_inner = 0.0  # the reset blocks + final norm, part of lm.model
    if depth:
        reset_inner = sum(active_params(b, cfg) for b in list(layers)[len(layers) - depth :])
        reset_inner += active_params(lm.model.norm, cfg)
    inner = active_params(lm.model, cfg) - lm.model.embed_tokens.weight.numel()
    return inner - reset_inner, reset_inner + active_params(lm.lm_head, cfg)


def estimate_probe_flops(model: nn.Module, tokens_per_cluster: Sequence[int], config: RAPConfig) -> float:
    """FLOPs of one probe: per cluster of t tokens, 2 P_trunk t (the frozen trunk, once) +
    (6 steps + 2) P_upper t (N AdamW steps and the L_final forward). The same count as
    `RAPResult.flops`; parameters must be full (inside `full_params` under FSDP) or on `meta`."""
    trunk, upper = _probe_param_counts(_unwrap(model), config.reset_depth)
    per_token = 2 * trunk + (6 * config.steps + 2) * upper
    return float(sum(per_token * int(t) for t in tokens_per_cluster))


def refresh_interval(
    probe_flops: float, train_flops_per_step: float, min_steps: int, max_overhead: float
) -> int:
    """The shortest cadence >= `min_steps` whose probe costs <= `max_overhead` of the training
    FLOPs between two refreshes: max(min_steps, ceil(probe / (max_overhead x per step)))."""
    if not (probe_flops >= 0 and train_flops_per_step > 0 and 0 < max_overhead <= 1 and min_steps >= 1):
        raise ValueError(
            f"refresh_interval: bad arguments ({probe_flops=}, {train_flops_per_step=}, {min_steps=}, {max_overhead=})"
        )
    # round the quotient first: 1e-12 of float noise must not add a step
    need = int(np.ceil(round(probe_flops / (max_overhead * train_flops_per_step), 9)))
    return max(int(min_steps), need)


# ----------------------------------------------------------------------------- the upper part


class _Upper(nn.Module):
    """The trainable copy: last blocks (maybe none), final norm (maybe none), LM head."""

    def __init__(self, blocks: list[nn.Module], norm: nn.Module | None, head: nn.Module):
        super().__init__()
        self.blocks = nn.ModuleList(blocks)
        self.norm = norm
        self.head = head

    def forward(self, h, position_embeddings, mask, position_ids):
        for block in self.blocks:
            h = block(
                h,
                attention_mask=mask,
                position_ids=position_ids,
                position_embeddings=position_embeddings,
            )
            if isinstance(h, tuple):  # older transformers return (hidden, ...)
                h = h[0]
        if self.norm is not None:
            h = self.norm(h)
        return self.head(h)


def _seed_for(seed: int, refresh_index: int) -> int:
    return int(np.random.SeedSequence([seed, refresh_index]).generate_state(1, dtype=np.uint64)[0] >> 1)


def _reset_(upper: nn.Module, std: float, seed: int) -> None:
    """Draw theta_init into `upper` in place, from a CPU generator (device-independent)."""
    gen = torch.Generator(device="cpu").manual_seed(seed)
    norm_params = {
        id(p) for m in upper.modules() if "norm" in type(m).__name__.lower() for p in m.parameters(False)
    }
    with torch.no_grad():
        for name, p in sorted(upper.named_parameters(), key=lambda kv: kv[0]):
            if id(p) in norm_params:
                value = torch.ones(p.shape) if name.endswith("weight") else torch.zeros(p.shape)
            elif name.endswith("bias"):
                value = torch.zeros(p.shape)
            else:
                value = torch.randn(p.shape, generator=gen) * std
            p.copy_(value.to(p.dtype))


def _build_upper(lm: nn.Module, depth: int, seed: int) -> _Upper:
    layers = lm.model.layers
    blocks = list(layers[len(layers) - depth :]) if depth else []
    norm = lm.model.norm if depth else None
    # One deepcopy call so all copied modules share one copied config (needed to switch the
    # copy's experts kernel without touching the live config).
    blocks, norm, head = copy.deepcopy((blocks, norm, lm.lm_head))
    upper = _Upper(blocks, norm, head)
    for m in upper.modules():  # training hooks / output recorders of the live model
        m._forward_hooks.clear()
        m._forward_pre_hooks.clear()
        m._backward_hooks.clear()
    for name, p in list(upper.named_parameters()):
        full = _local(p.detach())
        owner = upper.get_submodule(name.rsplit(".", 1)[0]) if "." in name else upper
        setattr(owner, name.rsplit(".", 1)[-1], nn.Parameter(full.float().clone(), requires_grad=False))
    upper.eval()
    # The copy's own config (deepcopied with the blocks), so kernels can be switched for vmap.
    upper.config = next((m.config for m in upper.blocks.modules() if hasattr(m, "config")), None)
    _reset_(upper, float(getattr(lm.config, "initializer_range", 0.02)), seed)
    return upper


@contextlib.contextmanager
def _vmap_kernels(upper: _Upper) -> Iterator[None]:
    """Switch the copy to the only HF kernels vmap can batch: eager attention, batched_mm experts.

    (sdpa has no CPU batching rule and the grouped/eager experts loop over data-dependent
    expert sets.) Only the copy's config changes; the live model's config is a different object.
    """
    cfg = upper.config
    if cfg is None:
        yield
        return
    saved = (cfg._attn_implementation, getattr(cfg, "_experts_implementation", None))
    cfg._attn_implementation = "eager"
    if saved[1] is not None:
        cfg._experts_implementation = "batched_mm"
    try:
        yield
    finally:
        cfg._attn_implementation = saved[0]
        if saved[1] is not None:
            cfg._experts_implementation = saved[1]


# ----------------------------------------------------------------------------- trunk features


@dataclass
class _Features:
    h: torch.Tensor  # [n, T, d] float32, input to the upper part
    targets: torch.Tensor  # [n, T-1] long, IGNORE at pads
    position_embeddings: tuple[torch.Tensor, torch.Tensor] | None
    mask: torch.Tensor | None
    position_ids: torch.Tensor
    tokens: int  # counted target tokens


@torch.no_grad()
def _trunk(lm: nn.Module, ids: torch.Tensor, depth: int, pad_id: int | None) -> _Features:
    """Run the frozen lower part once; live modules are put in eval mode and restored."""
    inner = lm.model
    n_layers = len(inner.layers)
    lower = list(inner.layers[: n_layers - depth])
    modules = [inner.embed_tokens, *lower] + ([inner.norm] if depth == 0 else [])
    flags = [(m, m.training) for mod in modules for m in mod.modules()]
    try:
        for m, _ in flags:
            m.training = False
        h = inner.embed_tokens(ids)
        position_ids = torch.arange(ids.shape[1], device=ids.device).unsqueeze(0)
        pos_emb = inner.rotary_emb(h, position_ids) if hasattr(inner, "rotary_emb") else None
        from transformers.masking_utils import create_causal_mask

        mask = create_causal_mask(
            config=lm.config,
            inputs_embeds=h,
            attention_mask=None,
            past_key_values=None,
            position_ids=position_ids,
        )
        for block in lower:
            h = block(h, attention_mask=mask, position_ids=position_ids, position_embeddings=pos_emb)
            if isinstance(h, tuple):
                h = h[0]
        if depth == 0:
            h = inner.norm(h)
    finally:
        for m, flag in flags:
            m.training = flag
    targets = ids[:, 1:].clone()
    if pad_id is not None:
        targets[targets == pad_id] = IGNORE
    pos_emb = tuple(t.float() for t in pos_emb) if pos_emb is not None else None
    mask = mask if mask is None or mask.dtype == torch.bool else mask.float()
    return _Features(h.float(), targets, pos_emb, mask, position_ids, int((targets != IGNORE).sum()))


# ----------------------------------------------------------------------------- adaptation


def _make_adapt(upper: _Upper, cfg: RAPConfig, feats: _Features):
    """adapt(params, h, targets) -> (L_init, L_final): N functional AdamW steps from params."""
    from torch.func import functional_call, grad_and_value

    pe, pos = feats.position_embeddings, feats.position_ids
    mask = feats.mask
    if len(upper.blocks):  # the copy may use another attention kernel than the live model
        from transformers.masking_utils import create_causal_mask

        mask = create_causal_mask(
            config=upper.config,
            inputs_embeds=feats.h,
            attention_mask=None,
            past_key_values=None,
            position_ids=pos,
        )
    b1, b2 = cfg.betas

    def loss_fn(params, h, targets):
        logits = functional_call(upper, params, (h, pe, mask, pos))[:, :-1].float()
        ce = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), targets.reshape(-1), reduction="none")
        valid = (targets.reshape(-1) != IGNORE).to(ce.dtype)
        return (ce * valid).sum() / valid.sum().clamp_min(1.0)

    grad_fn = grad_and_value(loss_fn)

    def adapt(params, h, targets):
        m = {k: torch.zeros_like(v) for k, v in params.items()}
        v = {k: torch.zeros_like(p) for k, p in params.items()}
        loss_init = None
        for t in range(1, cfg.steps + 1):
            grads, loss = grad_fn(params, h, targets)
            if loss_init is None:
                loss_init = loss
            # torch.optim.AdamW (single-tensor, non-amsgrad), written out for torch.func.
            new = {}
            for k, p in params.items():
                g = grads[k]
                p = p * (1.0 - cfg.lr * cfg.weight_decay)
                m[k] = m[k] * b1 + g * (1.0 - b1)
                v[k] = v[k] * b2 + g * g * (1.0 - b2)
                denom = (v[k].sqrt() / (1.0 - b2**t) ** 0.5) + cfg.eps
                new[k] = p - (cfg.lr / (1.0 - b1**t)) * m[k] / denom
            params = new
        return loss_init, loss_fn(params, h, targets)

    return adapt


def _chunk_size(upper: _Upper, feats: _Features, vocab: int, config, budget: float) -> int:
    """Clusters per vmap chunk so that the memory estimate of one chunk stays under `budget`.

    float32 per cluster: params, grads, two moments and one temporary; logits, their grad and
    softmax; ~24 hidden-size activations per block; and for MoE blocks the per-token expert
    weights `batched_mm` gathers (forward and backward), which dominates for real models.
    """
    n_params = sum(p.numel() for p in upper.parameters())
    n, t, d = feats.h.shape
    blocks = len(upper.blocks)
    per_cluster = 5 * n_params + 3 * n * t * vocab + 24 * n * t * d * blocks
    expert_params = [p for name, p in upper.named_parameters() if ".experts." in f".{name}"]
    if expert_params:
        e = getattr(config, "num_experts", None) or getattr(config, "num_local_experts", 1)
        top_k = getattr(config, "num_experts_per_tok", 1)
        per_expert = sum(p.numel() for p in expert_params) / e
        per_cluster += 2 * n * t * top_k * per_expert
    return max(1, int(budget // (4 * per_cluster)))


def _probe_group(upper, cfg, feats_list, use_vmap, vocab, model_config):
    """(L_init, L_final) per cluster of one same-shaped group."""
    params = {k: p.detach() for k, p in upper.named_parameters()}
    chunk = _chunk_size(upper, feats_list[0], vocab, model_config, cfg.vmap_max_bytes)
    if use_vmap and len(feats_list) > 1 and chunk > 1:
        out = []
        with _vmap_kernels(upper):
            adapt = _make_adapt(upper, cfg, feats_list[0])
            batched = torch.func.vmap(adapt, in_dims=(None, 0, 0), randomness="error")
            for s in range(0, len(feats_list), chunk):
                part = feats_list[s : s + chunk]
                h = torch.stack([f.h for f in part])
                tg = torch.stack([f.targets for f in part])
                li, lf = batched(params, h, tg)
                out += list(zip(li.tolist(), lf.tolist(), strict=True))
        return out
    out = []
    for f in feats_list:
        li, lf = _make_adapt(upper, cfg, f)(params, f.h, f.targets)
        out.append((float(li), float(lf)))
    return out


# ----------------------------------------------------------------------------- entry point


def _as_dict(probe_batches, num_clusters):
    if isinstance(probe_batches, Mapping):
        batches = {int(k): v for k, v in probe_batches.items()}
    elif isinstance(probe_batches, Sequence):
        batches = dict(enumerate(probe_batches))
    else:
        raise ValueError(f"probe_batches: expected a dict or list of LongTensors, got {type(probe_batches)}")
    k_max = max(batches, default=-1) + 1
    k = k_max if num_clusters is None else int(num_clusters)
    if k < k_max or any(c < 0 for c in batches):
        raise ValueError(f"num_clusters: {num_clusters} does not cover cluster ids {sorted(batches)}")
    for c, b in batches.items():
        if b is not None and (not torch.is_tensor(b) or b.dim() != 2 or b.dtype != torch.long):
            got = tuple(b.shape) if torch.is_tensor(b) else type(b).__name__
            raise ValueError(f"probe_batches[{c}]: expected a LongTensor (n_k, T), got {got}")
        if b is not None and b.shape[1] < 2:
            raise ValueError(f"probe_batches[{c}]: blocks need T >= 2 tokens, got T={b.shape[1]}")
    return batches, k


def rapid_adaptation_probe(
    model: nn.Module,
    probe_batches: dict[int, torch.Tensor] | list[torch.Tensor | None],
    config: RAPConfig,
    *,
    refresh_index: int = 0,
    num_clusters: int | None = None,
) -> RAPResult:
    """Probe every cluster's learnability on the live `model` without changing it.

    `probe_batches[k]` is a LongTensor (n_k, T) of (right-padded) token blocks of cluster k;
    missing, None or empty entries give NaN for that cluster. Under `torch.distributed` every
    rank must call this with the same arguments; each probes its share of the clusters and
    all ranks return the same result.
    """
    lm = _unwrap(model)
    for attr in ("model.layers", "model.norm", "model.embed_tokens", "lm_head"):
        try:
            lm.get_submodule(attr)
        except AttributeError:
            raise ValueError(f"model: expected an HF causal LM with `{attr}` ({type(lm).__name__})") from None
    n_layers = len(lm.model.layers)
    if config.reset_depth > n_layers:
        raise ValueError(f"reset_depth: {config.reset_depth} exceeds the model's {n_layers} decoder layers")
    batches, k_total = _as_dict(probe_batches, num_clusters)

    dist = torch.distributed
    distributed = dist.is_available() and dist.is_initialized()
    rank, world = (dist.get_rank(), dist.get_world_size()) if distributed else (0, 1)
    device = next(lm.parameters()).device
    mine = [
        c for c in sorted(batches) if c % world == rank and batches[c] is not None and batches[c].shape[0] > 0
    ]

    start = time.perf_counter()
    li = np.full(k_total, np.nan)
    lf = np.full(k_total, np.nan)
    flops = np.zeros(k_total)
    vocab = lm.lm_head.weight.shape[0]
    cuda_devices = [device] if device.type == "cuda" else []
    # Under torch.distributed a rank that fails must still join the all_reduce below, or
    # every other rank waits in it forever: its clusters come back NaN on every rank
    # (the callback then keeps the previous budgets everywhere). Alone, it just raises.
    try:
        with torch.random.fork_rng(devices=cuda_devices), full_params(model):
            seed = _seed_for(config.seed, refresh_index)
            upper = _build_upper(lm, config.reset_depth, seed).to(device)
            feats = {}
            for c in mine:
                ids = batches[c][: config.batch_size].to(device)
                feats[c] = _trunk(lm, ids, config.reset_depth, config.pad_id)
                flops[c] = estimate_probe_flops(lm, [ids.numel()], config)
            groups: dict[tuple, list[int]] = {}
            for c in mine:
                groups.setdefault(tuple(feats[c].h.shape), []).append(c)
            # On CPU the per-cluster work already fills the cores and vmap's batched gathers cost
            # more than they save (docs/rap.md has the numbers), so vmap is an accelerator path.
            use_vmap = config.vmap and (device.type != "cpu" or config.vmap_on_cpu)
            for members in groups.values():
                res = _probe_group(upper, config, [feats[c] for c in members], use_vmap, vocab, lm.config)
                for c, (a, b) in zip(members, res, strict=True):
                    li[c], lf[c] = a, b
    except Exception as exc:
        if not distributed:
            raise
        warnings.warn(
            f"RAP failed on rank {rank} ({type(exc).__name__}: {exc}); its clusters {mine} are NaN",
            stacklevel=2,
        )
        li[mine], lf[mine] = np.nan, np.nan
    if distributed:
        li, lf, flops = _all_reduce_owned(np.stack([li, lf, flops]), mine, device)
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    seconds = time.perf_counter() - start
    delta_abs = li - lf
    delta_rel = delta_abs / li
    delta = delta_rel if config.metric == "relative" else delta_abs
    return RAPResult(
        delta=delta,
        delta_abs=delta_abs,
        delta_rel=delta_rel,
        loss_init=li,
        loss_final=lf,
        seconds=seconds,
        flops=float(np.sum(flops)),
    )


def _all_reduce_owned(values: np.ndarray, mine: list[int], device: torch.device):
    """Combine per-rank rows where each cluster has exactly one owner (NaN = no data anywhere)."""
    dist = torch.distributed
    k = values.shape[1]
    owned = np.zeros(k)
    owned[mine] = 1.0
    packed = np.concatenate([np.where(owned > 0, values, 0.0), owned[None]], axis=0)
    dev = device if dist.get_backend() == "nccl" else torch.device("cpu")
    t = torch.as_tensor(packed, dtype=torch.float64, device=dev)
    dist.all_reduce(t)
    out = t.cpu().numpy()
    have = out[-1] > 0
    rows = [np.where(have, out[i], np.nan) for i in range(values.shape[0])]
    rows[2] = out[2]  # flops: zero where nobody probed
    return rows
