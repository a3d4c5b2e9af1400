"""`zoo.generate`: batched generation with a parallel prefill and a jitted decode loop.

For every language model (tiny presets): a batch of prompts of different lengths gives each prompt
what it gives alone (tokens and the logits each token was drawn from), and those logits are the
model's own teacher-forced logits of the generated sequence. Greedy generation is the argmax of the
teacher-forced logits; top-k = 1 is greedy; sampling frequencies on fixed logits pass a chi-square
test for temperature, top-k and top-p; EOS stops a row and pads it; bad input is a ValueError. The
parallel prefill of LaCT and S4 into an empty cache leaves the state token-by-token decoding leaves.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import scipy.stats
from lm_testing import decode_step, forward, prefill

import zoo
from zoo.data.tokenizers import ByteTokenizer
from zoo.generate import filtered_logits, generate, generate_text, sample_logits
from zoo.models import registry

LMS = registry.list_models("lm")
N = 5


def _prompts(vocab: int, lengths=(4, 9), seed=0):
    rng = np.random.default_rng(seed)
    return [rng.integers(0, vocab, n).tolist() for n in lengths]


@pytest.mark.parametrize("name", LMS)
def test_mixed_lengths_give_what_each_prompt_gives_alone(name):
    """Sampled (one seed per row), so every step's draw depends on its logits; the long prompt's tail
    is teacher-forced in the batch and prefilled in parallel alone."""
    model = registry.create_model(name, "tiny", seed=1)
    short, long = _prompts(model.config.vocab_size)
    batch = generate(model, [short, long], N, temperature=1.0, seed=[5, 6], return_logits=True)
    alone = generate(model, [long], N, temperature=1.0, seed=[6], return_logits=True)
    np.testing.assert_array_equal(batch.tokens[1], alone.tokens[0])
    np.testing.assert_allclose(batch.logits[1], alone.logits[0], atol=5e-4, rtol=0)
    assert batch.lengths.tolist() == [N, N]


def test_greedy_is_the_argmax_of_teacher_forced_logits_and_top_k_1_is_greedy():
    model = zoo.create_model("transformer", "tiny", seed=2, tie_embeddings=False)
    prompts = _prompts(256, (3, 7, 5), seed=1)
    greedy = generate(model, prompts, 8, return_logits=True)
    for p, row, step_logits in zip(prompts, greedy.tokens, greedy.logits):
        logits = np.asarray(forward(model, np.asarray([p + row[:-1].tolist()], np.int32)))[0, len(p) - 1 :]
        np.testing.assert_array_equal(logits.argmax(-1), row)
        np.testing.assert_allclose(step_logits, logits, atol=1e-4, rtol=0)  # each step's logits, teacher-forced
    assert len({tuple(r) for r in greedy.tokens.tolist()}) == 3  # distinct continuations
    top1 = generate(model, prompts, 8, temperature=1.3, top_k=1, seed=9)
    np.testing.assert_array_equal(top1.tokens, greedy.tokens)


def _expected(logits, temperature, top_k, top_p):
    """The sampling distribution, written out in numpy (HF's order: temperature, top-k, top-p)."""
    x = np.asarray(logits, np.float64) / temperature
    p = np.exp(x - x.max())
    p /= p.sum()
    order = np.argsort(-x, kind="stable")
    keep = np.zeros_like(p, bool)
    keep[order[: top_k or len(x)]] = True
    p = np.where(keep, p, 0)
    p /= p.sum()
    mass = 0.0
    for i in order:  # the most likely tokens until their mass reaches top_p
        if mass >= top_p:
            p[i] = 0
        mass += p[i]
    return p / p.sum()


@pytest.mark.parametrize(
    "temperature,top_k,top_p", [(1.0, 0, 1.0), (0.6, 0, 1.0), (1.5, 3, 1.0), (1.0, 0, 0.7), (0.8, 4, 0.85)]
)
def test_sampling_frequencies_pass_a_chi_square_test(temperature, top_k, top_p):
    logits = jnp.asarray([1.2, -0.3, 0.5, 2.0, 0.0, -1.5, 0.9])
    n = 40_000
    keys = jax.random.split(jax.random.key(0), n)
    draws = jax.jit(jax.vmap(lambda k: sample_logits(k, logits, temperature, top_k, top_p)))(keys)
    counts = np.bincount(np.asarray(draws), minlength=len(logits))
    p = _expected(logits, temperature, top_k, top_p)
    assert counts[p == 0].sum() == 0  # filtered tokens never appear
    kept = p > 0
    _, pvalue = scipy.stats.chisquare(counts[kept], n * p[kept])
    assert pvalue > 1e-3, (counts, n * p)
    np.testing.assert_array_equal(np.isfinite(np.asarray(filtered_logits(logits, temperature, top_k, top_p))), kept)


def test_eos_stops_a_row_and_pads_it():
    model = zoo.create_model("transformer", "tiny", seed=2, tie_embeddings=False)
    prompts = _prompts(256, (3, 7), seed=1)
    free = generate(model, prompts, 8)
    eos = int(free.tokens[0, 2])  # row 0 emits it as its third token
    assert eos not in free.tokens[1, :].tolist()[:1]
    out = generate(model, prompts, 8, eos=eos, pad_id=0)
    assert out.lengths[0] == 3 and out.tokens[0, :3].tolist() == free.tokens[0, :3].tolist()
    assert out.tokens[0, 3:].tolist() == [0] * 5
    stop = free.tokens[1].tolist().index(eos) + 1 if eos in free.tokens[1] else 8
    assert out.lengths[1] == stop and out.rows()[1] == free.tokens[1, :stop].tolist()


def test_bad_input_is_a_value_error():
    model = zoo.create_model("transformer", "tiny")
    for kwargs, match in [
        (dict(prompts=[[1, 2], [256]]), "prompt 1 holds token id 256"),
        (dict(prompts=[[1, -1]]), "token id -1"),
        (dict(prompts=[[]]), "at least one token"),
        (dict(prompts=[[1.5]]), "integer token ids"),
        (dict(prompts=[[1]], max_new_tokens=0), "max_new_tokens"),
        (dict(prompts=[[1]], temperature=-1.0), "temperature"),
        (dict(prompts=[[1]], top_p=0.0), "top_p"),
        (dict(prompts=[[1]], top_k=-2), "top_k"),
        (dict(prompts=[[1]], eos=300), "eos ids"),
        (dict(prompts=[[1], [2]], seed=[1, 2, 3]), "seed has 3 values"),
    ]:
        with pytest.raises(ValueError, match=match):
            generate(model, **{"max_new_tokens": 2, **kwargs})


def test_generate_text_with_a_tokenizer():
    model = zoo.create_model("transformer", "tiny", seed=2, tie_embeddings=False)
    texts = generate_text(model, ByteTokenizer(), ["Hello", "a longer prompt"], 6, eos=None)
    assert len(texts) == 2 and all(isinstance(t, str) for t in texts)
    ids = generate(model, [list(b"Hello"), list(b"a longer prompt")], 6)
    assert texts[0] == ByteTokenizer().decode(ids.tokens[0])


@pytest.mark.parametrize(
    "name,fields,t",
    [
        ("lact", dict(chunk_size=8, window=8), 13),  # a complete chunk, a partial one, a full ring buffer
        ("lact", dict(chunk_size=8, window=8), 16),  # the last chunk complete: it updates the weights
        ("s4", dict(), 13),
        # (S4's prefill into an empty cache is also in every model's protocol test)
        pytest.param("s4", dict(mode="diag", init="lin", disc="zoh"), 16, marks=pytest.mark.slow),
    ],
)
def test_parallel_prefill_leaves_the_decoding_state(name, fields, t):
    """A prompt prefilled in parallel into an empty cache (LaCT: complete and partial chunks, the
    ring buffer; S4: the convolution and the Krylov state) equals decoding it token by token: the
    logits, the state, and the logits of the tokens decoded after it."""
    model = registry.create_model(name, "tiny", seed=3, **fields)
    tokens = jnp.asarray(np.random.default_rng(4).integers(0, model.config.vocab_size, (2, t + 4)), jnp.int32)
    stepped_cache, outs = model.init_cache(2, t + 4), []
    for i in range(t):
        out, stepped_cache = decode_step(model, tokens[:, i], stepped_cache)
        outs.append(out)
    logits, cache = prefill(model, tokens[:, :t], model.init_cache(2, t + 4))
    np.testing.assert_allclose(np.asarray(logits), np.asarray(jnp.stack(outs, 1)), atol=5e-5, rtol=0)
    for a, b in zip(jax.tree.leaves(cache), jax.tree.leaves(stepped_cache)):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), atol=5e-5 * max(1.0, float(np.abs(b).max())), rtol=0)
    for i in range(t, t + 4):
        a, cache = decode_step(model, tokens[:, i], cache)
        b, stepped_cache = decode_step(model, tokens[:, i], stepped_cache)
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), atol=5e-5, rtol=0)
