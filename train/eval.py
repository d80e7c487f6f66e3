"""Held-out evaluation of a trained checkpoint: loss / perplexity and HumanEval pass@1.

What is measured (all from the Hugging Face export of the checkpoint, `grip export-hf`):

* **Held-out corpus loss per language**: the documents `grip prepare` held out
  (`heldout_fraction`, manifest field `heldout`), never trained on. Each document is scored
  on its own as `[EOS] doc [EOS]` (EOS doubles as BOS, as in the packed training stream),
  cut into windows of `seq_len` tokens that overlap by one token (the context restarts at a
  window boundary; cost: tokens after a boundary see less context than in a sliding
  window, which overstates the loss of long documents a little, equally for every model).
  Loss = token-weighted mean next-token cross-entropy in nats; ppl = exp(loss). "overall"
  weights every held-out token equally (so the largest language dominates).
* **Held-out loss per cluster** (`heldout_cluster`, keyed by cluster name): the same documents
  grouped by the cluster `grip prepare` assigned them to (their `--cluster-by` value, or their
  nearest k-means centroid), so an ablation can read what a sampler did to each cluster.
* **HumanEval loss**: prompt + canonical solution of all 164 problems (excluded from the
  corpus by content hash), scored like a held-out document; also the loss of the solution
  tokens alone given the prompt (`humaneval_solution`). Prompt and solution are tokenized
  separately and concatenated (the boundary is a newline in every problem).
* **pass@1** (optional, `pass_at_1=True`): greedy `generate` from the prompt, at most
  `max_new_tokens`, stopped at EOS or the next top-level def/class/if __name__/print, then
  run against the problem's tests by `train.humaneval.check_completion` in the sandbox of
  `train.sandbox` (namespaces, unprivileged uid, no network, private file system; see
  docs/reliability.md). A problem passes only if its tests ran to the end. With one greedy
  sample per problem pass@1 is the fraction that pass. eval.json records under `sandbox`
  which isolation layers were in force (and why any was not).
"""

from __future__ import annotations

import json
import math
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch

from grip_loop._checks import check_choice, check_int
from grip_loop.devices import resolve_device


@dataclass(kw_only=True)
class EvalConfig:
    """What `grip eval` (and `grip ablate`'s evaluation of every row) measures, and how."""

    seq_len: int = 256
    """Window length of the held-out loss (the quick start trains at 256)."""
    batch_size: int = 8
    """Windows per forward pass."""
    max_tokens_per_lang: int | None = 200_000
    """Cap on held-out tokens scored per language; None = all."""
    humaneval: bool = True
    """Also score the loss on HumanEval (prompt + canonical solution)."""
    pass_at_1: bool = False
    """Also generate greedy completions and run HumanEval's tests in the sandbox (pass@1)."""
    limit: int | None = None
    """HumanEval problems for pass@1 (the first `limit`); None = all 164."""
    max_new_tokens: int = 128
    """Tokens generated per HumanEval completion at most."""
    exec_timeout: float = 5.0
    """Seconds one HumanEval program may run (wall clock) before its process tree is killed."""
    exec_memory_mb: int = 1024
    """Address-space limit of one HumanEval program, in MiB."""
    exec_isolation: str = "auto"
    """pass@1 sandbox: "auto" (what the kernel allows, with a warning), "strict" or "off"."""
    device: str = "auto"
    """"auto" (cuda when available, else cpu), "cpu" or "cuda[:i]"."""
    progress: bool = True
    """Show progress bars."""

    def __post_init__(self) -> None:
        check_int("seq_len", self.seq_len, 2)
        check_int("batch_size", self.batch_size, 1)
        check_int("max_tokens_per_lang", self.max_tokens_per_lang, 1, optional=True)
        check_int("limit", self.limit, 1, optional=True)
        check_int("max_new_tokens", self.max_new_tokens, 1)
        check_choice("exec_isolation", self.exec_isolation, ("auto", "strict", "off"))


# ------------------------------------------------------------------------------------- data


def load_tokenizer(prepared: str | Path):
    from tokenizers import Tokenizer

    from grip_loop.manifest import load_manifest

    m = load_manifest(prepared, check_files=False)
    path = Path(prepared) / m.tokenizer.get("path", "tokenizer/tokenizer.json")
    if not path.is_file():
        raise FileNotFoundError(f"{path}: the prepared tokenizer is missing; re-run `grip prepare`")
    return Tokenizer.from_file(str(path)), int(m.tokenizer["eos_id"])


