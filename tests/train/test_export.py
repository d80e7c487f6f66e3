"""`grip export-hf` writes a folder that Hugging Face's Auto* classes load whole: the model and
the prepared tokenizer (EOS, pad), so vLLM / lm-eval-harness can use it."""

from __future__ import annotations

import json

import pytest
import torch

from grip_loop.manifest import load_manifest
from tests.train.test_module import TINY
from train.eval import load_tokenizer
from train.module import MoELM

TEXT = 'def greet(name):\n    return f"hello {name}"\n'


def _checkpoint(path, vocab: int, corpus=None):
    """A Lightning checkpoint of a tiny MoELM, as ModelCheckpoint writes it; with `corpus`, the
    GripCallback state that names the prepared corpus the run read."""
    m = MoELM(model="tiny", vocab_size=vocab, model_overrides=TINY, seed=0)
    state = {"hyper_parameters": dict(m.hparams), "state_dict": m.state_dict(), "callbacks": {}}
    if corpus is not None:
        state["callbacks"]["GripCallback{'mode': 'grip'}"] = {"corpus_root": str(corpus), "mode": "grip"}
    torch.save(state, path)
    return m


@pytest.mark.slow
def test_export_round_trips_through_auto_classes(stdlib_prepared, tmp_path):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from train.cmd_export import main as export_main

    vocab = load_manifest(stdlib_prepared).tokenizer["vocab_size"]
    m = _checkpoint(tmp_path / "last.ckpt", vocab, corpus=stdlib_prepared)
    # no --data: the tokenizer of the corpus the checkpoint was trained on
    assert export_main([str(tmp_path / "last.ckpt"), str(tmp_path / "hf")]) == 0
    prepared, eos = load_tokenizer(stdlib_prepared)
    tok = AutoTokenizer.from_pretrained(tmp_path / "hf")
    assert len(tok) == prepared.get_vocab_size() and tok.eos_token == "<|endoftext|>"
    assert tok.eos_token_id == eos and tok.pad_token_id == eos
    ids = tok(TEXT, add_special_tokens=False)["input_ids"]
    assert ids == prepared.encode(TEXT, add_special_tokens=False).ids  # the ids the model trained on
    assert tok.decode(ids) == TEXT
    model = AutoModelForCausalLM.from_pretrained(tmp_path / "hf").eval()
    assert model.generation_config.eos_token_id == eos
    x = torch.tensor([[eos, *ids]])
    with torch.no_grad():
        torch.testing.assert_close(model(input_ids=x).logits, m.model.eval()(input_ids=x).logits)
        out = model.generate(x, attention_mask=torch.ones_like(x), max_new_tokens=6, do_sample=False)
    new = out[0, x.shape[1] :].tolist()
    assert 1 <= len(new) <= 6 and all(0 <= t < vocab for t in new)
    # greedy: the first new token is the argmax of the last position's logits
    assert new[0] == int(m.model(input_ids=x).logits[0, -1].argmax())
    assert isinstance(tok.decode(new, skip_special_tokens=True), str)
    cfg = json.loads((tmp_path / "hf" / "tokenizer_config.json").read_text())
    assert cfg["eos_token"] == "<|endoftext|>"
    # byte for byte the prepared file: `grip probe` and a GripCallback proxy check its sha256
    from train.cmd_export import tokenizer_file

    assert (tmp_path / "hf" / "tokenizer.json").read_bytes() == tokenizer_file(stdlib_prepared).read_bytes()


def test_export_without_a_corpus_says_how_to_add_the_tokenizer(tmp_path, capsys):
    from train.cmd_export import main as export_main

    _checkpoint(tmp_path / "last.ckpt", 512)
    assert export_main([str(tmp_path / "last.ckpt"), str(tmp_path / "hf")]) == 0
    err = capsys.readouterr().out
    assert "no tokenizer" in err and "--data" in err
    assert not (tmp_path / "hf" / "tokenizer.json").exists()
