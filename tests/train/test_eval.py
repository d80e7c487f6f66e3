"""Held-out evaluation on a real prepared corpus (stdlib fixture) and the scoring arithmetic."""

import json
import math

import numpy as np
import pytest
import torch

from train.eval import EvalConfig, score_windows, windows


def test_windows_predict_every_token_once():
    toks = np.arange(10, 30)
    for seq_len in (2, 3, 7, 22, 50):
        ws = windows(toks, seq_len, eos=0)
        targets = [int(ids[j]) for ids, lab in ws for j in range(len(ids)) if lab[j] != -100]
        assert targets == [*toks.tolist(), 0]  # every doc token and the closing EOS, once, in order
        assert all(len(ids) <= seq_len for ids, _ in ws)
    ws = windows(toks, 8, eos=0, score_from=5)
    targets = [int(ids[j]) for ids, lab in ws for j in range(len(ids)) if lab[j] != -100]
    assert targets == [*toks[5:].tolist(), 0]


class _Bigram(torch.nn.Module):
    """Logits depend on the previous token only: the loss has a closed form to compare with."""

    def __init__(self, v=11):
        super().__init__()
        self.table = torch.randn(v, v, generator=torch.Generator().manual_seed(0))

    def forward(self, input_ids, attention_mask=None, use_cache=False):
        return type("O", (), {"logits": self.table[input_ids]})()


def test_score_windows_matches_naive_loss():
    m = _Bigram()
    rng = np.random.default_rng(0)
    docs = [rng.integers(1, 11, size=n) for n in (3, 17, 40)]
    wins = [w for d in docs for w in windows(d, 9, eos=0)]
    nll, n = score_windows(m, wins, batch_size=4, pad=0, device="cpu", progress=False)
    logp = torch.log_softmax(m.table, -1)
    ref, cnt = 0.0, 0
    for d in docs:
        seq = [0, *d.tolist(), 0]
        for a, b in zip(seq[:-1], seq[1:], strict=True):  # bigram: window cuts do not matter
            ref -= float(logp[a, b])
            cnt += 1
    assert n == cnt and math.isclose(nll, ref, rel_tol=1e-5)


def test_sandbox_summary_keeps_a_layer_only_if_every_run_had_it():
    from train.eval import markdown_table, sandbox_summary

    full = {"pid_ns": True, "net_ns": True, "reason": "", "isolation": "auto"}
    less = {"pid_ns": True, "net_ns": False, "reason": "net_ns: EPERM", "isolation": "auto"}
    s = sandbox_summary([full, None, less, full])
    assert s == {"pid_ns": True, "net_ns": False, "reason": "net_ns: EPERM", "isolation": "auto", "runs": 3}
    assert sandbox_summary([]) == {} and sandbox_summary([full])["reason"] == ""
    r = {"heldout": {}, "heldout_overall": {"docs": 1, "tokens": 2, "loss": 1.0, "ppl": 2.7}}
    r |= {"pass_at_1": {"pass@1": 0.0, "passed": 0, "problems": 1}, "sandbox": s}
    assert "Sandbox layers NOT in force: net_ns: EPERM" in markdown_table(r)


