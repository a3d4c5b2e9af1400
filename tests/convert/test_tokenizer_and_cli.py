"""Tokenizers with converted checkpoints, and the command line.

The golden byte-level BPE tokenizer.json (trained with `tokenizers`, with a `<s>` template) through
zoo's HF tokenizer: ids with and without special tokens, tokens' decoding, EOS. A tokenizer travels
with the model directory (self-contained: it still loads after the directory moves). `zoo convert
--from` / `--to` and `zoo generate --pretrained` end to end, and their errors."""

import json
import os
import shutil

import numpy as np
import pytest
import tokenizers
from flax import nnx
from golden_testing import GOLDEN, golden_dir

import zoo
from zoo.cli import main
from zoo.data.tokenizers import HFTokenizer
from zoo.generate import encode_prompt, generate, generate_text
from zoo.model_dir import save_pretrained

TOKENIZER = os.path.join(GOLDEN, "tokenizer", "tokenizer.json")


def test_the_golden_tokenizer_through_zoo():
    with open(os.path.join(GOLDEN, "tokenizer", "encodings.json"), encoding="utf-8") as f:
        golden = json.load(f)
    tok = HFTokenizer(TOKENIZER)
    assert tok.vocab_size == golden["vocab_size"] == 320
    assert (tok.eos_token, tok.eos_id) == (golden["eos_token"], golden["eos_id"])
    for case in golden["cases"]:
        assert tok.encode(case["text"]).tolist() == case["ids_without_special_tokens"], case["text"]
        assert encode_prompt(tok, case["text"]).tolist() == case["ids"], case["text"]  # the <s> template
        assert tok.decode(case["ids_without_special_tokens"]) == case["decoded"], case["text"]


def test_the_tokenizer_travels_with_the_model_directory(tmp_path):
    tok = HFTokenizer(TOKENIZER)
    model = zoo.create_model("transformer", "tiny", seed=0, vocab_size=320, d_model=32, n_heads=4, d_ff=64)
    save_pretrained(model, str(tmp_path / "a"), tokenizer=tok.spec())
    meta = json.loads((tmp_path / "a" / "model.json").read_text())
    assert meta["tokenizer"]["path"] == "tokenizer.json" and (tmp_path / "a" / "tokenizer.json").is_file()
    shutil.move(str(tmp_path / "a"), str(tmp_path / "b"))  # the directory is self-contained
    loaded, _ = zoo.from_pretrained(str(tmp_path / "b" / "model.json"))
    again = zoo.load_tokenizer(str(tmp_path / "b"))
    assert again.spec()["sha256"] == tok.spec()["sha256"] and again.eos_id == 1
    text = generate_text(loaded, again, ["Hello world"], 5, eos=None)[0]
    ids = generate(loaded, [encode_prompt(again, "Hello world")], 5).tokens[0]
    assert text == again.decode(ids)


