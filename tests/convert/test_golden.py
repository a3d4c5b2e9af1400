"""The converters against the reference implementations: every golden fixture (Llama with llama3
RoPE scaling, Qwen2 with q/k/v biases and tied embeddings from a torch .bin, Mistral with a sliding
window, Hugging Face Mamba-2 with one and two groups, a state-spaces mamba_ssm .bin) converted and
run: full-forward logits (fp32, atol 1e-4), the greedy continuation exactly (`zoo.generate`), the
logits of each of its cached steps, and token-by-token decoding of the prompt and continuation."""

import numpy as np
import pytest
from golden_testing import FIXTURES, converted, decode_all, forward, golden_arrays, golden_dir

from zoo.generate import generate

ATOL = 1e-4


@pytest.mark.parametrize("name", FIXTURES)
def test_logits_greedy_and_decoding_match_the_reference(name):
    model, info = converted(name)
    g = golden_arrays(name)
    ids, n = g["input_ids"], g["greedy_ids"].shape[1]
    np.testing.assert_allclose(np.asarray(forward(model, ids)), g["logits"], atol=ATOL, rtol=0)
    out = generate(model, ids, n, return_logits=True)
    np.testing.assert_array_equal(out.tokens, g["greedy_ids"])
    np.testing.assert_allclose(out.logits, g["decode_logits"], atol=ATOL, rtol=0)
    # One token at a time from an empty cache: the prompt, then the greedy continuation.
    stepped = decode_all(model, np.concatenate([ids, g["greedy_ids"][:, :-1]], 1))
    t = ids.shape[1]
    np.testing.assert_allclose(stepped[:, :t], g["logits"], atol=ATOL, rtol=0)
    np.testing.assert_allclose(stepped[:, t - 1 :], g["decode_logits"], atol=ATOL, rtol=0)
    # every source tensor is accounted for
    report = info["report"]
    assert report["used"] + len(report["ignored"]) == report["tensors"] and not report["initialised"]


def test_the_fixtures_exercise_what_they_should():
    """The configs the fixtures were made to test reach the zoo models."""
    llama = converted("llama")[0].config
    assert (llama.rope_scaling, llama.rope_factor, llama.rope_original_max_position) == ("llama3", 8.0, 128)
    qwen2 = converted("qwen2")[0].config
    assert qwen2.qkv_bias and not qwen2.o_bias and qwen2.tie_embeddings and not qwen2.scale_tied_logits
    assert qwen2.rope_theta == 1e6 and qwen2.norm_eps == 1e-6
    assert converted("qwen2")[1]["report"]["ignored"] == {
        "lm_head.weight": "tied to model.embed_tokens.weight (the config ties the embeddings; equal to it)"
    }
    mistral = converted("mistral")[0].config
    assert mistral.attention == "window" and mistral.window == 8 and mistral.n_kv_heads == 1
    assert not converted("mamba2_hf")[0].config.tie_embeddings
    assert converted("mamba2_hf_g2")[0].config.ngroups == 2
    ss = converted("mamba2_ss")[0].config
    assert ss.vocab_size == 256 and ss.tie_embeddings  # 250 padded to a multiple of 16: the reference's columns


def test_training_free_hip_and_masformer_from_checkpoints():
    """A Llama-family checkpoint converts straight into `hip` and `masformer` (the same parameters):
    HiP below its dense threshold and MASFormer with the source's own pattern reproduce the reference."""
    from zoo.convert.pretrained import import_checkpoint

    hip, info = import_checkpoint(golden_dir("llama"), "hf", "hip", dense_below=64, k_blocks=2, block_q=8, block_k=8)
    assert hip.model_name == "hip" and hip.config.rope_scaling == "llama3" and not info["report"]["initialised"]
    np.testing.assert_allclose(np.asarray(forward(hip, golden_arrays("llama")["input_ids"])),
                               golden_arrays("llama")["logits"], atol=ATOL, rtol=0)  # fmt: skip
    mas, _ = import_checkpoint(golden_dir("mistral"), "hf", "masformer")
    assert [s.kind for s in mas.config.layer_specs()] == ["window", "window"] and mas.config.window == 8
    np.testing.assert_allclose(np.asarray(forward(mas, golden_arrays("mistral")["input_ids"])),
                               golden_arrays("mistral")["logits"], atol=ATOL, rtol=0)  # fmt: skip
