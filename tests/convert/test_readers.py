"""Reading checkpoints without torch: the torch zip reader against `torch.load`'s own output for every
storage layout, its refusal of pickles that are not state dicts, the safetensors reader/writer
(bfloat16 included, interoperable with `safetensors.numpy`), sharded checkpoints, config.json quirks,
and one clear error naming the key for a missing, misshapen, non-float or unknown tensor."""

import json
import os
import pickle
import shutil
import zipfile

import ml_dtypes
import numpy as np
import pytest
from golden_testing import golden_dir

from zoo.convert.pretrained import import_checkpoint
from zoo.convert.sources import (
    SourceWeights,
    read_config,
    read_safetensors,
    read_weights,
    weight_files,
    write_safetensors,
)
from zoo.convert.torch_bin import read_torch_bin

FIXTURES = os.path.join(os.path.dirname(__file__), "fixtures")


def test_torch_bin_layouts_equal_torch_load():
    """bf16/fp16/int64 storages, a transposed view, a slice at a storage offset, a Parameter, a 0-d
    tensor: the arrays equal what torch.load returned when the fixture was written."""
    got = read_torch_bin(os.path.join(FIXTURES, "torch_layouts.bin"))
    with np.load(os.path.join(FIXTURES, "torch_layouts.npz")) as z:
        want = {k: z[k] for k in z.files}
    assert sorted(got) == sorted(k.removesuffix(".bf16bits") for k in want)
    for key, value in want.items():
        if key.endswith(".bf16bits"):
            a = got[key.removesuffix(".bf16bits")]
            assert a.dtype == ml_dtypes.bfloat16
            np.testing.assert_array_equal(a.view(np.uint16), value)
        else:
            assert got[key].dtype == value.dtype and got[key].shape == value.shape, key
            np.testing.assert_array_equal(got[key], value)


def test_torch_bin_refuses_code_and_other_formats(tmp_path):
    class Payload:
        def __reduce__(self):
            return (print, ("this must not run",))

    evil = tmp_path / "evil.bin"
    with zipfile.ZipFile(evil, "w") as z:
        z.writestr("archive/data.pkl", pickle.dumps({"w": Payload()}, protocol=2))
    with pytest.raises(ValueError, match="refers to __builtin__.print"):
        read_torch_bin(evil)
    legacy = tmp_path / "legacy.bin"
    legacy.write_bytes(pickle.dumps({"w": 1}))
    with pytest.raises(ValueError, match="not a torch zip checkpoint"):
        read_torch_bin(legacy)


def test_safetensors_reader_and_writer(tmp_path):
    from safetensors.numpy import load_file, save_file

    rng = np.random.default_rng(0)
    tensors = {
        "a": rng.normal(size=(3, 5)).astype(np.float32),
        "b": rng.normal(size=(7,)).astype(ml_dtypes.bfloat16),
        "c": rng.normal(size=(2, 2, 2)).astype(np.float16),
    }
    write_safetensors(tmp_path / "x.safetensors", tensors, {"format": "pt"})
    back = read_safetensors(tmp_path / "x.safetensors")
    for k, v in tensors.items():
        assert back[k].dtype == v.dtype
        np.testing.assert_array_equal(back[k], v)
    # interoperable with the safetensors package both ways (it has no bfloat16)
    plain = {k: v for k, v in tensors.items() if k != "b"}
    write_safetensors(tmp_path / "y.safetensors", plain)
    for k, v in load_file(str(tmp_path / "y.safetensors")).items():
        np.testing.assert_array_equal(v, plain[k])
    save_file(plain, str(tmp_path / "z.safetensors"))
    for k, v in read_safetensors(tmp_path / "z.safetensors").items():
        np.testing.assert_array_equal(v, plain[k])
    (tmp_path / "bad.safetensors").write_bytes(b"\x05\x00\x00\x00\x00\x00\x00\x00{oops")
    with pytest.raises(ValueError, match="header is not JSON"):
        read_safetensors(tmp_path / "bad.safetensors")


def test_sharded_checkpoint_and_config_quirks(tmp_path):
    """A sharded index (model.safetensors.index.json) reads like the single file; transformers 5's
    {"__float__": "Infinity"} and older configs' bare Infinity both decode."""
    tensors = read_weights(golden_dir("llama"))
    names = sorted(tensors)
    shards = {"model-00001-of-00002.safetensors": names[::2], "model-00002-of-00002.safetensors": names[1::2]}
    weight_map = {}
    for shard, keys in shards.items():
        write_safetensors(tmp_path / shard, {k: tensors[k] for k in keys})
        weight_map.update(dict.fromkeys(keys, shard))
    (tmp_path / "model.safetensors.index.json").write_text(json.dumps({"weight_map": weight_map}))
    shutil.copy(os.path.join(golden_dir("llama"), "config.json"), tmp_path)
    assert len(weight_files(tmp_path)) == 2
    sharded, _ = import_checkpoint(str(tmp_path), "hf")
    single, _ = import_checkpoint(golden_dir("llama"), "hf")
    np.testing.assert_array_equal(np.asarray(sharded.embed.embedding[...]), np.asarray(single.embed.embedding[...]))
    assert read_config(golden_dir("mamba2_hf"))["time_step_limit"] == [0.0, float("inf")]
    (tmp_path / "config.json").write_text('{"time_step_limit": [0.0, Infinity]}')
    assert read_config(tmp_path)["time_step_limit"] == [0.0, float("inf")]


