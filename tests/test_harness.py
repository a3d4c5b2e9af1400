"""`zoo.eval.harness.ZooLM`: lm-evaluation-harness requests built by hand (no downloads, no lm-eval).

Log-likelihoods equal the model's own log-probabilities (log_softmax of an unpadded forward at the
continuation tokens) for a transformer and Mamba-2 with random weights and the byte tokenizer,
including an empty context, whitespace moved into the continuation and a context truncated on the
left; is_greedy is True exactly when every continuation token is the argmax; the rolling
log-likelihood of a text longer than max_length is the sum over its windows, each written out by
hand; generate_until equals greedy `zoo.generate` cut at the `until` string; a model directory
loads through lm-eval's model_args; bad requests and options are one ValueError each.
"""

import io
import os
import types
from contextlib import redirect_stderr

import jax
import numpy as np
import pytest
from conftest import ROOT
from flax import nnx

import zoo
from zoo.data.tokenizers import ByteTokenizer, HFTokenizer
from zoo.eval import harness
from zoo.eval.harness import ZooLM, parse_arg_string
from zoo.eval.perplexity import _score as score_fn
from zoo.model_dir import save_pretrained

L = 16  # max_length of the adapters under test
TOK = ByteTokenizer()


@nnx.jit
def _forward(model, tokens):
    return model(tokens)


def _direct_logprobs(model, seq) -> tuple[np.ndarray, np.ndarray]:
    """log p(seq[t] | seq[:t]) for t >= 1 and whether seq[t] is the argmax, from one unpadded forward."""
    logits = np.asarray(_forward(model, np.asarray([seq], np.int32))[0], np.float64)  # [T, V]
    logp = logits - jax.scipy.special.logsumexp(logits, -1, keepdims=True)
    t = np.arange(1, len(seq))
    return np.asarray(logp[t - 1, np.asarray(seq)[1:]]), logits[t - 1].argmax(-1) == np.asarray(seq)[1:]


def _request(*args):
    return types.SimpleNamespace(args=args)  # what lm-eval's Instance offers: .args


@pytest.fixture(scope="module", params=["transformer", "mamba2"])
def lm(request):
    model = zoo.create_model(request.param, "tiny", seed=3, n_layers=1)
    return ZooLM(model=model, tokenizer=TOK, max_length=L, batch_size=3)


def test_loglikelihood_is_the_models_own_logprob_of_the_continuation(lm):
    eos = TOK.eos_id
    # Whole sequences of 17 (= L + 1, after truncation) and 12 tokens: two compilations of the oracle.
    cases = [
        ("The cat sat", " on the mat", b"The cat sat", b" on the mat"),  # 22 tokens: truncated on the left
        ("x" * 40 + "long context", " end", None, b" end"),  # truncated to its last 17 tokens
        ("", "start here!", bytes([eos]), b"start here!"),  # empty context: the prefix token
        ("Answers: ", "yes", b"Answers:", b" yes"),  # trailing whitespace moves to the continuation
        ("caf\u00e9 ", "na\u00efve", b"caf\xc3\xa9", " na\u00efve".encode()),  # multi-byte UTF-8
        ("Question: ", "hi", b"Question:", b" hi"),
    ]
    got = lm.loglikelihood([_request(c, x) for c, x, _, _ in cases])
    assert len(got) == len(cases)
    for (ctx, cont, ctx_bytes, cont_bytes), (logprob, is_greedy) in zip(cases, got):
        whole = list(ctx_bytes if ctx_bytes is not None else ctx.encode()) + list(cont_bytes)
        seq = whole[-(L + 1) :]
        lp, greedy = _direct_logprobs(lm.model, seq)
        n = len(cont_bytes)
        assert isinstance(logprob, float) and isinstance(is_greedy, bool)
        np.testing.assert_allclose(logprob, lp[-n:].sum(), rtol=1e-5, atol=2e-4, err_msg=repr((ctx, cont)))
        assert is_greedy == bool(greedy[-n:].all())
    assert got[1][0] != lm.loglikelihood([_request("long context", " end")])[0][0]  # the truncation is real


PROMPTS = ["Hello", "The quick!", "The quick!"]  # zoo.generate compiles once for this batch shape


def _greedy(model, prompts=PROMPTS, n=10):
    out = zoo.generate(model, [TOK.encode(p) for p in prompts], n, eos=TOK.eos_id)
    return out, [TOK.decode([t for t in row if t != TOK.eos_id]) for row in out.rows()]


