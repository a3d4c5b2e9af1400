"""`zoo.eval.perplexity`: the strided sliding-window evaluation scores every token exactly once with
the context the definition gives it (checked token by token against a direct computation on a tiny
model), equals the plain perplexity when the window covers the text, and its command line prints
the same numbers for a model directory."""

import io
import json
import math
from contextlib import redirect_stderr, redirect_stdout

import numpy as np
import pytest
from flax import nnx

import zoo
from zoo.data.tokenizers import ByteTokenizer
from zoo.eval import perplexity as ppl
from zoo.model_dir import save_pretrained

W = 8


@nnx.jit
def _forward(model, tokens):
    return model(tokens)


def _logp(logits) -> np.ndarray:
    x = np.asarray(logits, np.float64)
    return x - np.log(np.exp(x - x.max(-1, keepdims=True)).sum(-1, keepdims=True)) - x.max(-1, keepdims=True)


@pytest.fixture(scope="module")
def model():
    return zoo.create_model("transformer", "tiny", seed=4, n_layers=1)


def _context_start(t: int, n: int, window: int, stride: int) -> int:
    """Where the context of target t begins, from the definition: targets 1, 2, ... are cut into
    blocks of `stride`; a block's forward is the `window` tokens ending just before its last target."""
    block_end = min(1 + ((t - 1) // stride + 1) * stride, n)  # one past the block's last target
    return max(0, block_end - 1 - window)


@pytest.mark.parametrize("stride", [1, 3, W])
def test_strided_scores_each_token_once_with_its_defined_context(model, stride):
    s = np.random.default_rng(0).integers(1, 256, 29)
    n = len(s)
    (got,), (greedy,) = ppl.strided_logprobs(model, [s], W, stride, batch_size=4)
    assert got.shape == (n - 1,) and greedy.shape == (n - 1,)
    # Token by token: target t alone, fed exactly s[start:t] (padded to one shape only at the end,
    # after the fed tokens, so one compilation serves every target).
    rows = np.zeros((n - 1, W), np.int32)
    for t in range(1, n):
        a = _context_start(t, n, W, stride)
        assert W - stride + 1 <= t - a <= W or a == 0  # the context the docstring promises
        rows[t - 1, : t - a] = s[a:t]
    lp = _logp(_forward(model, rows))  # [n - 1, W, V]
    want = np.asarray([lp[t - 1, t - _context_start(t, n, W, stride) - 1, s[t]] for t in range(1, n)])
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=2e-5)
    result = ppl.perplexity(model, s, W, stride, batch_size=4)
    assert result["tokens"] == n - 1 and result["forwards"] == math.ceil((n - 1) / stride)
    np.testing.assert_allclose(result["perplexity"], np.exp(-want.mean()), rtol=1e-5)


def test_full_window_is_the_plain_perplexity(model):
    s = np.random.default_rng(1).integers(1, 256, 20)
    lp = _logp(_forward(model, s[None, :-1].astype(np.int32)))[0]  # [19, V] one forward over the text
    plain = math.exp(-lp[np.arange(19), s[1:]].mean())
    for window, stride in [(20, 20), (19, 19), (32, 7)]:
        result = ppl.perplexity(model, s, window, stride)
        np.testing.assert_allclose(result["perplexity"], plain, rtol=1e-5, err_msg=f"{window=} {stride=}")
    assert abs(ppl.perplexity(model, s, 4, 4)["perplexity"] - plain) > 1e-3  # short windows differ


def test_blocks_cover_every_target_once_and_errors():
    for n, window, stride in [(2, 1, 1), (50, 8, 3), (50, 8, 8), (9, 8, 8), (100, 16, 1)]:
        blocks = ppl.strided_blocks(n, window, stride)
        targets = [t for b in blocks for t in range(b.lo, b.hi)]
        assert targets == list(range(1, n))
        assert all(b.hi - 1 - b.start <= window and b.start < b.lo for b in blocks)
    with pytest.raises(ValueError, match="stride=9 exceeds window=8"):
        ppl.strided_blocks(10, 8, 9)
    with pytest.raises(ValueError, match="window=0"):
        ppl.strided_blocks(10, 0, 1)
    with pytest.raises(ValueError, match="at least one scored token"):
        ppl.perplexity(None, [5], 8)


def test_command_line_on_a_model_directory(model, tmp_path):
    tok = ByteTokenizer()
    save_pretrained(model, tmp_path / "m", tokenizer=tok.spec())
    text = "Held-out text: every byte is scored once, the first after the EOS.\n"
    (tmp_path / "t.txt").write_text(text)
    out = io.StringIO()
    with redirect_stdout(out):
        argv = ["--pretrained", str(tmp_path / "m"), "--text", str(tmp_path / "t.txt"), "--window", "16", "--json"]
        assert ppl.main([*argv, "--stride", "8"]) == 0
    got = json.loads(out.getvalue())
    want = ppl.text_perplexity(model, tok, text, 16, 8)
    assert got["tokens"] == got["bytes"] == len(text)  # bytes: one token per byte, all scored
    np.testing.assert_allclose(got["perplexity"], want["perplexity"], rtol=1e-6)
    np.testing.assert_allclose(got["bits_per_byte"], got["nll"] / math.log(2), rtol=1e-9)
    err = io.StringIO()
    with redirect_stderr(err):
        assert (
            ppl.main(["--pretrained", str(tmp_path / "m"), "--text", str(tmp_path / "none.txt"), "--window", "8"]) == 2
        )
    assert "perplexity: error:" in err.getvalue()
