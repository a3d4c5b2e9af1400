"""Export to Hugging Face: the exported files of every golden fixture hold the fixture's own tensors
(names, shapes and values, bitwise) and config, import -> export -> import is bitwise, and models the
zoo trained itself export to a function-equal Hugging Face model."""

import json
import os

import numpy as np
import pytest
from golden_testing import FIXTURES, converted, forward, golden_dir, manifest

import zoo
from zoo.convert.pretrained import export_hf, import_checkpoint
from zoo.convert.sources import read_safetensors, read_weights
from zoo.model_dir import save_pretrained
from zoo.models.params import ParamView

# config.json keys whose values must survive the round trip (all the computation depends on)
KEYS = {
    "llama": "architectures model_type vocab_size hidden_size intermediate_size num_hidden_layers num_attention_heads "
    "num_key_value_heads head_dim rms_norm_eps tie_word_embeddings attention_bias",
    "mamba2": "architectures model_type vocab_size hidden_size num_hidden_layers state_size conv_kernel expand "
    "head_dim num_heads n_groups chunk_size layer_norm_epsilon use_bias use_conv_bias tie_word_embeddings",
}
KEYS["qwen2"] = KEYS["llama"].replace(" attention_bias", "")
KEYS["mistral"] = KEYS["qwen2"] + " sliding_window"


def _rope(config: dict) -> dict:
    """The RoPE settings of a config in either spelling (transformers 5's rope_parameters or 4's)."""
    params = dict(config.get("rope_parameters") or config.get("rope_scaling") or {})
    params.setdefault("rope_theta", config.get("rope_theta"))
    params.setdefault("rope_type", params.pop("type", "default"))
    return {
        k: v
        for k, v in params.items()
        if k
        in (
            "rope_theta",
            "rope_type",
            "factor",
            "low_freq_factor",
            "high_freq_factor",
            "original_max_position_embeddings",
        )
    }


def _params(model) -> dict:
    return {k: np.asarray(v) for k, v in ParamView(model).flat(model).items()}


@pytest.mark.parametrize("name", FIXTURES)
def test_export_reproduces_the_fixture_and_round_trips_bitwise(name, tmp_path):
    model, _ = converted(name)
    out = tmp_path / "hf"
    export_hf(None, str(out), model=model, meta={"source": {"config": {}}})
    exported = read_safetensors(out / "model.safetensors")
    source = read_weights(golden_dir(name))
    if FIXTURES[name] == "mamba_ssm":  # Hugging Face's names; the tied head is not stored
        source = {k.replace("backbone.embedding.", "backbone.embeddings."): v for k, v in source.items()}
    if model.config.tie_embeddings:
        source.pop("lm_head.weight", None)
    assert sorted(exported) == sorted(source)
    for key, value in source.items():
        assert exported[key].dtype == np.float32 and exported[key].shape == value.shape, key
        np.testing.assert_array_equal(exported[key], value, err_msg=key)
    with open(out / "config.json") as f:
        config = json.load(f)
    fixture = manifest()["fixtures"][name]
    reference = fixture.get("hf_equivalent_config", fixture["config"])
    family = reference["model_type"]
    defaults = {
        "attention_bias": False,
        "architectures": ["Mamba2ForCausalLM"],
        "head_dim": reference.get("hidden_size", 0) // reference.get("num_attention_heads", 1),
    }
    for key in KEYS[family].split():
        assert config[key] == reference.get(key, defaults.get(key)), key
    if family != "mamba2":
        assert _rope(config) == _rope(reference)
    else:
        assert "time_step_limit" not in config  # transformers' default (0, inf), the fixtures' value
    # import -> export -> import: the same parameters, bitwise
    again, info = import_checkpoint(str(out), "hf")
    assert info["report"]["ignored"] == {} and again.config == model.config  # (HF 4's config spelling)
    first, second = _params(model), _params(again)
    assert sorted(first) == sorted(second)
    for k in first:
        np.testing.assert_array_equal(second[k], first[k], err_msg=k)


def test_bfloat16_export_and_import(tmp_path):
    model, _ = converted("llama")
    export_hf(None, str(tmp_path), model=model, meta={}, dtype="bfloat16")
    tensors = read_safetensors(tmp_path / "model.safetensors")
    assert {a.dtype.name for a in tensors.values()} == {"bfloat16"}
    again, _ = import_checkpoint(str(tmp_path), "hf")
    for k, v in _params(model).items():
        np.testing.assert_array_equal(
            _params(again)[k], v.astype(tensors["model.norm.weight"].dtype).astype(np.float32)
        )


@pytest.mark.parametrize(
    "fields,arch",
    [
        (dict(), "LlamaForCausalLM"),
        (dict(layer_attention=("window", "full"), window=4, n_kv_heads=2), "Qwen2ForCausalLM"),
        pytest.param(
            dict(attention="window", window=4, tie_embeddings=False), "MistralForCausalLM", marks=pytest.mark.slow
        ),
        pytest.param(
            dict(o_bias=True, rope_scaling="yarn", rope_factor=4.0, rope_original_max_position=8),
            "LlamaForCausalLM",
            marks=pytest.mark.slow,
        ),
    ],
)
def test_a_zoo_trained_transformer_exports_to_the_same_function(fields, arch, tmp_path):
    """The zoo's own tied head scales its logits by d_model^-0.5, which Hugging Face cannot: the export
    unties it (lm_head = the scaled embedding); biases the architecture needs export as zeros. (Every
    case is also loaded in transformers by scripts/check_export_in_transformers.py, docs/pretrained.md.)"""
    tokens = np.arange(30, dtype=np.int32).reshape(2, 15) * 7 % 256
    model = zoo.create_model("transformer", "tiny", seed=1, d_model=32, n_heads=4, d_ff=64, **fields)
    save_pretrained(model, str(tmp_path / "zoo"))
    result = export_hf(str(tmp_path / "zoo"), str(tmp_path / "hf"))
    assert result["config"]["architectures"] == [arch]
    again, _ = import_checkpoint(str(tmp_path / "hf"), "hf")
    np.testing.assert_allclose(
        np.asarray(forward(again, tokens)), np.asarray(forward(model, tokens)), atol=2e-5, rtol=0
    )


def test_export_refuses_what_transformers_cannot_express(tmp_path):
    hip = zoo.create_model("hip", "tiny", d_model=32, n_heads=4, d_ff=64)
    with pytest.raises(ValueError, match="no Hugging Face architecture"):
        export_hf(None, str(tmp_path / "a"), model=hip, meta={})
    block = zoo.create_model("transformer", "tiny", d_model=32, n_heads=4, d_ff=64, attention="block", block=4)
    with pytest.raises(ValueError, match="block-local"):
        export_hf(None, str(tmp_path / "b"), model=block, meta={})
    mamba = zoo.create_model("mamba2", "tiny", window=8)
    with pytest.raises(ValueError, match="Stuffed-Mamba"):
        export_hf(None, str(tmp_path / "c"), model=mamba, meta={})
    with pytest.raises(ValueError, match="export dtype"):
        export_hf(None, str(tmp_path / "d"), model=zoo.create_model("mamba2", "tiny"), meta={}, dtype="int8")
    assert not os.path.exists(tmp_path / "a")
