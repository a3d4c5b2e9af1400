"""Golden fixtures of the attention checkpoints: Llama, Qwen2 and Mistral in the Hugging Face format."""

from __future__ import annotations

import math

import numpy as np
import torch
from transformers import (
    LlamaConfig,
    LlamaForCausalLM,
    MistralConfig,
    MistralForCausalLM,
    Qwen2Config,
    Qwen2ForCausalLM,
)

from golden.common import SEQ_LEN, _effect, _finish_hf, _random_rows, _randomize

_LLAMA_KEYS = (
    "model.embed_tokens.weight [V,D]; model.layers.{i}.input_layernorm.weight [D]; "
    "model.layers.{i}.self_attn.{q,k,v,o}_proj.weight (q [H*hd,D], k/v [KV*hd,D], o [D,H*hd]); "
    "model.layers.{i}.post_attention_layernorm.weight [D]; model.layers.{i}.mlp.{gate,up,down}_proj.weight "
    "(gate/up [F,D], down [D,F]); model.norm.weight [D]; lm_head.weight [V,D] (absent when tied). "
    "All Linear weights are torch [out, in]: y = x @ W.T (transpose for a JAX [in, out] kernel)."
)


_ATTENTION_SEMANTICS = (
    "pre-norm blocks: h += attn(rms(h)); h += mlp(rms(h)); logits = rms_f(h) @ lm_head.T. "
    "RMSNorm: x * rsqrt(mean(x^2) + eps) * w (weight multiplies after normalising, no 1+w offset). "
    "MLP: down(silu(gate(x)) * up(x)). Attention: q/k/v reshaped [T, heads, hd] head-major (head h = output "
    "rows h*hd:(h+1)*hd); GQA: query head h uses kv head h // (H/KV); scores scaled by hd**-0.5; causal. "
    "RoPE is HF's rotate_half (non-interleaved) layout: for pair index j < hd/2, dims (j, j + hd/2) rotate by "
    "angle pos * inv_freq[j]; inv_freq[j] = theta ** (-2j/hd); positions start at 0 for the first input token."
)


def make_llama(out_dir: str) -> dict:
    """Llama with GQA, untied embeddings and llama3 RoPE scaling whose three frequency bands all occur."""
    rope = {
        "rope_type": "llama3",
        "rope_theta": 10000.0,
        "factor": 8.0,
        "low_freq_factor": 1.0,
        "high_freq_factor": 4.0,
        "original_max_position_embeddings": 128,
    }
    config = LlamaConfig(
        vocab_size=300,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=1024,
        rms_norm_eps=1e-5,
        rope_parameters=rope,
        tie_word_embeddings=False,
        attn_implementation="eager",
    )
    torch.manual_seed(1)
    model = LlamaForCausalLM(config)
    _randomize(model, seed=101)
    ids = _random_rows(seed=201, vocab=config.vocab_size, length=SEQ_LEN)
    head_dim = config.hidden_size // config.num_attention_heads
    inv = 1.0 / rope["rope_theta"] ** (np.arange(0, head_dim, 2) / head_dim)
    wavelen = 2 * math.pi / inv
    notes = {
        "keys": _LLAMA_KEYS,
        "semantics": _ATTENTION_SEMANTICS,
        "rope_llama3": (
            "HF 5.x writes the RoPE settings as config['rope_parameters'] (with rope_theta inside); released "
            "Llama 3.x config.json files have the legacy top-level 'rope_theta' and 'rope_scaling' "
            "{'rope_type': 'llama3', 'factor', 'low_freq_factor', 'high_freq_factor', "
            "'original_max_position_embeddings'} instead. inv_freq = theta**(-2j/hd); wavelen = 2*pi/inv_freq; "
            "low = orig/low_freq_factor, high = orig/high_freq_factor; wavelen < high: unchanged; wavelen > low: "
            "inv_freq/factor; otherwise s = (orig/wavelen - low_freq_factor)/(high_freq_factor - low_freq_factor), "
            "inv_freq = (1-s)*inv_freq/factor + s*inv_freq. No attention scaling factor."
        ),
        "rope_bands_here": {
            "wavelengths": [round(float(x), 3) for x in wavelen],
            "high_freq_wavelen": 128 / 4.0,
            "low_freq_wavelen": 128 / 1.0,
            "bands": ["unchanged" if x < 32 else "divided by factor" if x > 128 else "smoothed" for x in wavelen],
        },
    }
    seeds = {"torch.manual_seed": 1, "parameters": 101, "input_ids": 201}
    effect = _effect(model, ids, rope_parameters={"rope_type": "default", "rope_theta": rope["rope_theta"]})
    assert effect[0] == 0.0 and effect[1:].min() > 1e-2, effect
    notes["check_rope_scaling_matters"] = (
        f"the same weights with plain RoPE change the logits by up to {effect.max():.3g} (>= {effect[1:].min():.3g} "
        "at every position > 0; position 0 is unrotated)"
    )
    return _finish_hf("llama", out_dir, model, LlamaForCausalLM, ids, "hf-safetensors", notes, seeds)


