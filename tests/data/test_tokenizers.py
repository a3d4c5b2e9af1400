"""The Tokenizer interface: bytes, SentencePiece and tokenizer.json, their EOS, specs and errors."""

import json
import os

import numpy as np
import pytest
from data_testing import WORDS, train_hf_tokenizer

from zoo.data import tokenizers as tk


def test_bytes_roundtrip_and_eos():
    tok = tk.load_tokenizer("bytes")
    ids = tok.encode("héllo\n")
    assert ids.dtype == np.int32 and list(ids[:2]) == [ord("h"), 0xC3] and tok.decode(ids) == "héllo\n"
    assert tok.encode(b"\x01ab").tolist() == [1, 97, 98]
    assert tok.vocab_size == 256 and tok.eos_id == 0
    assert tk.from_spec(json.loads(json.dumps(tok.spec()))).spec() == tok.spec() == tk.load_tokenizer("").spec()


def test_hf_tokenizer_json(tmp_path):
    texts = [" ".join(np.random.default_rng(i).choice(WORDS, 50)) for i in range(40)]
    path = train_hf_tokenizer(tmp_path / "tokenizer.json", texts)
    tok = tk.load_tokenizer(path)
    assert isinstance(tok, tk.HFTokenizer) and tok.eos_token == "<|endoftext|>"
    assert tok.eos_id == 1 and tok.vocab_size == 300
    ids = tok.encode("gamma delta kappa")
    assert ids.dtype == np.int32 and 0 < len(ids) < len("gamma delta kappa")
    assert tok.decode(ids) == "gamma delta kappa" and tok.eos_id not in ids.tolist()
    assert [x.tolist() for x in tok.encode_batch(["alpha beta", b"zeta"])] == [
        tok.encode("alpha beta").tolist(),
        tok.encode("zeta").tolist(),
    ]
    spec = tok.spec()
    assert spec["kind"] == "hf" and spec["sha256"] == tk.file_sha256(path) and spec["path"] == os.path.abspath(path)
    assert tk.from_spec(spec).encode("alpha beta").tolist() == tok.encode("alpha beta").tolist()
    assert tk.load_tokenizer(str(tmp_path)).spec() == spec  # a directory holding tokenizer.json
    # tokenizer_config.json names the EOS; an explicit eos_token wins over both.
    (tmp_path / "tokenizer_config.json").write_text(json.dumps({"eos_token": {"content": "<unk>"}}))
    assert tk.load_tokenizer(path).eos_id == 0
    assert tk.load_tokenizer(path, eos_token="<|endoftext|>").eos_id == 1
    with pytest.raises(ValueError, match="no end-of-document token"):
        tk.load_tokenizer(path, eos_token="<nope>")
    # The spec pins the file's content.
    with open(path, "a") as f:
        f.write(" ")
    with pytest.raises(ValueError, match="changed since the spec was written"):
        tk.from_spec(spec)


def test_sentencepiece_tokenizer(tmp_path):
    import sentencepiece as spm

    corpus = tmp_path / "c.txt"
    rng = np.random.default_rng(0)
    corpus.write_text("\n".join(" ".join(rng.choice(WORDS, 30)) for _ in range(50)))
    spm.SentencePieceTrainer.train(
        input=str(corpus),
        model_prefix=str(tmp_path / "sp"),
        vocab_size=48,
        model_type="bpe",
        num_threads=1,
        minloglevel=2,
    )
    tok = tk.load_tokenizer(str(tmp_path / "sp.model"))
    assert isinstance(tok, tk.SentencePieceTokenizer) and tok.vocab_size == 48 and tok.eos_id == 2
    ids = tok.encode(b"gamma delta")
    assert ids.dtype == np.int32 and tok.decode(ids) == "gamma delta"
    assert tk.from_spec(tok.spec()).spec() == tok.spec()


def test_tokenizer_errors(tmp_path):
    with pytest.raises(ValueError, match="unknown tokenizer 'gpt9'"):
        tk.load_tokenizer("gpt9")
    with pytest.raises(ValueError, match="does not exist"):
        tk.load_tokenizer(str(tmp_path / "missing.json"))
    (tmp_path / "bad.json").write_text("{}")
    with pytest.raises(ValueError, match="not a Hugging Face tokenizer.json"):
        tk.load_tokenizer(str(tmp_path / "bad.json"))
    (tmp_path / "bad.model").write_bytes(b"\x00\x01garbage")
    with pytest.raises(ValueError, match="not a SentencePiece model"):
        tk.load_tokenizer(str(tmp_path / "bad.model"))
    with pytest.raises(ValueError, match="unknown tokenizer kind"):
        tk.from_spec({"kind": "wordpiece"})