@pytest.mark.slow
def test_eval_end_to_end_on_a_tiny_checkpoint(stdlib_prepared, tmp_path, monkeypatch):
    """Train 3 steps on the stdlib corpus, then `grip eval` it: numbers are sane and consistent."""
    import sys

    import yaml

    from train.ablate import ROOT, row_config
    from train.cli import main as grip
    from train.eval import heldout_documents
    from train.main import build_cli

    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(sys, "argv", sys.argv[:1])
    base = yaml.safe_load((ROOT / "configs/ablation/6-grip.yaml").read_text())
    sets = [
        f"data.dataset.init_args.root={stdlib_prepared}",
        "data.dataset.init_args.seq_len=64",
        "model.vocab_size=1024",
        "trainer.max_steps=3",
        "trainer.logger=false",
        "trainer.callbacks.1.init_args.first_refresh_after_steps=1000",
    ]
    cfg = tmp_path / "config.yaml"
    cfg.write_text(yaml.safe_dump(row_config(base, tmp_path, 0, sets, "e")))
    build_cli(["fit", "--config", str(cfg)])
    ckpt = tmp_path / "checkpoints" / "last.ckpt"
    assert ckpt.is_file()
    out = tmp_path / "eval"
    rc = grip(
        ["eval", "--ckpt", str(ckpt), "--data", str(stdlib_prepared), "--out", str(out), "--seq-len", "64"]
        + ["--pass-at-1", "--limit", "2", "--max-new-tokens", "8", "--no-progress"]
    )
    assert rc == 0
    r = json.loads((out / "eval.json").read_text())
    held = heldout_documents(stdlib_prepared)
    assert set(r["heldout"]) == set(held)
    for lang, docs in held.items():
        assert r["heldout"][lang]["tokens"] == sum(len(d) + 1 for d in docs)
    tot = sum(v["tokens"] for v in r["heldout"].values())
    mean = sum(v["loss"] * v["tokens"] for v in r["heldout"].values()) / tot
    assert r["heldout_overall"]["tokens"] == tot and math.isclose(r["heldout_overall"]["loss"], mean)
    for key in ("heldout_overall", "humaneval", "humaneval_solution"):
        assert 0 < r[key]["loss"] < 1.5 * math.log(1024)  # barely trained: near uniform, finite
        assert math.isclose(r[key]["ppl"], math.exp(r[key]["loss"]))
    # per cluster: the same held-out tokens, split by the cluster each document was assigned to
    from grip_loop.manifest import load_manifest

    names = load_manifest(stdlib_prepared).names
    per = r["heldout_cluster"]
    assert set(per) <= set(names) and sum(v["tokens"] for v in per.values()) == tot
    assert math.isclose(sum(v["loss"] * v["tokens"] for v in per.values()) / tot, mean, rel_tol=1e-6)
    assert r["humaneval"]["docs"] == 164 and r["humaneval_solution"]["tokens"] < r["humaneval"]["tokens"]
    assert r["pass_at_1"]["problems"] == 2 and r["pass_at_1"]["pass@1"] == 0.0
    box = r["sandbox"]  # what isolated the 2 test programs
    assert box["runs"] == 2 and box["isolation"] == "auto" and isinstance(box["pid_ns"], bool)
    assert all(json.loads(line)["detail"] for line in (out / "samples.jsonl").read_text().splitlines())
    assert len((out / "samples.jsonl").read_text().splitlines()) == 2
    assert (out / "hf" / "config.json").is_file() and "| held-out overall |" in (out / "eval.md").read_text()
    with pytest.raises(ValueError, match="seq_len"):
        EvalConfig(seq_len=1)

    probe_cli_checks(ckpt, out / "hf", stdlib_prepared, tmp_path)


def probe_cli_checks(ckpt, hf, prepared, tmp_path):
    """`grip probe` on the same checkpoint (Lightning file and HF folder): table, JSON schema, errors."""
    from grip_loop.manifest import load_manifest
    from train.cli import main as grip

    m = load_manifest(prepared)
    fast = ["--seq-len", "64", "--docs", "8", "--set", "rap.min_docs=2", "--set", "rap.epochs=1"]
    results = []
    for src in (ckpt, hf):
        out = tmp_path / f"probe-{src.name}.json"
        assert grip(["probe", "--ckpt", str(src), "--data", str(prepared), "--json", str(out), *fast]) == 0
        results.append(json.loads(out.read_text()))
    doc = results[0]
    assert set(doc) >= {"reliability", "clusters"}
    keys = {
        "id",
        "name",
        "size",
        "quality",
        "loss_init",
        "loss_final",
        "delta",
        "delta_abs",
        "r",
        "n_before",
        "n_after",
    }
    assert [c["id"] for c in doc["clusters"]] == list(range(m.k))
    for c, info in zip(doc["clusters"], m.clusters, strict=True):
        assert keys <= set(c) and c["name"] == info.label and c["size"] == info.n_docs
        if c["delta"] is not None:  # the value Eq. 7 used: the relative drop by default
            assert math.isclose(c["delta"], c["delta_rel"]) and 1.0 <= c["r"] <= 3.0
    b = sum(m.sizes)
    assert sum(c["n_before"] for c in doc["clusters"]) == b == sum(c["n_after"] for c in doc["clusters"])
    # the exported HF folder is the same model: the same probe
    for a, z in zip(doc["clusters"], results[1]["clusters"], strict=True):
        assert (a["loss_final"] is None) == (z["loss_final"] is None)
        if a["loss_final"] is not None:
            assert math.isclose(a["loss_final"], z["loss_final"], rel_tol=1e-4)
    # user errors: one clear line and exit status 2
    assert grip(["probe", "--ckpt", str(ckpt), "--data", str(prepared), "--set", "rap.nope=1"]) == 2
    assert grip(["probe", "--ckpt", str(tmp_path / "missing.ckpt"), "--data", str(prepared)]) == 2
