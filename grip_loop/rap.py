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
"""

from __future__ import annotations

import contextlib
import copy
import math
import time
import warnings
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

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

IGNORE = -100
EVAL_SPLITS = ("split", "none")
BASELINES = ("null", "unigram", "init")


def _int(name: str, v, lo: int, *, optional: bool = False) -> None:
    if optional and v is None:
        return
    if isinstance(v, bool) or not isinstance(v, int) or v < lo:
        what = f"None or an int >= {lo}" if optional else f"an int >= {lo}"
        raise ValueError(f"{name}: expected {what}, got {v!r}")


def _num(name: str, v, lo: float, *, open_lo: bool = False, hi: float | None = None) -> None:
    ok = isinstance(v, int | float) and not isinstance(v, bool) and math.isfinite(v)
    ok = ok and (v > lo if open_lo else v >= lo) and (hi is None or v <= hi)
    if not ok:
        rng = f"{'>' if open_lo else '>='} {lo}" + (f" and <= {hi}" if hi is not None else "")
        raise ValueError(f"{name}: expected a finite number {rng}, got {v!r}")


@dataclass(kw_only=True)
class RAPConfig:
    """Settings of the Rapid Adaptation Probe. The defaults are the measured protocol of
    docs/rap.md; `RAPConfig.literal()` is the paper's literal text (Sec. 3.2)."""

    reset_depth: int = 0
    """0 = LM head only; N = the last N decoder blocks + the final norm + the head."""
    eval_split: str = "split"
    """"split": adapt on a cluster's adaptation windows, measure on its evaluation windows
    (other documents). "none": adapt and measure on the same windows (the paper's text)."""
    baseline: str | None = "null"
    """What Delta L is measured from. "null": the same head and schedule on a constant input
    (V-usable information: what the features add beyond the cluster's token distribution);
    "unigram": the closed-form smoothed unigram of the adaptation targets; "init": the loss
    at theta_init (the paper's L_init, ~ln V). YAML reads a bare `null` as None: it means "null"."""
    epochs: int = 10
    """Passes over the adaptation windows (the paper's K = 10 epochs); ignored when `steps` is set."""
    steps: int | None = None
    """A fixed number of AdamW steps instead of `epochs` (micro-batches cycle through the epochs)."""
    micro_batch: int | None = 8
    """Windows per AdamW step; None = every step on all adaptation windows (full batch)."""
    lr: float | str = "auto"
    """AdamW learning rate, or "auto": auto_lr_nats / (steps x mean L1 norm of the head's input)."""
    auto_lr_nats: float = 8.0
    """With lr auto: how far (in nats) the schedule can move any logit (docs/rap.md)."""
    weight_decay: float = 0.0
    betas: tuple[float, float] = (0.9, 0.999)
    eps: float = 1e-8
    seed: int = 0
    """theta_init seed; combined with the refresh index, so each refresh draws a new shared init."""
    batch_size: int | None = None
    """At most this many windows per role (adaptation, evaluation) are used; None = all given."""
    metric: str = "relative"
    """Which value `RAPResult.delta` holds (feeds Eq. 7): "relative" (Delta L / L_base) or "absolute"."""
    min_docs: int = 8
    """Clusters with fewer adaptation or evaluation documents are flagged and not probed (neutral)."""
    reliability_threshold: float = 0.5
    """Below this split-half reliability the callback shrinks Eq. 7 toward neutral in proportion."""
    pad_id: int | None = None
    """Token id of right padding; excluded as a loss target. None = windows are fully packed."""
    vmap: bool = True
    """Probe same-shaped clusters together with torch.func.vmap on accelerators; False = one by one."""
    vmap_on_cpu: bool = False
    """Also use vmap on CPU (slower there, measured; kept for testing vmap without a GPU)."""
    vmap_max_bytes: float = 2e9
    """Estimated memory cap of one vmap chunk (parameters, grads, Adam moments, activations)."""

    def __post_init__(self) -> None:
        _int("reset_depth", self.reset_depth, 0)
        if self.eval_split not in EVAL_SPLITS:
            raise ValueError(f"eval_split: expected one of {EVAL_SPLITS}, got {self.eval_split!r}")
        if self.baseline is None:  # `baseline: null` in YAML
            self.baseline = "null"
        if self.baseline not in BASELINES:
            raise ValueError(f"baseline: expected one of {BASELINES}, got {self.baseline!r}")
        _int("epochs", self.epochs, 1)
        _int("steps", self.steps, 1, optional=True)
        _int("micro_batch", self.micro_batch, 1, optional=True)
        if isinstance(self.lr, str):
            if self.lr != "auto":
                raise ValueError(f"lr: expected a finite number > 0 or 'auto', got {self.lr!r}")
        else:
            _num("lr", self.lr, 0.0, open_lo=True)
        _num("auto_lr_nats", self.auto_lr_nats, 0.0, open_lo=True)
        _num("weight_decay", self.weight_decay, 0.0)
        if len(self.betas) != 2 or not all(
            isinstance(b, int | float) and not isinstance(b, bool) and 0.0 <= b < 1.0 for b in self.betas
        ):
            raise ValueError(f"betas: expected two numbers in [0, 1), got {self.betas!r}")
        _num("eps", self.eps, 0.0, open_lo=True)
        _int("seed", self.seed, 0)
        _int("batch_size", self.batch_size, 1, optional=True)
        if self.metric not in ("relative", "absolute"):
            raise ValueError(f"metric: expected 'relative' or 'absolute', got {self.metric!r}")
        _int("min_docs", self.min_docs, 1)
        _num("reliability_threshold", self.reliability_threshold, -1.0, hi=1.0)
        _int("pad_id", self.pad_id, 0, optional=True)
        _num("vmap_max_bytes", self.vmap_max_bytes, 0.0, open_lo=True)

    @classmethod
    def literal(cls, **overrides) -> RAPConfig:
        """The paper's text (Sec. 3.2): train and measure on the same batch, 10 full-batch AdamW
        steps at lr 3e-4, Delta L from L(theta_init). Kept for comparison (docs/rap.md)."""
        base = dict(eval_split="none", baseline="init", steps=10, micro_batch=None, lr=3e-4, min_docs=1)
        return cls(**{**base, **overrides})

    def num_steps(self, n_windows: int) -> int:
        """AdamW steps for `n_windows` adaptation windows."""
        if self.steps is not None:
            return self.steps
        mb = n_windows if self.micro_batch is None else min(self.micro_batch, n_windows)
        return self.epochs * -(-n_windows // max(mb, 1))


@dataclass
class ProbeBatch:
    """One cluster's probe windows (LongTensors (n, T), right-padded with `RAPConfig.pad_id`)."""

    adapt: torch.Tensor
    """Adaptation windows: the reset part is trained on these."""
    eval: torch.Tensor | None = None
    """Evaluation windows (other documents of the cluster): L_init, L_final and the baseline are
    measured here. None = the rows of `adapt` alternate between the two roles under
    eval_split "split"; under "none" the adaptation windows are measured."""
    eval_half: torch.Tensor | None = None
    """(n_eval,) 0/1: the split-half each evaluation window belongs to, by document. None = alternating rows."""
    adapt_docs: int | None = None
    """Documents behind the adaptation windows (for `min_docs`); None = one per window."""
    eval_docs: int | None = None


@dataclass
class RAPResult:
    """Per-cluster probe outcome; arrays are float64 [K], NaN where a cluster was not probed."""

    delta: np.ndarray
    """The metric chosen by `RAPConfig.metric` (what Eq. 7 consumes)."""
    delta_abs: np.ndarray
    delta_rel: np.ndarray
    loss_init: np.ndarray
    """L(theta_init) on the evaluation windows (~ln V)."""
    loss_final: np.ndarray
    loss_base: np.ndarray
    """The baseline Delta L is measured from (`RAPConfig.baseline`; = loss_init for "init")."""
    seconds: float
    flops: float
    """Estimated probe FLOPs over all clusters (all ranks together)."""
    delta_half: np.ndarray = field(default_factory=lambda: np.zeros((2, 0)))
    """[2, K]: `delta` measured on each half of the evaluation documents."""
    reliability: float = float("nan")
    """Spearman correlation across clusters of the two halves' delta (NaN: fewer than 3 clusters)."""
    flagged: np.ndarray = field(default_factory=lambda: np.zeros(0, bool))
    """Clusters with probe data but fewer than `min_docs` adaptation or evaluation documents."""
    lr: np.ndarray = field(default_factory=lambda: np.zeros(0))
    """The AdamW learning rate each cluster was adapted with."""
    ceiling: np.ndarray = field(default_factory=lambda: np.zeros(0))
    """lr x steps x mean L1 norm of the head's input: about how far (nats) any logit could move."""

    def cost_fraction(self, train_flops_between_refreshes: float) -> float:
        """Probe FLOPs as a fraction of the training FLOPs spent between two refreshes."""
        if not train_flops_between_refreshes > 0:
            raise ValueError(
                f"train_flops_between_refreshes: expected > 0, got {train_flops_between_refreshes!r}"
            )
        return float(self.flops / train_flops_between_refreshes)

    def shrink(self, threshold: float) -> float:
        """Eq. 7's trust in this probe: 1 when reliability >= threshold, reliability / threshold
        below it (0 when the reliability is negative or unknown)."""
        r = self.reliability
        if not np.isfinite(r) or r <= 0:
            return 0.0
        return 1.0 if threshold <= 0 or r >= threshold else float(r / threshold)


def spearman(a, b) -> float:
    """Spearman rank correlation (average ranks for ties) over the entries finite in both; NaN
    with fewer than 3 such entries or a constant side."""
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    ok = np.isfinite(a) & np.isfinite(b)
    if ok.sum() < 3:
        return float("nan")
    ra, rb = _ranks(a[ok]), _ranks(b[ok])
    if ra.std() == 0 or rb.std() == 0:
        return float("nan")
    return float(np.corrcoef(ra, rb)[0, 1])


def _ranks(x: np.ndarray) -> np.ndarray:
    order = np.argsort(x, kind="stable")
    ranks = np.empty(len(x))
    ranks[order] = np.arange(len(x), dtype=np.float64)
    for v in np.unique(x):  # ties share their average rank
        tie = x == v
        if tie.sum() > 1:
            ranks[tie] = ranks[tie].mean()
    return ranks


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


def _cluster_flops(trunk: float, upper: float, pb: ProbeBatch, cfg: RAPConfig) -> float:
    """FLOPs of one cluster's probe (module docstring, "Cost"); `pb` already normalised."""
    t = pb.adapt.shape[1]
    n_a = pb.adapt.shape[0]
    mb = n_a if cfg.micro_batch is None else min(cfg.micro_batch, n_a)
    steps = cfg.num_steps(n_a)
    per_epoch = [min(mb, n_a - i) for i in range(0, n_a, mb)]
    trained = sum(per_epoch[j % len(per_epoch)] for j in range(steps)) * t
    split = cfg.eval_split == "split"
    measured = pb.eval.numel() if split else pb.adapt.numel()
    flops = 2 * trunk * (pb.adapt.numel() + (pb.eval.numel() if split else 0))
    flops += 6 * upper * trained + 4 * upper * measured
    if cfg.baseline == "null":
        flops += (6 * steps + 2) * upper
    return float(flops)


def _calibration_flops(trunk: float, upper: float, tokens: int, cfg: RAPConfig) -> float:
    """The m1 calibration forward (lr auto; also run with a fixed lr, for `RAPResult.ceiling`)."""
    return float(2 * (trunk + (upper if cfg.reset_depth else 0.0)) * tokens)


def estimate_probe_flops(
    model: nn.Module, probe_batches, config: RAPConfig, num_clusters: int | None = None
) -> float:
    """FLOPs of one probe over `probe_batches` (as `rapid_adaptation_probe` takes them): the same
    count as `RAPResult.flops`, before the probe runs. Parameters must be full (inside
    `full_params` under FSDP) or on `meta`."""
    trunk, upper = _probe_param_counts(_unwrap(model), config.reset_depth)
    batches, _ = _as_dict(probe_batches, num_clusters, config)
    probed = [b for b in batches.values() if b is not None and not _thin(b, config)]
    total = sum(_cluster_flops(trunk, upper, b, config) for b in probed)
    return total + _calibration_flops(trunk, upper, _calibration_tokens(probed), config)


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
        return self.head(self.features(h, position_embeddings, mask, position_ids))

    def features(self, h, position_embeddings, mask, position_ids):
        """The head's input: the reset blocks and the final norm applied to `h`."""
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
        return h


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


def causal_mask(config, inputs_embeds: torch.Tensor, position_ids: torch.Tensor):
    """transformers' causal mask for `config`'s attention kernel (None where the kernel is causal
    by itself). The cache argument was renamed (`past_key_values` -> `cache`) in transformers 5."""
    import inspect

    from transformers.masking_utils import create_causal_mask

    cache_arg = "cache" if "cache" in inspect.signature(create_causal_mask).parameters else "past_key_values"
    return create_causal_mask(
        config=config,
        inputs_embeds=inputs_embeds,
        attention_mask=None,
        position_ids=position_ids,
        **{cache_arg: None},
    )


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
        mask = causal_mask(lm.config, h, position_ids)
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


# ----------------------------------------------------------------------------- probe windows


def _check_ids(c, name: str, t) -> None:
    where = f"probe_batches[{c}]{'.' + name if name else ''}"
    if not torch.is_tensor(t) or t.dim() != 2 or t.dtype != torch.long:
        got = tuple(t.shape) if torch.is_tensor(t) else type(t).__name__
        raise ValueError(f"{where}: expected a LongTensor (n, T), got {got}")
    if t.shape[0] and t.shape[1] < 2:
        raise ValueError(f"{where}: windows need T >= 2 tokens, got T={t.shape[1]}")


def _alternate(n: int) -> torch.Tensor:
    return torch.arange(n) % 2


def _kept(docs: int | None, kept: int, total: int) -> int:
    """Documents behind `kept` of `total` windows (`docs` None = one per window)."""
    if docs is None:
        return kept
    return docs if kept >= total else int(docs * kept // max(total, 1))


def _normalise(c, entry, cfg: RAPConfig) -> ProbeBatch | None:
    """`entry` (a LongTensor or a ProbeBatch) as a ProbeBatch with eval windows and halves
    resolved for `cfg`; None = no probe data for this cluster."""
    if entry is None:
        return None
    if torch.is_tensor(entry):
        _check_ids(c, "", entry)
        entry = ProbeBatch(adapt=entry)
    elif not isinstance(entry, ProbeBatch):
        raise ValueError(
            f"probe_batches[{c}]: expected a LongTensor (n, T) or a ProbeBatch, got {type(entry).__name__}"
        )
    _check_ids(c, "adapt", entry.adapt)
    adapt, ev, docs_a, docs_e = entry.adapt, entry.eval, entry.adapt_docs, entry.eval_docs
    if cfg.eval_split == "split" and ev is None:  # one tensor: rows alternate between the roles
        adapt, ev = entry.adapt[0::2], entry.adapt[1::2]
        n = entry.adapt_docs
        docs_a, docs_e = (None, None) if n is None else (-(-n // 2), n // 2)
    if adapt.shape[0] == 0:
        return None
    bs = cfg.batch_size or adapt.shape[0]
    docs_a = _kept(docs_a, min(bs, adapt.shape[0]), adapt.shape[0])
    adapt = adapt[:bs]
    if cfg.eval_split == "none":
        return ProbeBatch(adapt, adapt, _alternate(adapt.shape[0]), docs_a, docs_a)
    _check_ids(c, "eval", ev)
    if ev.shape[0] == 0:  # no evaluation document: flagged (too few documents), never probed
        return ProbeBatch(adapt, ev, torch.zeros(0, dtype=torch.long), docs_a, 0)
    half = _alternate(ev.shape[0]) if entry.eval_half is None else torch.as_tensor(entry.eval_half)
    if half.shape != (ev.shape[0],) or not bool(((half == 0) | (half == 1)).all()):
        raise ValueError(f"probe_batches[{c}].eval_half: expected ({ev.shape[0]},) zeros and ones")
    docs_e = _kept(docs_e, min(bs, ev.shape[0]), ev.shape[0])
    return ProbeBatch(adapt, ev[:bs], half[:bs].long(), docs_a, docs_e)


def _thin(pb: ProbeBatch, cfg: RAPConfig) -> bool:
    """Too few documents for a stable estimate: flagged, kept neutral."""
    return min(pb.adapt_docs, pb.eval_docs) < cfg.min_docs


def _as_dict(probe_batches, num_clusters, cfg: RAPConfig) -> tuple[dict[int, ProbeBatch | None], int]:
    if isinstance(probe_batches, Mapping):
        raw = {int(k): v for k, v in probe_batches.items()}
    elif isinstance(probe_batches, Sequence):
        raw = dict(enumerate(probe_batches))
    else:
        raise ValueError(
            f"probe_batches: expected a dict or list of LongTensors / ProbeBatches, got {type(probe_batches)}"
        )
    k_max = max(raw, default=-1) + 1
    k = k_max if num_clusters is None else int(num_clusters)
    if k < k_max or any(c < 0 for c in raw):
        raise ValueError(f"num_clusters: {num_clusters} does not cover cluster ids {sorted(raw)}")
    return {c: _normalise(c, v, cfg) for c, v in raw.items()}, k


def _calibration_tokens(batches: Sequence[ProbeBatch]) -> int:
    return int(sum(b.adapt.shape[1] for b in batches))


def _schedule(n: int, cfg: RAPConfig, seed: int) -> list[torch.Tensor]:
    """Window indices of every AdamW step: `epochs` shuffled passes in micro-batches (or
    `steps` steps cycling through such passes); full batch = every window every step."""
    total = cfg.num_steps(n)
    if cfg.micro_batch is None or cfg.micro_batch >= n:
        return [torch.arange(n)] * total
    gen = torch.Generator().manual_seed(seed)
    out: list[torch.Tensor] = []
    while len(out) < total:
        perm = torch.randperm(n, generator=gen)
        out += [perm[i : i + cfg.micro_batch] for i in range(0, n, cfg.micro_batch)]
    return out[:total]


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
_ROWS = ("init0", "init1", "final0", "final1", "base0", "base1", "n0", "n1", "lr", "ceiling", "flops")


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
    rank, world = (dist.get_rank(), dist.get_world_size()) if distributed else (0, 1)
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


def _result(table: np.ndarray, cfg: RAPConfig, flagged: np.ndarray, seconds: float) -> RAPResult:
    row = dict(zip(_ROWS, table, strict=True))
    n = row["n0"] + row["n1"]
    with np.errstate(invalid="ignore", divide="ignore"):
        loss_init = (row["init0"] + row["init1"]) / n
        loss_final = (row["final0"] + row["final1"]) / n
        if cfg.baseline == "init":
            base = (row["init0"], row["init1"])
        else:
            base = (row["base0"], row["base1"])
        loss_base = (base[0] + base[1]) / n
        delta_abs = loss_base - loss_final
        delta_rel = delta_abs / loss_base
        halves = []
        for h in (0, 1):
            nh = row[f"n{h}"]
            lb, lf = base[h] / nh, row[f"final{h}"] / nh
            halves.append((lb - lf) / lb if cfg.metric == "relative" else lb - lf)
    delta_half = np.array(halves)
    return RAPResult(
        delta=delta_rel if cfg.metric == "relative" else delta_abs,
        delta_abs=delta_abs,
        delta_rel=delta_rel,
        loss_init=loss_init,
        loss_final=loss_final,
        loss_base=loss_base,
        seconds=seconds,
        flops=float(np.sum(row["flops"])),
        delta_half=delta_half,
        reliability=spearman(delta_half[0], delta_half[1]),
        flagged=flagged,
        lr=row["lr"],
        ceiling=row["ceiling"],
    )


def _all_reduce_owned(table: np.ndarray, mine: list[int], device: torch.device) -> np.ndarray:
    """Combine per-rank tables where each cluster has exactly one owner (NaN = no data anywhere);
    the last row (FLOPs) is summed as is."""
    dist = torch.distributed
    k = table.shape[1]
    owned = np.zeros(k)
    owned[mine] = 1.0
    body = np.where(owned > 0, table[:-1], 0.0)
    packed = np.concatenate([body, table[-1:], owned[None]], axis=0)
    dev = device if dist.get_backend() == "nccl" else torch.device("cpu")
    t = torch.as_tensor(packed, dtype=torch.float64, device=dev)
    dist.all_reduce(t)
    out = t.cpu().numpy()
    have = out[-1] > 0
    return np.concatenate([np.where(have, out[:-2], np.nan), out[-2:-1]], axis=0)