def test_source_weights_name_the_key():
    w = SourceWeights({"a": np.zeros((2, 3), np.float32), "i": np.zeros(3, np.int32), "extra": np.zeros(1)}, "ckpt")
    with pytest.raises(ValueError, match="'missing' is missing"):
        w.take("missing", (1,))
    with pytest.raises(ValueError, match=r"'a' has shape \(2, 3\), but the config implies \(3, 2\)"):
        w.take("a", (3, 2))
    with pytest.raises(ValueError, match="'i' has dtype int32"):
        w.take("i", (3,))
    assert w.take("a", (2, 3)).dtype == np.float32
    w.ignore("i", "not needed")
    with pytest.raises(ValueError, match=r"1 tensor\(s\) that this converter does not know: \['extra'\]"):
        w.finish()


def _copy_fixture(name, tmp_path):
    dst = tmp_path / name
    shutil.copytree(golden_dir(name), dst)
    return dst


def test_a_bad_checkpoint_gives_one_clear_error(tmp_path):
    # a tensor of the wrong shape, named in the error
    src = _copy_fixture("llama", tmp_path)
    tensors = read_safetensors(src / "model.safetensors")
    tensors["model.layers.1.mlp.up_proj.weight"] = np.zeros((63, 32), np.float32)
    write_safetensors(src / "model.safetensors", tensors)
    with pytest.raises(ValueError, match=r"'model.layers.1.mlp.up_proj.weight' has shape \(63, 32\)"):
        import_checkpoint(str(src), "hf")
    # an unknown tensor (e.g. an MLP bias the config does not announce)
    tensors["model.layers.1.mlp.up_proj.weight"] = np.zeros((64, 32), np.float32)
    tensors["model.layers.0.mlp.up_proj.bias"] = np.zeros(64, np.float32)
    write_safetensors(src / "model.safetensors", tensors)
    with pytest.raises(ValueError, match="model.layers.0.mlp.up_proj.bias"):
        import_checkpoint(str(src), "hf")
    # config fields the zoo's models cannot compute
    config = json.loads((src / "config.json").read_text())
    for change, match in [
        ({"hidden_act": "gelu"}, "hidden_act"),
        ({"mlp_bias": True}, "mlp_bias"),
        ({"rope_parameters": {"rope_type": "dynamic", "factor": 2.0, "rope_theta": 1e4}}, "'dynamic'"),
        ({"model_type": "gpt2"}, "model_type 'gpt2'"),
    ]:
        (src / "config.json").write_text(json.dumps({**config, **change}))
        with pytest.raises(ValueError, match=match):
            import_checkpoint(str(src), "hf")
    ss = _copy_fixture("mamba2_ss", tmp_path)
    config = json.loads((ss / "config.json").read_text())
    for change, match in [
        ({"ssm_cfg": {"layer": "Mamba1"}}, "Mamba1"),
        ({"attn_layer_idx": [1]}, "hybrid attention"),
        ({"ssm_cfg": {**config["ssm_cfg"], "norm_before_gate": True}}, "norm_before_gate"),
    ]:
        (ss / "config.json").write_text(json.dumps({**config, **change}))
        with pytest.raises(ValueError, match=match):
            import_checkpoint(str(ss), "mamba_ssm")
    with pytest.raises(ValueError, match="convert it with --from mamba_ssm"):
        import_checkpoint(str(ss), "hf")
    with pytest.raises(ValueError, match="does not exist"):
        import_checkpoint(str(tmp_path / "nowhere"), "hf")


def test_hf_mamba2_accepts_either_embedding_name(tmp_path):
    """transformers loads a Mamba2ForCausalLM whose embedding carries mamba_ssm's name; so does the zoo."""
    src = _copy_fixture("mamba2_hf", tmp_path)
    tensors = read_safetensors(src / "model.safetensors")
    tensors["backbone.embedding.weight"] = tensors.pop("backbone.embeddings.weight")
    write_safetensors(src / "model.safetensors", tensors)
    renamed, _ = import_checkpoint(str(src), "hf")
    original, _ = import_checkpoint(golden_dir("mamba2_hf"), "hf")
    np.testing.assert_array_equal(np.asarray(renamed.embedding[...]), np.asarray(original.embedding[...]))
