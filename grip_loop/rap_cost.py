"""What the probe costs and what it touches: the HF model inside DDP / FSDP / compile wrappers,
full (unsharded) parameters, active parameter counts and FLOP estimates of training and of a
probe, and the refresh interval that keeps the probe under a FLOP budget (`grip_loop.rap`)."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import numpy as np
import torch
from torch import nn

from grip_loop.rap_config import ProbeBatch, RAPConfig
from grip_loop.rap_windows import _as_dict, _calibration_tokens, _thin

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
