"""Rapid Adaptation Probe (RAP): per-cluster learnability of the live model (paper Sec. 2.3, 3.2).

For every cluster k a freshly initialised "upper part" of the model (the LM head, plus the
last `reset_depth` decoder blocks and the final norm) is trained on top of the current,
frozen lower layers, and the probe measures how much the cluster's text becomes
predictable from the model's features:

    theta_init            one draw per refresh, shared by every cluster
    adapt                 AdamW on C_k's *adaptation* windows: `epochs` passes in micro-batches
    L_init  = L(theta_init; E_k)       on C_k's *evaluation* windows E_k (other documents)
    L_final = L(theta_N;    E_k)
    L_base  = the baseline (below), on E_k
    Delta L_k = L_base - L_final       (Eq. 6)   delta_rel = Delta L_k / L_base  (Sec. 3.2)

Losses are mean cross-entropy per target token (length normalised). A large drop means the
cluster is predictable from the current features, a small one a representation deficit
(Eq. 7 then replays it more).

Why this is not the paper's literal protocol (docs/rap.md has the measurements)
------------------------------------------------------------------------------
The paper's text trains and measures on the same batch, 10 AdamW steps at lr 3e-4, and
subtracts L(theta_init). On a small model that measures noise: every L_init is ~ln V (a fresh
head predicts uniformly), Adam moves each weight by ~lr per step so a 10-step head moves the
logits by at most lr x steps x |h|_1 (~0.3 nats), and a few documents can be memorised. So,
each one config line away from the literal protocol (`RAPConfig.literal()`):

* `eval_split="split"`: adapt on some documents of the cluster, evaluate on others
  (`ProbeBatch.adapt` / `.eval`; `grip prepare` splits each cluster's probe documents once).
  "none" = the literal same-batch protocol.
* `baseline="null"`: V-usable information (the paper's own grounding, Xu et al. 2020) is the
  drop relative to the best predictor *without* the features, not relative to a random head.
  L_base = the loss on E_k of the same reset upper part trained with the same schedule, lr and
  optimizer on a constant input (the mean adaptation feature, rescaled to the mean feature
  L1 norm so its logits can move as far): it can learn only the cluster's token distribution
  (its unigram, as far as the schedule lets it). Measured from L(theta_init) instead, Delta L
  mostly says how peaked a cluster's unigram is: code with 60% of its characters randomised
  "drops" more than clean code. "unigram" = the closed form (add-1/2 smoothed unigram of the
  adaptation targets, no schedule limit); "init" = the paper's L(theta_init).
* `epochs` passes over the adaptation windows in `micro_batch`-window AdamW steps (the paper:
  "K = 10 training epochs over the cluster-specific batch"); `steps` = a fixed step count.
* `lr="auto"`: lr = auto_lr_nats / (S x m1), S the AdamW steps, m1 the mean L1 norm of the
  head's input at theta_init on a calibration batch (the first adaptation window of every
  cluster): the head can then move any logit by about `auto_lr_nats` within the schedule
  (Adam moves each weight by about lr per step). `RAPResult.ceiling` holds that bound
  (lr x S x m1, also for a fixed lr) and the callback logs how close the drops come to it.
* Reliability: the evaluation windows are split into two halves by document
  (`ProbeBatch.eval_half`); `RAPResult.reliability` is the Spearman correlation across
  clusters of the two halves' Delta L. The callback shrinks Eq. 7 toward neutral when it is
  below `reliability_threshold` (docs/design.md).
* Clusters with fewer than `min_docs` adaptation or evaluation documents are not probed
  (`RAPResult.flagged`, NaN delta: Eq. 7 keeps them neutral).

Design choices and their cost
-----------------------------
* The live model is never modified. The trunk (embeddings + lower blocks, and the final
  norm when `reset_depth == 0`) runs once per window set under `torch.no_grad()` by calling
  the live submodules directly (so DDP/FSDP forward hooks and the autograd graph of the
  training step are not involved). The trainable part is a `copy.deepcopy` of the upper
  modules with its hooks stripped, re-initialised and cast to float32; it is trained through
  `torch.func.functional_call` with a functional AdamW (term for term `torch.optim.AdamW`),
  so live parameters, their `.grad`, the live optimizer, `training` flags and buffers are
  untouched. Every draw uses an explicit `torch.Generator`, and the whole probe runs inside
  `torch.random.fork_rng`, so the global CPU/CUDA RNG streams are the same as without a probe.
* theta_init: every parameter of the copy is redrawn in a fixed (name) order from one CPU
  generator seeded by `(seed, refresh_index)`: norm weights = 1, biases = 0, everything
  else ~ N(0, config.initializer_range). A head tied to the input embeddings is untied by
  the copy (only `lm_head` is copied). The micro-batch order of each epoch is drawn from a
  generator seeded by `(seed, refresh_index, number of windows)`: the same for every cluster
  with the same number of windows, on every device and rank.
* The upper part runs in eval mode (no dropout): the probe measures learnability, not noise.
* Padding: windows are right-padded with `pad_id` (None = no padding); pad positions are not
  loss targets, and with causal attention no real token attends to a later pad.
* Batching over clusters: on accelerators, clusters whose window sets have the same shapes
  are probed together with `torch.func.vmap` (theta_init enters unbatched). For that the copy
  (only the copy) switches to eager attention and transformers' `batched_mm` experts kernel.
  Chunks of clusters are sized so that an estimate of their memory stays under
  `vmap_max_bytes`; when not even two fit, clusters run one after another. On CPU vmap was
  measured slower than the loop (docs/rap.md), so it is used there only with `vmap_on_cpu`.
* Distributed: under `torch.distributed`, cluster k is probed on rank `k % world_size`, and
  the per-cluster sums are combined with one `all_reduce` (each value has one owner), so
  every rank returns the same `RAPResult`. FSDP is handled by `full_params()` (the whole model
  is gathered for the duration of the probe); NOT tested on multi-GPU FSDP here.
* Cost, reported in `RAPResult.flops` (2*params per token forward, 6*params per token for
  forward+backward, MoE experts at top_k/num_experts), per cluster with A adaptation tokens
  (window tokens, pads included), E evaluation tokens and S AdamW steps:
      2 P_trunk (A + E)                      trunk, once per window   (E = 0 with eval_split none)
    + 6 P_upper x (tokens of the S micro-batches)                      adaptation
    + 4 P_upper E'                           L_init and L_final forwards (E' = E, or A with none)
    + (6 S + 2) P_upper                      the null baseline (one constant position per step)
  plus 2 P_trunk (+ 2 P_upper at depth > 0) per calibration token (one window per cluster), once
  (it sets lr auto, and `RAPResult.ceiling` with a fixed lr).

Layout: `rap_config` (RAPConfig, ProbeBatch, RAPResult, spearman), `rap_windows` (the
accepted inputs, normalised; the AdamW schedule), `rap_cost` (model unwrapping, full
parameters, FLOP estimates, refresh interval), `rap_model` (the upper part, the trunk's
features), `rap_table` (the per-cluster table, its reduction over ranks, the RAPResult made
from it); this module runs the adaptation and is the entry point. Import from here: it
re-exports the public API.
"""