def heldout_documents(prepared: str | Path, with_cluster: bool = False) -> dict[str, list]:
    """Token ids of the held-out documents, grouped by language (manifest order); with
    `with_cluster`, (cluster id, token ids) pairs (the cluster the document was assigned to)."""
    from grip_loop.manifest import check_shard_sha256, load_manifest
    from grip_loop.shards import iter_shard

    m = load_manifest(prepared)
    if not m.heldout:
        raise ValueError(
            f"{Path(prepared) / 'manifest.json'}: no held-out shards; re-run `grip prepare` with "
            "heldout_fraction > 0 (default 0.02)"
        )
    out: dict[str, list[np.ndarray]] = {}
    for s in m.heldout:
        check_shard_sha256(prepared, s)
        for d in iter_shard(Path(prepared) / s.path, m.tokenizer["token_dtype"], with_text=False):
            tokens = d.tokens.astype(np.int64)
            item = (int(d.meta.get("cluster", -1)), tokens) if with_cluster else tokens
            out.setdefault(d.meta.get("lang", "unknown"), []).append(item)
    return out


def windows(
    tokens: np.ndarray, seq_len: int, eos: int, score_from: int = 0
) -> list[tuple[np.ndarray, np.ndarray]]:
    """(input_ids, labels) windows of `[eos] tokens [eos]`; consecutive windows share one token so
    every token after the leading EOS is predicted exactly once. Labels before position
    `score_from` of the document (plus the leading EOS) are -100."""
    seq = np.concatenate([[eos], np.asarray(tokens, np.int64), [eos]])
    lab = seq.copy()
    lab[: 1 + score_from] = -100  # position 0 is never a target; the prompt part is masked
    out = []
    start = 0
    while start < len(seq) - 1:
        ids = seq[start : start + seq_len]
        labels = lab[start : start + seq_len].copy()
        if start > 0:
            labels[0] = -100  # predicted as the last token of the previous window
        out.append((ids, labels))
        start += seq_len - 1
    return out


@torch.no_grad()
def score_windows(
    model, wins, *, batch_size: int, pad: int, device, desc: str = "", progress: bool = True, keys=None
):
    """(sum of next-token NLL in nats, number of scored tokens) over `wins`; with `keys` (one per
    window) also {key: (nll, tokens)}, the same sums per key."""
    from tqdm import tqdm

    total, count = 0.0, 0
    per_key: dict = {}
    keyed = list(zip(wins, keys if keys is not None else [None] * len(wins), strict=True))
    keyed.sort(key=lambda wk: -len(wk[0][0]))  # similar lengths together: less padding
    wins = [w for w, _ in keyed]
    win_keys = [k for _, k in keyed]
    for lo in tqdm(
        range(0, len(wins), batch_size), desc=desc, unit="batch", disable=not progress, leave=False
    ):
        chunk = wins[lo : lo + batch_size]
        t = max(len(w[0]) for w in chunk)
        ids = torch.full((len(chunk), t), pad, dtype=torch.long)
        labels = torch.full((len(chunk), t), -100, dtype=torch.long)
        attn = torch.zeros((len(chunk), t), dtype=torch.long)
        for i, (a, b) in enumerate(chunk):
            ids[i, : len(a)] = torch.from_numpy(a)
            labels[i, : len(b)] = torch.from_numpy(b)
            attn[i, : len(a)] = 1
        ids, labels, attn = ids.to(device), labels.to(device), attn.to(device)
        logits = model(input_ids=ids, attention_mask=attn, use_cache=False).logits.float()
        tgt = labels[:, 1:]
        mask = tgt != -100
        nll = torch.nn.functional.cross_entropy(
            logits[:, :-1].reshape(-1, logits.size(-1)), tgt.reshape(-1).clamp_min(0), reduction="none"
        ).view_as(tgt)
        total += float((nll * mask).sum())
        count += int(mask.sum())
        if keys is not None:
            row_nll, row_n = (nll * mask).sum(1).tolist(), mask.sum(1).tolist()
            for key, a, b in zip(win_keys[lo : lo + batch_size], row_nll, row_n, strict=True):
                s0, n0 = per_key.get(key, (0.0, 0))
                per_key[key] = (s0 + a, n0 + int(b))
    if keys is not None:
        return total, count, per_key
    return total, count


def _summary(nll: float, n: int, docs: int) -> dict:
    loss = nll / n if n else float("nan")
    return {"loss": loss, "ppl": math.exp(loss) if n else float("nan"), "tokens": n, "docs": docs}