def test_is_greedy_true_for_the_models_own_argmax_continuation(lm):
    greedy, _ = _greedy(lm.model)
    assert greedy.lengths[0] == 10  # no EOS among the greedy tokens
    ctx = TOK.encode(PROMPTS[0]).tolist()
    cont = greedy.tokens[0][:7].tolist()  # 5 + 7 = 12 tokens
    changed = cont[:2] + [(cont[2] + 1) % 256] + cont[3:]
    (lp_g, is_g), (lp_c, is_c) = lm.loglikelihood_tokens([(ctx, cont), (ctx, changed)])
    assert is_g and not is_c
    lp, greedy_direct = _direct_logprobs(lm.model, ctx + cont)
    assert greedy_direct[-7:].all()
    np.testing.assert_allclose(lp_g, lp[-7:].sum(), rtol=1e-5, atol=2e-4)
    lp, _ = _direct_logprobs(lm.model, ctx + changed)
    np.testing.assert_allclose(lp_c, lp[-7:].sum(), rtol=1e-5, atol=2e-4)


def test_rolling_loglikelihood_sums_every_token_over_windows(lm):
    text = "Rolling windows cover every token once; longer than L."
    s = [TOK.eos_id, *TOK.encode(text).tolist()]  # the prefix token, then the text
    n = len(s)
    assert 3 * L + 1 < n <= 4 * L + 1
    # Windows by hand (L = 16 tokens fed each): targets 1..16 from s[0:16], 17..32 from s[16:32],
    # 33..48 from s[32:48], and the last targets 49..n-1 from the L tokens before the last target.
    windows = [(0, 1, 17), (16, 17, 33), (32, 33, 49), (n - 1 - L, 49, n)]
    expected = 0.0
    for start, lo, hi in windows:
        lp, _ = _direct_logprobs(lm.model, s[start:hi])  # 17 tokens each
        expected += lp[-(hi - lo) :].sum()
    short = "short texts"
    got, got_short = lm.loglikelihood_rolling([_request(text), _request(short)])
    np.testing.assert_allclose(got, expected, rtol=1e-5, atol=5e-4)
    whole, _ = _direct_logprobs(lm.model, [TOK.eos_id, *TOK.encode(short).tolist()])  # 12 tokens
    np.testing.assert_allclose(got_short, whole.sum(), rtol=1e-5, atol=2e-4)  # within one window: the plain sum


def test_generate_until_is_greedy_generate_cut_at_the_stop_string(lm):
    _, texts = _greedy(lm.model)
    stop = texts[1][3:5]  # a string the greedy text contains
    reqs = [
        _request(PROMPTS[0], {"max_gen_toks": 10}),
        _request(PROMPTS[1], {"until": ["\u2603", stop], "max_gen_toks": 10, "do_sample": False}),
        _request(PROMPTS[2], {"until": stop, "max_gen_toks": 10, "temperature": 0.0}),
    ]
    got = lm.generate_until(reqs)
    cut = texts[1][: texts[1].find(stop)]
    assert got == [texts[0], cut, cut]
    assert len(cut) <= 3
    # A context longer than max_length - max_gen_toks keeps its last tokens.
    long = "y" * 30 + "tail"
    (got_long,) = lm.generate_until([_request(long, {"max_gen_toks": 6})])
    _, (ref,) = _greedy(lm.model, [long[-(L - 6) :]], 6)
    assert got_long == ref


def test_sampling_uses_the_requests_seed():
    model = zoo.create_model("transformer", "tiny", seed=3, n_layers=1)
    lm = ZooLM(model=model, tokenizer=TOK, max_length=L, seed=11)
    reqs = [_request("abc", {"do_sample": True, "temperature": 8.0, "max_gen_toks": 8})] * 2
    a, b = lm.generate_until(reqs)
    ref = zoo.generate(model, [TOK.encode("abc")] * 2, 8, temperature=8.0, eos=TOK.eos_id, seed=[11, 12])
    assert [a, b] == [TOK.decode([t for t in row if t != TOK.eos_id]) for row in ref.rows()]
    assert a != b  # one seed per request


def test_a_model_directory_through_lm_eval_model_args(tmp_path):
    model = zoo.create_model("transformer", "tiny", seed=5)
    save_pretrained(model, tmp_path / "m", tokenizer=TOK.spec(), source={"config": {"max_position_embeddings": 20}})
    lm = ZooLM.create_from_arg_string(
        f"pretrained={tmp_path / 'm'},max_gen_toks=4", {"batch_size": "auto", "device": "cuda"}
    )
    assert lm.max_length == 20 and lm.batch_size == harness.DEFAULT_BATCH_SIZE and lm.max_gen_toks == 4
    direct = ZooLM(model=model, tokenizer=TOK, max_length=20)
    req = [_request("context", " continuation")]
    np.testing.assert_allclose(lm.loglikelihood(req)[0][0], direct.loglikelihood(req)[0][0], rtol=1e-6)
    assert parse_arg_string("a=1,b=2.5,c=True,d=x/y") == {"a": 1, "b": 2.5, "c": True, "d": "x/y"}