from __future__ import annotations

import time
import warnings
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from grip_loop.distributed import World
from grip_loop.rap_config import IGNORE, ProbeBatch, RAPConfig, RAPResult, spearman
from grip_loop.rap_cost import (  # noqa: F401  (re-exported: active_params, estimate_probe_flops, estimate_train_flops, refresh_interval)
    _calibration_flops,
    _cluster_flops,
    _probe_param_counts,
    _unwrap,
    active_params,
    estimate_probe_flops,
    estimate_train_flops,
    full_params,
    refresh_interval,
)
from grip_loop.rap_model import _build_upper, _Features, _seed_for, _trunk, _Upper, _vmap_kernels, causal_mask
from grip_loop.rap_table import _ROWS, _all_reduce_owned, _result
from grip_loop.rap_windows import _as_dict, _calibration_tokens, _schedule, _thin

__all__ = [
    "ProbeBatch",
    "RAPConfig",
    "RAPResult",
    "active_params",
    "estimate_probe_flops",
    "estimate_train_flops",
    "refresh_interval",
    "full_params",
    "rapid_adaptation_probe",
    "spearman",
]


# ----------------------------------------------------------------------------- adaptation


def _causal_mask(upper: _Upper, f: _Features):
    """The copy's own causal mask for one window (it broadcasts over any batch): the copy may
    use another attention kernel than the live model (vmap switches it to eager)."""
    if not len(upper.blocks):
        return None
    return causal_mask(upper.config, f.h[:1], f.position_ids)