# ------------------------------------------------------------------------------------- model


def load_hf_model(ckpt: str | Path, hf_dir: str | Path, device, data: str | Path | None = None):
    """Export the Lightning checkpoint to `hf_dir` (grip export-hf, with the tokenizer of the
    prepared corpus `data`) and load it with `AutoModelForCausalLM.from_pretrained`: the
    evaluated model is the published artefact."""
    from transformers import AutoModelForCausalLM

    from train.cmd_export import export_hf

    export_hf(ckpt, hf_dir, data)
    model = AutoModelForCausalLM.from_pretrained(str(hf_dir))
    return model.to(device).eval()


class _StopOnText:
    """StoppingCriteria: stop once the decoded continuation contains a stop sequence."""

    def __init__(self, tok, prompt_len: int) -> None:
        self.tok, self.prompt_len = tok, prompt_len

    def __call__(self, input_ids, scores, **kwargs):
        from train.humaneval import STOP_SEQUENCES

        text = self.tok.decode(input_ids[0, self.prompt_len :].tolist())
        done = any(s in text for s in STOP_SEQUENCES)
        return torch.full((input_ids.shape[0],), done, dtype=torch.bool, device=input_ids.device)


@torch.no_grad()
def generate_completion(model, tok, eos: int, prompt: str, max_new_tokens: int, device) -> str:
    """Greedy continuation of `prompt`, cut at the first stop sequence."""
    from transformers import StoppingCriteriaList

    from train.humaneval import truncate_completion

    ids = [eos] + tok.encode(prompt, add_special_tokens=False).ids
    x = torch.tensor([ids], dtype=torch.long, device=device)
    out = model.generate(
        x,
        attention_mask=torch.ones_like(x),
        max_new_tokens=max_new_tokens,
        do_sample=False,
        eos_token_id=eos,
        pad_token_id=eos,
        stopping_criteria=StoppingCriteriaList([_StopOnText(tok, len(ids))]),
    )
    new = out[0, len(ids) :].tolist()
    if eos in new:
        new = new[: new.index(eos)]
    return truncate_completion(tok.decode(new))


# ------------------------------------------------------------------------------------- main


def evaluate(ckpt: str | Path, prepared: str | Path, out: str | Path, cfg: EvalConfig | None = None) -> dict:
    """Run every measurement; write `<out>/eval.json` and `<out>/eval.md`; return the dict."""
    from tqdm import tqdm

    from train.humaneval import check_completion, load_problems

    cfg = cfg or EvalConfig()
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    device = torch.device(resolve_device(cfg.device))
    t0 = time.perf_counter()
    tok, eos = load_tokenizer(prepared)
    model = load_hf_model(ckpt, out / "hf", device, data=prepared)
    if model.config.vocab_size < tok.get_vocab_size():
        raise ValueError(
            f"{ckpt}: model vocab_size {model.config.vocab_size} < the tokenizer's {tok.get_vocab_size()} "
            f"({prepared}); evaluate with the prepared corpus the model was trained on"
        )
    result: dict = {"ckpt": str(ckpt), "data": str(prepared), "config": asdict(cfg), "heldout": {}}
    score = dict(batch_size=cfg.batch_size, pad=eos, device=device, progress=cfg.progress)

    from grip_loop.manifest import load_manifest

    names = load_manifest(prepared, check_files=False).names
    tot_nll, tot_n, tot_docs = 0.0, 0, 0
    by_cluster: dict[int, list] = {}  # cluster -> [nll, tokens, docs]
    for lang, docs in sorted(heldout_documents(prepared, with_cluster=True).items()):
        wins, keys, used, have = [], [], 0, 0
        for cluster, d in docs:
            if cfg.max_tokens_per_lang is not None and have >= cfg.max_tokens_per_lang:
                break
            w = windows(d, cfg.seq_len, eos)
            wins += w
            keys += [cluster] * len(w)
            have += len(d) + 1
            used += 1
            by_cluster.setdefault(cluster, [0.0, 0, 0])[2] += 1
        nll, n, per = score_windows(model, wins, desc=f"held-out {lang}", keys=keys, **score)
        for cluster, (a, b) in per.items():
            by_cluster[cluster][0] += a
            by_cluster[cluster][1] += b
        result["heldout"][lang] = _summary(nll, n, used)
        tot_nll, tot_n, tot_docs = tot_nll + nll, tot_n + n, tot_docs + used
    result["heldout_overall"] = _summary(tot_nll, tot_n, tot_docs)
    # per cluster (the cluster each held-out document was assigned to: its --cluster-by value,
    # or its nearest k-means centroid), keyed by cluster name
    result["heldout_cluster"] = {
        (names[c] if 0 <= c < len(names) else f"cluster {c}"): _summary(*by_cluster[c])
        for c in sorted(by_cluster)
    }

    if cfg.humaneval:
        problems = load_problems()
        full, sol = [], []
        for p in problems:
            a = tok.encode(p["prompt"], add_special_tokens=False).ids
            b = tok.encode(p["canonical_solution"], add_special_tokens=False).ids
            full += windows(np.array(a + b), cfg.seq_len, eos)
            sol += windows(np.array(a + b), cfg.seq_len, eos, score_from=len(a))
        result["humaneval"] = _summary(*score_windows(model, full, desc="humaneval", **score), len(problems))
        result["humaneval_solution"] = _summary(
            *score_windows(model, sol, desc="humaneval solution", **score), len(problems)
        )

    if cfg.pass_at_1:
        problems = load_problems(cfg.limit)
        passed, samples, boxes = 0, [], []
        for p in tqdm(problems, desc="pass@1 (generate + run)", unit="problem", disable=not cfg.progress):
            completion = generate_completion(model, tok, eos, p["prompt"], cfg.max_new_tokens, device)
            r = check_completion(
                p,
                completion,
                timeout=cfg.exec_timeout,
                memory_mb=cfg.exec_memory_mb,
                isolation=cfg.exec_isolation,
            )
            passed += r.passed
            boxes.append(r.sandbox)
            samples.append(
                {"task_id": p["task_id"], "completion": completion, "status": r.status, "detail": r.detail}
            )
        result["pass_at_1"] = {"pass@1": passed / len(problems), "passed": passed, "problems": len(problems)}
        result["sandbox"] = sandbox_summary(boxes)
        with open(out / "samples.jsonl", "w") as fh:
            for s in samples:
                fh.write(json.dumps(s) + "\n")

    result["seconds"] = round(time.perf_counter() - t0, 2)
    (out / "eval.json").write_text(json.dumps(result, indent=1) + "\n")
    (out / "eval.md").write_text(markdown_table(result))
    return result