def test_pairs_split_where_the_contexts_encoding_ends_with_a_subword_tokenizer():
    tok = HFTokenizer(os.path.join(ROOT, "tests", "fixtures", "golden", "tokenizer", "tokenizer.json"))
    model = zoo.create_model("transformer", "tiny", seed=0, n_layers=1, vocab_size=tok.vocab_size)
    lm = ZooLM(model=model, tokenizer=tok, max_length=32)
    for ctx, cont in [("The cat", " sat"), ("Hello,", " world"), ("a b c", " d e")]:
        c, x = lm.encode_pair(ctx, cont)
        assert c + x == tok.encode(ctx + cont).tolist() and c == tok.encode(ctx).tolist()
        assert lm.encode_pair(ctx + " ", cont.lstrip()) == (c, x)  # the context's trailing space moves over
    assert lm.encode_pair("", "hello") == ([tok.eos_id], tok.encode("hello").tolist())


def test_bad_options_and_requests_are_value_errors():
    model = zoo.create_model("transformer", "tiny", seed=0)
    with pytest.raises(ValueError, match="unknown options"):
        ZooLM(model=model, tokenizer=TOK, dtype="bf16")
    with pytest.raises(ValueError, match="exactly one of"):
        ZooLM(tokenizer=TOK)
    with pytest.raises(ValueError, match="no tokenizer"):
        ZooLM(model=model)
    with pytest.raises(ValueError, match="batch_size"):
        ZooLM(model=model, tokenizer=TOK, batch_size=0)
    with pytest.raises(ValueError, match="key=value"):
        parse_arg_string("pretrained")
    lm = ZooLM(model=model, tokenizer=TOK, max_length=8)
    with pytest.raises(ValueError, match="expected \\(context, continuation\\)"):
        lm.loglikelihood([_request("only context")])
    with pytest.raises(ValueError, match="exceeds max_length=8"):
        lm.loglikelihood([_request("a", "b" * 9)])
    with pytest.raises(ValueError, match="empty continuation"):
        lm.loglikelihood([_request("a", "")])
    with pytest.raises(ValueError, match="unsupported gen_kwargs"):
        lm.generate_until([_request("a", {"num_beams": 2})])
    with pytest.raises(ValueError, match="max_gen_toks=8"):
        lm.generate_until([_request("a", {"max_gen_toks": 8})])


def test_lm_eval_registration_or_a_clear_error():
    if harness._register_model is not None:  # lm-eval installed: a registered subclass of its LM
        from lm_eval.api.model import LM
        from lm_eval.api.registry import get_model

        assert issubclass(ZooLM, LM) and get_model("zoo") is ZooLM
    else:
        err = io.StringIO()
        with redirect_stderr(err):
            assert harness.main(["--tasks", "lambada_openai"]) == 2
        assert "lm-eval is not installed" in err.getvalue()
        assert ZooLM.__mro__[1] is object


def test_exact_lengths_for_a_model_that_reads_past_a_position():
    """HiP's search scores a query block with later rows of the block (every row with the tile-max
    scoring), so the tokens after a position (right padding included) can change its log-probs; pad_to_bucket=False
    feeds each row unpadded and gives the model's own (here from the same jitted scoring function on
    the exact row, so one compilation serves both; the function itself is checked above)."""
    # The tile-max scoring: every row of a query block takes part in the search, the pad row included.
    model = zoo.create_model(
        "hip",
        "tiny",
        seed=3,
        n_layers=1,
        dense_below=12,
        block_q=4,
        block_k=4,
        k_blocks=1,
        window=4,
        sinks=1,
        scoring="block_max",
    )
    ctx, cont = "abcdefghijklmnopqrstu", "vwx"  # 24 tokens: 23 fed, padded to 24 in a bucket
    options = dict(model=model, tokenizer=TOK, max_length=24, batch_size=1)
    ((exact, _),) = ZooLM(**options, pad_to_bucket=False).loglikelihood([(ctx, cont)])
    ((padded, _),) = ZooLM(**options).loglikelihood([(ctx, cont)])
    seq = np.asarray([list((ctx + cont).encode())], np.int32)
    lp, _ = score_fn(model, seq[:, :-1], seq[:, 1:])  # [1, 23]
    np.testing.assert_allclose(exact, np.asarray(lp)[0, -3:].sum(), rtol=1e-6)
    assert abs(padded - exact) > 1e-2