def _make_run(upper: _Upper, cfg: RAPConfig, fa: _Features, fe: _Features, schedule, lr: float):
    """run(params, ha, ta, he, te, half, c, cnt_steps, cnt_half) -> [init, final, null] x 2 halves
    (sums of token losses on the evaluation windows); pure, so it can be vmapped over clusters."""
    from torch.func import functional_call, grad_and_value

    mask_a, mask_e = _causal_mask(upper, fa), _causal_mask(upper, fe)
    pe_a, pe_e = fa.position_embeddings, fe.position_embeddings
    pos_a, pos_e = fa.position_ids, fe.position_ids
    pe_1 = None if pe_a is None else tuple(t[:, :1] for t in pe_a)  # one constant position
    pos_1 = pos_a[:, :1]
    chunk = cfg.micro_batch or max(1, fe.h.shape[0])
    b1, b2 = cfg.betas

    def window_nll(params, h, targets, pe, mask, pos):
        logits = functional_call(upper, params, (h, pe, mask, pos))[:, :-1].float()
        ce = F.cross_entropy(
            logits.reshape(-1, logits.shape[-1]), targets.reshape(-1), reduction="none", ignore_index=IGNORE
        )
        return ce.view(targets.shape).sum(1)

    def train_loss(params, h, targets):
        n = (targets != IGNORE).sum().clamp_min(1)
        return window_nll(params, h, targets, pe_a, mask_a, pos_a).sum() / n

    def null_logits(params, c):
        return functional_call(upper, params, (c.view(1, 1, -1), pe_1, None, pos_1))[0, 0].float()

    def null_loss(params, c, cnt):
        return -(cnt * torch.log_softmax(null_logits(params, c), -1)).sum() / cnt.sum().clamp_min(1.0)

    grad_train, grad_null = grad_and_value(train_loss), grad_and_value(null_loss)

    def adamw(params, grad_at):
        # torch.optim.AdamW (single-tensor, non-amsgrad), written out for torch.func.
        m = {k: torch.zeros_like(v) for k, v in params.items()}
        v = {k: torch.zeros_like(p) for k, p in params.items()}
        for t in range(1, len(schedule) + 1):
            grads, _ = grad_at(params, t - 1)
            new = {}
            for k, p in params.items():
                g = grads[k]
                p = p * (1.0 - lr * cfg.weight_decay)
                m[k] = m[k] * b1 + g * (1.0 - b1)
                v[k] = v[k] * b2 + g * g * (1.0 - b2)
                denom = (v[k].sqrt() / (1.0 - b2**t) ** 0.5) + cfg.eps
                new[k] = p - (lr / (1.0 - b1**t)) * m[k] / denom
            params = new
        return params

    def measure(params, h, targets, half):
        sums = torch.cat(
            [
                window_nll(params, h[i : i + chunk], targets[i : i + chunk], pe_e, mask_e, pos_e)
                for i in range(0, h.shape[0], chunk)
            ]
        )
        half = half.to(sums.dtype)
        return torch.stack([(sums * (1 - half)).sum(), (sums * half).sum()])

    def run(params, ha, ta, he, te, half, c, cnt_steps, cnt_half):
        init = measure(params, he, te, half)
        tuned = adamw(params, lambda p, j: grad_train(p, ha[schedule[j]], ta[schedule[j]]))
        final = measure(tuned, he, te, half)
        if cfg.baseline == "null":
            q = adamw(params, lambda p, j: grad_null(p, c, cnt_steps[j]))
            base = -(cnt_half * torch.log_softmax(null_logits(q, c), -1)).sum(-1)
        else:
            base = torch.zeros_like(init)
        return torch.cat([init, final, base])

    return run


