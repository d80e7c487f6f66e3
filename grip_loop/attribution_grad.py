"""Attribution's gradients and projection (`grip_loop.attribution`, part 1 of its docstring):
the upper parameters of a model, the mean per-token next-token loss gradient of a group of
windows over them, and the seeded Johnson-Lindenstrauss projection P, drawn chunk by chunk from
(seed, parameter name, chunk) and never stored."""

from __future__ import annotations

import contextlib
import math
import zlib
from collections.abc import Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

IGNORE = -100
CHUNK = 1 << 15  # entries of one parameter per projection chunk (part of P's definition)


# ----------------------------------------------------------------------------- gradients


def upper_parameters(lm: nn.Module, layers: int) -> list[tuple[str, nn.Parameter]]:
    """(name, parameter) of the LM head, and with `layers` > 0 of the last `layers` decoder
    blocks and the final norm, in the model's named_parameters order (a tied head counts once)."""
    for attr in ("model.layers", "model.norm", "lm_head"):
        try:
            lm.get_submodule(attr)
        except AttributeError:
            raise ValueError(f"model: expected an HF causal LM with `{attr}` ({type(lm).__name__})") from None
    n = len(lm.model.layers)
    if layers > n:
        raise ValueError(f"layers: {layers} exceeds the model's {n} decoder layers")
    prefixes = ["lm_head."]
    if layers:
        prefixes += [f"model.layers.{i}." for i in range(n - layers, n)] + ["model.norm."]
    out, seen = [], set()
    for name, p in lm.named_parameters(remove_duplicate=False):
        if any(name.startswith(pre) for pre in prefixes) and id(p) not in seen:
            seen.add(id(p))
            out.append((name, p))
    return out


@contextlib.contextmanager
def _only_grad(lm: nn.Module, params: Sequence[nn.Parameter]):
    """requires_grad on `params` only, eval mode; both restored afterwards."""
    saved = [(p, p.requires_grad) for p in lm.parameters()]
    modes = [(m, m.training) for m in lm.modules()]
    wanted = {id(p) for p in params}
    try:
        for p, _ in saved:
            p.requires_grad_(id(p) in wanted)
        lm.eval()
        yield
    finally:
        for p, flag in saved:
            p.requires_grad_(flag)
        for m, flag in modes:
            m.training = flag


def _targets(ids: torch.Tensor, pad_id: int | None) -> torch.Tensor:
    t = ids[:, 1:].clone()
    if pad_id is not None:
        t[t == pad_id] = IGNORE
    return t


def group_gradient(
    lm: nn.Module, params: Sequence[nn.Parameter], windows: torch.Tensor, *, pad_id=None, micro_batch=16
) -> tuple[torch.Tensor, int]:
    """(flat float32 gradient of the mean per-token next-token loss over `windows` w.r.t.
    `params`, number of target tokens). Model state (grads, flags, mode) is left as it was."""
    device = next(lm.parameters()).device
    total = [torch.zeros(p.shape, dtype=torch.float32, device=device) for p in params]
    tokens = 0
    with _only_grad(lm, params):
        for i in range(0, windows.shape[0], micro_batch):
            ids = windows[i : i + micro_batch].to(device)
            tgt = _targets(ids, pad_id)
            n = int((tgt != IGNORE).sum())
            if n == 0:
                continue
            logits = lm(input_ids=ids).logits[:, :-1].float()
            loss = F.cross_entropy(
                logits.reshape(-1, logits.shape[-1]), tgt.reshape(-1), ignore_index=IGNORE, reduction="sum"
            )
            grads = torch.autograd.grad(loss, list(params), allow_unused=True)
            for acc, g in zip(total, grads, strict=True):
                if g is not None:
                    acc += g.float()
            tokens += n
    flat = torch.cat([g.reshape(-1) for g in total])
    return (flat / max(tokens, 1)), tokens


# ----------------------------------------------------------------------------- projection


def _chunk_seed(seed: int, name: str, chunk: int) -> int:
    ss = np.random.SeedSequence([seed, zlib.crc32(name.encode()), chunk])
    return int(ss.generate_state(1, dtype=np.uint64)[0] >> 1)


def _chunks(names_sizes: Sequence[tuple[str, int]], dim: int, seed: int):
    """(offset, P rows for entries offset..offset+n) over the concatenated parameters."""
    offset = 0
    for name, size in names_sizes:
        for c, start in enumerate(range(0, size, CHUNK)):
            n = min(CHUNK, size - start)
            gen = torch.Generator().manual_seed(_chunk_seed(seed, name, c))
            yield offset + start, torch.randn(n, dim, generator=gen) / math.sqrt(dim)
        offset += size


def project(grads: torch.Tensor, names_sizes: Sequence[tuple[str, int]], dim: int, seed: int) -> torch.Tensor:
    """`grads` [n, p] (rows: flat gradients over the parameters `names_sizes`) -> [n, dim] sketches,
    streaming P chunk by chunk (never materialised). float64 accumulation."""
    p = sum(s for _, s in names_sizes)
    if grads.dim() != 2 or grads.shape[1] != p:
        raise ValueError(f"grads: expected [n, {p}], got {tuple(grads.shape)}")
    g = grads.detach().cpu().float()
    out = torch.zeros(g.shape[0], dim, dtype=torch.float64)
    for off, rows in _chunks(names_sizes, dim, seed):
        out += (g[:, off : off + rows.shape[0]] @ rows).double()
    return out


def projection_matrix(names_sizes: Sequence[tuple[str, int]], dim: int, seed: int) -> torch.Tensor:
    """The full P [p, dim] that `project` applies (tests and tiny models only)."""
    return torch.cat([rows for _, rows in _chunks(names_sizes, dim, seed)])


def split_rows(n: int, splits: int) -> list[np.ndarray]:
    """Row indices of `splits` disjoint groups, round robin (row i -> group i % splits)."""
    return [np.arange(s, n, splits) for s in range(splits)]