def sandbox_summary(boxes: list[dict | None]) -> dict:
    """The `sandbox` entry of eval.json: the isolation layers in force for the pass@1 runs
    (train.sandbox). A layer counts as in force only if it was in force for every run; the
    reasons of the runs that lacked something are kept."""
    boxes = [b for b in boxes if b]
    if not boxes:
        return {}
    out = dict(boxes[0])
    for b in boxes[1:]:
        for k, v in b.items():
            if isinstance(v, bool) and isinstance(out.get(k), bool):
                out[k] = out[k] and v
            elif k == "reason" and v and v not in out.get("reason", ""):
                out["reason"] = "; ".join(x for x in (out.get("reason"), v) if x)
    out["runs"] = len(boxes)
    return out


def markdown_table(r: dict) -> str:
    rows = [(f"held-out {lang}", v) for lang, v in r["heldout"].items()]
    rows.append(("held-out overall", r["heldout_overall"]))
    for key, name in (
        ("humaneval", "HumanEval (prompt + solution)"),
        ("humaneval_solution", "HumanEval solution given the prompt"),
    ):
        if key in r:
            rows.append((name, r[key]))
    lines = ["| set | docs | tokens | loss (nats) | ppl |", "|---|---:|---:|---:|---:|"]
    lines += [f"| {n} | {v['docs']} | {v['tokens']} | {v['loss']:.4f} | {v['ppl']:.2f} |" for n, v in rows]
    if r.get("heldout_cluster"):
        lines += [
            "",
            "| held-out, by cluster | docs | tokens | loss (nats) | ppl |",
            "|---|---:|---:|---:|---:|",
        ]
        lines += [
            f"| {n} | {v['docs']} | {v['tokens']} | {v['loss']:.4f} | {v['ppl']:.2f} |"
            for n, v in r["heldout_cluster"].items()
        ]
    if "pass_at_1" in r:
        p = r["pass_at_1"]
        lines.append("")
        lines.append(f"HumanEval pass@1 (greedy): {p['pass@1']:.3f} ({p['passed']}/{p['problems']} problems)")
        box = r.get("sandbox") or {}
        if box.get("reason"):
            lines.append(f"Sandbox layers NOT in force: {box['reason']}")
    return "\n".join(lines) + "\n"