@dataclass
class _Inputs:
    """Everything `run` needs for one cluster, besides theta_init."""

    fa: _Features
    fe: _Features
    half: torch.Tensor  # (n_eval,) 0/1
    c: torch.Tensor  # (d,) the null baseline's constant input
    cnt_steps: torch.Tensor  # (S, V) target counts of each step's micro-batch
    cnt_half: torch.Tensor  # (2, V) target counts of each evaluation half
    cnt_adapt: torch.Tensor  # (V,) every adaptation target

    def args(self):
        return (self.fa.h, self.fa.targets, self.fe.h, self.fe.targets, self.half, self.c)


def _counts(targets: torch.Tensor, vocab: int) -> torch.Tensor:
    t = targets[targets != IGNORE]
    return torch.bincount(t, minlength=vocab)[:vocab].float()


def _inputs(fa: _Features, fe: _Features, half: torch.Tensor, schedule, vocab: int) -> _Inputs:
    valid = fa.targets != IGNORE
    h = fa.h[:, :-1][valid]  # positions with a next-token target
    if h.shape[0] == 0:
        h = fa.h.reshape(-1, fa.h.shape[-1])
    mean = h.mean(0)
    scale = h.abs().sum(1).mean() / mean.abs().sum().clamp_min(1e-12)
    half = half.to(fe.targets.device)
    cnt_half = torch.stack([_counts(fe.targets[half == i], vocab) for i in (0, 1)])
    cnt_steps = torch.stack([_counts(fa.targets[idx], vocab) for idx in schedule])
    return _Inputs(fa, fe, half, mean * scale, cnt_steps, cnt_half, _counts(fa.targets, vocab))


def _unigram_nll(inp: _Inputs, vocab: int) -> torch.Tensor:
    """Closed-form baseline: the add-1/2 smoothed unigram of the adaptation targets, as summed
    token losses on each evaluation half."""
    p = (inp.cnt_adapt + 0.5) / (inp.cnt_adapt.sum() + 0.5 * vocab)
    return -(inp.cnt_half * p.log()).sum(-1)


@torch.no_grad()
def _head_input_l1(lm, upper: _Upper, batches: Sequence[ProbeBatch], depth: int, pad_id, device) -> float:
    """m1: the mean L1 norm of the head's input at theta_init over the calibration windows
    (the first adaptation window of every probed cluster), grouped by window length."""
    by_len: dict[int, list[torch.Tensor]] = {}
    for b in batches:
        by_len.setdefault(b.adapt.shape[1], []).append(b.adapt[:1])
    total, count = 0.0, 0
    for rows in by_len.values():
        f = _trunk(lm, torch.cat(rows).to(device), depth, pad_id)
        x = (
            f.h
            if depth == 0
            else upper.features(f.h, f.position_embeddings, _causal_mask(upper, f), f.position_ids)
        )
        valid = f.targets != IGNORE
        total += float(x[:, :-1][valid].abs().sum())
        count += int(valid.sum())
    return total / count if count else 1.0