# make_llama, make_qwen2 and make_mistral share their outline (config, randomize, checks, finish):
# each family's config, checks and notes differ, and the fixtures are committed byte for byte, so the
# builders stay written out.
def make_qwen2(out_dir: str) -> dict:
    """Qwen2: q/k/v biases, tied embeddings, rope_theta 1e6; saved as pytorch_model.bin."""
    config = Qwen2Config(
        vocab_size=256,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=512,
        rms_norm_eps=1e-6,
        rope_parameters={"rope_type": "default", "rope_theta": 1000000.0},
        tie_word_embeddings=True,
        use_sliding_window=False,
        attn_implementation="eager",
    )
    torch.manual_seed(2)
    model = Qwen2ForCausalLM(config)
    _randomize(model, seed=102)
    ids = _random_rows(seed=202, vocab=config.vocab_size, length=SEQ_LEN)
    notes = {
        "keys": _LLAMA_KEYS
        + " Qwen2 adds model.layers.{i}.self_attn.{q,k,v}_proj.bias ([H*hd], [KV*hd], [KV*hd]); o_proj has no bias.",
        "semantics": _ATTENTION_SEMANTICS,
        "tied": (
            "tie_word_embeddings=true: logits = h @ model.embed_tokens.weight.T. This .bin is torch.save("
            "model.state_dict()), which keeps both 'model.embed_tokens.weight' and 'lm_head.weight' (one shared "
            "storage in the zip); HF safetensors files of tied models omit lm_head.weight."
        ),
        "bin_format": (
            "pytorch_model.bin is a torch zip archive: '<stem>/data.pkl' (pickle protocol 2 of an OrderedDict; "
            "tensors are persistent ids ('storage', torch.FloatStorage, '<key>', 'cpu', numel) rebuilt by "
            "torch._utils._rebuild_tensor_v2(storage, offset, size, stride, requires_grad, hooks)), raw "
            "little-endian data in '<stem>/data/<key>', '<stem>/byteorder'; <stem> = 'pytorch_model'."
        ),
    }
    seeds = {"torch.manual_seed": 2, "parameters": 102, "input_ids": 202}
    return _finish_hf("qwen2", out_dir, model, Qwen2ForCausalLM, ids, "hf-pytorch-bin", notes, seeds)


def make_mistral(out_dir: str) -> dict:
    """Mistral with a sliding window of 8 on a 24-token input (and 8 decoded tokens), MQA (1 kv head)."""
    config = MistralConfig(
        vocab_size=288,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=1,
        max_position_embeddings=512,
        rms_norm_eps=1e-5,
        rope_parameters={"rope_type": "default", "rope_theta": 10000.0},
        sliding_window=8,
        tie_word_embeddings=False,
        attn_implementation="eager",
    )
    torch.manual_seed(3)
    model = MistralForCausalLM(config)
    _randomize(model, seed=103)
    ids = _random_rows(seed=203, vocab=config.vocab_size, length=SEQ_LEN)
    notes = {
        "keys": _LLAMA_KEYS,
        "semantics": _ATTENTION_SEMANTICS,
        "sliding_window": (
            "HF mask: query i sees key j iff j <= i and j > i - W (masking_utils.sliding_window_overlay), i.e. "
            "the W most recent keys including the query's own: positions i-W+1 .. i. W = 8 here, so from "
            "position 7 on each query sees exactly 8 keys. Every layer uses the window. The decode cache "
            "(DynamicSlidingWindowLayer) keeps the last W-1 keys and appends the new one: same semantics."
        ),
    }
    seeds = {"torch.manual_seed": 3, "parameters": 103, "input_ids": 203}
    effect = _effect(model, ids, sliding_window=None)
    window = config.sliding_window
    assert effect[:window].max() == 0.0 and effect[window:].min() > 1e-2, effect
    notes["check_window_matters"] = (
        f"the same weights with full causal attention give identical logits at positions 0..{window - 1} and "
        f"differ by >= {effect[window:].min():.3g} at every position >= {window}"
    )
    return _finish_hf("mistral", out_dir, model, MistralForCausalLM, ids, "hf-safetensors", notes, seeds)
