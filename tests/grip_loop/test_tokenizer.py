import numpy as np
import pytest

from grip_loop.tokenizer import EOS_TOKEN, encode, eos_id, load_tokenizer, train_tokenizer

TEXTS = [f"def f{i}(x):\n    return x * {i} + {i * i}  # café ü\n" for i in range(200)]


def test_trained_bpe_roundtrips_any_bytes_and_has_eos(tmp_path):
    tok = train_tokenizer(TEXTS, vocab_size=400)
    assert tok.get_vocab_size() <= 400
    assert eos_id(tok) == tok.token_to_id(EOS_TOKEN) == 0
    weird = "λ → 🙂 \t\r\n\x01 unseen"
    assert tok.decode(tok.encode(weird).ids) == weird  # byte-level: nothing is unknown
    tok.save(str(tmp_path / "tokenizer.json"))
    again = load_tokenizer(tmp_path)
    ids = encode(again, TEXTS[:5] + [weird])
    assert [a.tolist() for a in ids] == [tok.encode(t).ids for t in TEXTS[:5] + [weird]]
    assert all(a.dtype == np.uint32 for a in ids)
    assert EOS_TOKEN not in tok.decode(ids[0].tolist(), skip_special_tokens=False)  # lengths exclude EOS


def test_training_is_deterministic():
    a = train_tokenizer(TEXTS, vocab_size=400)
    b = train_tokenizer(TEXTS, vocab_size=400)
    assert a.to_str() == b.to_str()


def test_bad_tokenizer_file_names_it(tmp_path):
    (tmp_path / "tokenizer.json").write_text("{oops")
    with pytest.raises(ValueError, match="tokenizer.json"):
        load_tokenizer(tmp_path)
    with pytest.raises(ValueError, match="not found"):
        load_tokenizer(tmp_path / "nope.json")