def _chunk_size(upper: _Upper, inp: _Inputs, vocab: int, cfg: RAPConfig, config) -> int:
    """Clusters per vmap chunk so that the memory estimate of one chunk stays under the budget.

    float32 per cluster: params, grads, two moments and one temporary (twice with the null
    baseline); logits, their grad and softmax of one micro-batch; ~24 hidden-size activations
    per block; the stored features and counts; and for MoE blocks the per-token expert weights
    `batched_mm` gathers (forward and backward), which dominates for real models.
    """
    n_params = sum(p.numel() for p in upper.parameters())
    n_a, t, d = inp.fa.h.shape
    n = min(cfg.micro_batch or n_a, n_a)
    blocks = len(upper.blocks)
    per_cluster = 10 * n_params + 3 * n * t * vocab + 24 * n * t * d * blocks
    per_cluster += (inp.fa.h.numel() + inp.fe.h.numel()) + inp.cnt_steps.numel()
    expert_params = [p for name, p in upper.named_parameters() if ".experts." in f".{name}"]
    if expert_params:
        e = getattr(config, "num_experts", None) or getattr(config, "num_local_experts", 1)
        top_k = getattr(config, "num_experts_per_tok", 1)
        per_expert = sum(p.numel() for p in expert_params) / e
        per_cluster += 2 * n * t * top_k * per_expert
    return max(1, int(cfg.vmap_max_bytes // (4 * per_cluster)))


def _probe_group(upper, cfg, members, inputs, use_vmap, vocab, model_config, schedule, lr, done=None):
    """Rows [init0, init1, final0, final1, base0, base1] per cluster of one same-shaped group;
    `done(n)` is called as clusters finish (progress)."""
    params = {k: p.detach() for k, p in upper.named_parameters()}
    first = inputs[members[0]]
    chunk = _chunk_size(upper, first, vocab, cfg, model_config)
    out: list[np.ndarray] = []
    if use_vmap and len(members) > 1 and chunk > 1:
        with _vmap_kernels(upper):
            run = _make_run(upper, cfg, first.fa, first.fe, schedule, lr)
            batched = torch.func.vmap(run, in_dims=(None,) + (0,) * 8, randomness="error")
            for s in range(0, len(members), chunk):
                part = [inputs[c] for c in members[s : s + chunk]]
                args = [
                    torch.stack(xs)
                    for xs in zip(*[(*p.args(), p.cnt_steps, p.cnt_half) for p in part], strict=True)
                ]
                out += list(batched(params, *args).detach().cpu().double().numpy())
                if done is not None:
                    done(len(part))
        return out
    for c in members:
        inp = inputs[c]
        run = _make_run(upper, cfg, inp.fa, inp.fe, schedule, lr)
        out.append(run(params, *inp.args(), inp.cnt_steps, inp.cnt_half).detach().cpu().double().numpy())
        if done is not None:
            done(1)
    return out


# ----------------------------------------------------------------------------- entry point


# rows of the per-cluster table combined across ranks
def rapid_adaptation_probe(
    model: nn.Module,
    probe_batches: Mapping[int, torch.Tensor | ProbeBatch | None]
    | Sequence[torch.Tensor | ProbeBatch | None],
    config: RAPConfig,
    *,
    refresh_index: int = 0,
    num_clusters: int | None = None,
    progress: bool = False,
) -> RAPResult:
    """Probe every cluster's learnability on the live `model` without changing it.

    `probe_batches[k]` is a `ProbeBatch` (adaptation and evaluation windows of cluster k) or
    one LongTensor (n_k, T) whose rows alternate between the two roles (eval_split "split") or
    are both (eval_split "none"); missing, None or empty entries give NaN for that cluster.
    Under `torch.distributed` every rank must call this with the same arguments; each probes its
    share of the clusters and all ranks return the same result. `progress` shows a bar of
    probed clusters on rank 0 (a terminal bar, or periodic lines when stderr is a file).
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
    batches, k_total = _as_dict(probe_batches, num_clusters, config)
    flagged = np.zeros(k_total, bool)
    live: dict[int, ProbeBatch] = {}
    for c, b in batches.items():
        if b is not None:
            flagged[c] = _thin(b, config)
            if not flagged[c]:
                live[c] = b

    dist = torch.distributed
    distributed = dist.is_available() and dist.is_initialized()
    here = World.current(from_env=False)
    rank, world = here.rank, here.world_size
    device = next(lm.parameters()).device
    mine = [c for c in sorted(live) if c % world == rank]

    start = time.perf_counter()
    table = np.full((len(_ROWS), k_total), np.nan)
    table[-1] = 0.0
    vocab = lm.lm_head.weight.shape[0]
    depth = config.reset_depth
    cuda_devices = [device] if device.type == "cuda" else []
    # Under torch.distributed a rank that fails must still join the all_reduce below, or
    # every other rank waits in it forever: its clusters come back NaN on every rank
    # (the callback then keeps the previous budgets everywhere). Alone, it just raises.
    # two units per cluster: its trunk features, then its probe (the first can take minutes
    # on many clusters: the bar starts before it, so a log shows the probe has begun)
    bar = _progress_bar(2 * len(mine), progress and rank == 0)
    try:
        with torch.random.fork_rng(devices=cuda_devices), full_params(model):
            seed = _seed_for(config.seed, refresh_index)
            upper = _build_upper(lm, depth, seed).to(device)
            trunk_p, upper_p = _probe_param_counts(lm, depth)
            m1 = _head_input_l1(lm, upper, [live[c] for c in sorted(live)], depth, config.pad_id, device)
            calibration = _calibration_flops(
                trunk_p, upper_p, _calibration_tokens(list(live.values())), config
            )
            inputs: dict[int, _Inputs] = {}
            plans: dict[int, tuple[list[torch.Tensor], float]] = {}
            for c in mine:
                pb = live[c]
                fa = _trunk(lm, pb.adapt.to(device), depth, config.pad_id)
                fe = (
                    fa
                    if config.eval_split == "none"
                    else _trunk(lm, pb.eval.to(device), depth, config.pad_id)
                )
                n_a = pb.adapt.shape[0]
                steps = config.num_steps(n_a)
                lr = (
                    config.auto_lr_nats / (steps * max(m1, 1e-12))
                    if config.lr == "auto"
                    else float(config.lr)
                )
                schedule = _schedule(n_a, config, _seed_for(seed, n_a))
                schedule = [idx.to(device) for idx in schedule]
                inputs[c] = _inputs(fa, fe, pb.eval_half, schedule, vocab)
                plans[c] = (schedule, lr)
                table[_ROWS.index("lr"), c] = lr
                table[_ROWS.index("ceiling"), c] = lr * steps * m1
                table[-1, c] = _cluster_flops(trunk_p, upper_p, pb, config)
                n_half = inputs[c].cnt_half.sum(-1).double().cpu().numpy()
                table[_ROWS.index("n0"), c], table[_ROWS.index("n1"), c] = n_half
                bar.update(1)
            if rank == 0 and live:  # every rank calibrates; counted once
                table[-1, min(live)] += calibration
            groups: dict[tuple, list[int]] = {}
            for c in mine:
                i = inputs[c]
                groups.setdefault((tuple(i.fa.h.shape), tuple(i.fe.h.shape)), []).append(c)
            # On CPU the per-cluster work already fills the cores and vmap's batched gathers cost
            # more than they save (docs/rap.md has the numbers), so vmap is an accelerator path.
            use_vmap = config.vmap and (device.type != "cpu" or config.vmap_on_cpu)
            for members in groups.values():
                schedule, lr = plans[members[0]]
                rows = _probe_group(
                    upper, config, members, inputs, use_vmap, vocab, lm.config, schedule, lr, done=bar.update
                )
                for c, row in zip(members, rows, strict=True):
                    if config.baseline == "unigram":
                        row[4:6] = _unigram_nll(inputs[c], vocab).double().cpu().numpy()
                    table[:6, c] = row
    except Exception as exc:
        bar.close()
        if not distributed:
            raise
        warnings.warn(
            f"RAP failed on rank {rank} ({type(exc).__name__}: {exc}); its clusters {mine} are NaN",
            stacklevel=2,
        )
        table[:-1, mine] = np.nan
    bar.close()
    if distributed:
        table = _all_reduce_owned(table, mine, device)
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return _result(table, config, flagged, time.perf_counter() - start)


def _progress_bar(total: int, enabled: bool):
    import sys

    from tqdm import tqdm

    # on a terminal a live bar; in a log file a line every ~30 s instead of carriage returns
    interval = 0.1 if sys.stderr.isatty() else 30.0
    return tqdm(
        total=total,
        desc="probe (features, then adaptation)",
        unit="step",
        disable=not enabled,
        mininterval=interval,
        maxinterval=max(interval, 10.0),
    )