def _word_tokenizer(path, size: int):
    """A word-level tokenizer.json of `size` tokens ("</s>" is id 1), built with `tokenizers`."""
    vocab = {"<unk>": 0, "</s>": 1, **{f"w{i}": i + 2 for i in range(size - 2)}}
    tok = tokenizers.Tokenizer(tokenizers.models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = tokenizers.pre_tokenizers.Whitespace()
    tok.decoder = tokenizers.decoders.WordPiece()
    tok.save(str(path))


def test_cli_convert_generate_export(tmp_path, capsys):
    src = tmp_path / "src"
    shutil.copytree(golden_dir("mamba2_hf"), src)
    _word_tokenizer(src / "tokenizer.json", 200)
    out = tmp_path / "zoo"
    assert main(["convert", "--from", "hf", str(src), "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "21 of 21 tensors mapped" in printed and "tokenizer: hf tokenizer.json" in printed
    assert (out / "tokenizer.json").is_file()
    assert main(["generate", "--pretrained", str(out), "--prompt", "w1 w2 w3", "--prompt", "w7",
                 "--max-new-tokens", "4", "--json", "--eos", "none"]) == 0  # fmt: skip
    rows = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert [r["prompt_ids"] for r in rows] == [[3, 4, 5], [9]]
    model, _ = zoo.from_pretrained(str(out))
    want = generate(model, [[3, 4, 5], [9]], 4)
    assert [r["ids"] for r in rows] == want.rows()
    assert rows[0]["text"] == zoo.load_tokenizer(str(out)).decode(want.rows()[0])
    # memmamba from the same checkpoint: the Mamba-2 parameters copied, the Note Blocks fresh
    mem = tmp_path / "mem"
    assert main(["convert", "--from", "hf", str(src), "--model", "memmamba", "--out", str(mem),
                 "--set", "pool_size=4", "--set", "summary_dim=8", "--set", "cross_layer_interval=2",
                 "--tokenizer", "none", "--seed", "3"]) == 0  # fmt: skip
    assert "initialised fresh" in capsys.readouterr().out
    memmamba, meta = zoo.from_pretrained(str(mem))
    assert meta["model_name"] == "memmamba" and memmamba.config.pool_size == 4
    np.testing.assert_array_equal(
        np.asarray(memmamba.blocks.layers[1].mixer.in_proj.kernel[...]),
        np.asarray(model.blocks.layers[1].mixer.in_proj.kernel[...]),
    )
    fresh = type(memmamba)(memmamba.config, rngs=nnx.Rngs(3))  # the Note Blocks: a fresh init from --seed
    assert memmamba.blocks.layers[1].note.cross is not None  # layer 1 is a cross layer
    for layer in (0, 1):
        np.testing.assert_array_equal(
            np.asarray(memmamba.blocks.layers[layer].note.score1.kernel[...]),
            np.asarray(fresh.blocks.layers[layer].note.score1.kernel[...]),
        )
    # export back to Hugging Face: the fixture's own tensors
    hf = tmp_path / "hf"
    assert main(["convert", "--to", "hf", str(out), "--out", str(hf)]) == 0
    assert "Mamba2ForCausalLM" in capsys.readouterr().out
    assert sorted(os.listdir(hf)) == ["config.json", "generation_config.json", "model.safetensors", "tokenizer.json"]


def test_cli_errors_are_one_line(tmp_path, capsys):
    for argv, match in [
        (["convert", "--from", "hf", str(tmp_path / "missing"), "--out", str(tmp_path / "o")], "does not exist"),
        (
            ["convert", "--from", "hf", golden_dir("llama"), "--out", str(tmp_path / "o"), "--tokenizer", TOKENIZER],
            "the tokenizer has 320 tokens but the model only 300",
        ),  # fmt: skip
        (
            ["convert", "--from", "hf", golden_dir("llama"), "--model", "mamba2", "--out", str(tmp_path / "o")],
            "converts to one of ['hip', 'masformer', 'transformer']",
        ),  # fmt: skip
        (["convert", "--from", "hf", golden_dir("llama")], "needs --out"),
        (["convert", "--to", "hf", str(tmp_path), "--out", str(tmp_path / "o")], "is neither a zoo model directory"),
        (["generate", "--pretrained", str(tmp_path), "--prompt", "x"], "is neither a zoo model directory"),
        (["generate", "--pretrained", golden_dir("llama"), "--prompt", "x"], "has no tokenizer"),
        (
            ["convert", "--from", "hf", golden_dir("llama"), "--out", str(tmp_path / "o"), "--step", "3"],
            "--step applies",
        ),
        (["generate", "--pretrained", golden_dir("llama"), "--step", "3", "--prompt-ids", "1"], "a hf one"),
    ]:
        assert main(argv) == 2, argv
        err = capsys.readouterr().err
        assert err.startswith("zoo: error:") and match in err and err.count("\n") == 1, err
    assert not os.path.exists(tmp_path / "o")
    with pytest.raises(SystemExit):
        main(["generate", "--prompt", "x"])  # --workdir or --pretrained is required


def test_cli_generate_from_a_training_run(tmp_path, tiny, capsys):
    """`zoo generate --workdir`: a `zoo train` run's checkpoint with its data tokenizer (bytes)."""
    from zoo.train.trainer import train

    train(tiny(steps=2), str(tmp_path / "run"), progress=False)
    capsys.readouterr()
    argv = ["generate", "--workdir", str(tmp_path / "run"), "--prompt", "The passkey is", "--max-new-tokens", "6"]
    assert main([*argv, "--json", "--eos", "none"]) == 0
    (row,) = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert row["prompt_ids"] == list(b"The passkey is") and len(row["ids"]) == 6
    model, _ = zoo.load(str(tmp_path / "run"))
    assert row["ids"] == generate(model, [list(b"The passkey is")], 6).rows()[0]


def test_a_training_run_exports_and_loads_as_a_model_directory(tmp_path, tiny, capsys):
    """A `zoo train` work directory wherever a model directory goes: `zoo convert --to hf` (latest or
    --step) with its byte tokenizer as tokenizer.json, `zoo generate --pretrained` on the export (a
    Hugging Face checkpoint converted in memory) equal to `zoo generate --workdir`, `zoo.from_pretrained`."""
    from zoo.model_dir import load_pretrained
    from zoo.train.trainer import train

    run = tmp_path / "run"
    train(tiny(steps=4, checkpoint_every=2), str(run), progress=False)
    capsys.readouterr()
    assert main(["convert", "--to", "hf", str(run), "--out", str(tmp_path / "hf")]) == 0
    assert "LlamaForCausalLM" in capsys.readouterr().out
    assert {"tokenizer.json", "tokenizer_config.json"} <= set(os.listdir(tmp_path / "hf"))
    prompt = ["--prompt", "The passkey is", "--max-new-tokens", "6", "--json", "--eos", "none"]
    rows = []
    for source in (["--workdir", str(run)], ["--pretrained", str(tmp_path / "hf")], ["--pretrained", str(run)]):
        assert main(["generate", *source, *prompt]) == 0, source
        rows.append(json.loads(capsys.readouterr().out))
    assert rows[0]["prompt_ids"] == list(b"The passkey is") and len(rows[0]["ids"]) == 6
    assert rows[1] == rows[0] and rows[2] == rows[0]
    # the Hugging Face export loads in memory with the same logits as the run's checkpoint
    tokens = np.arange(1, 17, dtype=np.int32)[None] * 7 % 256
    exported, meta = zoo.from_pretrained(str(tmp_path / "hf"))
    assert meta["source"]["format"] == "hf" and meta["tokenizer"]["kind"] == "hf"
    model, _ = zoo.load(str(run))
    np.testing.assert_allclose(np.asarray(exported(tokens)), np.asarray(model(tokens)), atol=2e-5, rtol=2e-5)
    # --step: an earlier checkpoint, different weights; a step the run lacks is one line
    assert main(["convert", "--to", "hf", str(run), "--step", "2", "--out", str(tmp_path / "hf2")]) == 0
    step2, _ = zoo.from_pretrained(str(run), step=2)
    np.testing.assert_allclose(
        np.asarray(zoo.from_pretrained(str(tmp_path / "hf2"))[0](tokens)), np.asarray(step2(tokens)), atol=2e-5
    )
    assert not np.allclose(np.asarray(step2(tokens)), np.asarray(model(tokens)))
    capsys.readouterr()
    assert main(["convert", "--to", "hf", str(run), "--step", "3", "--out", str(tmp_path / "hf3")]) == 2
    assert "no checkpoint at step 3" in capsys.readouterr().err
    assert zoo.load_tokenizer(str(run)).spec()["kind"] == "bytes"
    with pytest.raises(ValueError, match="it is a `zoo train` work directory: load it with zoo.load"):
        load_pretrained(str(run))


def test_from_pretrained_converts_a_checkpoint_in_memory():
    """`zoo.from_pretrained` on a Hugging Face or mamba_ssm directory: the converters of `zoo convert
    --from`, the model equal to the converted directory's, the tokenizer found the same way."""
    from zoo.convert.pretrained import import_checkpoint

    for name, fmt in (("llama", "hf"), ("mamba2_hf", "hf"), ("mamba2_ss", "mamba_ssm")):
        model, meta = zoo.from_pretrained(golden_dir(name))
        want, info = import_checkpoint(golden_dir(name), fmt)
        assert meta["model_name"] == want.model_name and meta["source"]["report"] == info["report"], name
        tokens = np.array([[1, 5, 9, 2, 7]], np.int32)
        np.testing.assert_array_equal(np.asarray(model(tokens)), np.asarray(want(tokens)))
    with pytest.raises(ValueError, match="is neither a zoo model directory"):
        zoo.from_pretrained(os.path.dirname(golden_dir("llama")))
