"""The papers' scripts on converted checkpoints (tiny golden fixtures, converted here; the real
runs use released weights the user downloads): `scripts/stuffed_mamba.py --pretrained` (state
norms, loss by position, passkey with and without a mitigation) and `scripts/hip_eval.py` (HiP vs
dense on a pretrained transformer)."""

import codecs
import json
import os
import sys

import numpy as np
import pytest
from golden_testing import golden_dir

from zoo.cli import main as zoo_main

SCRIPTS = os.path.join(os.path.dirname(__file__), "..", "..", "scripts")


@pytest.fixture
def text_dir(tmp_path):
    """A small folder of real text (the Zen of Python, repeated)."""
    import this  # noqa: F401  (its text is `this.s`, rot13-encoded)

    folder = tmp_path / "text"
    folder.mkdir()
    (folder / "zen.txt").write_text((codecs.decode(sys.modules["this"].s, "rot13") + "\n") * 8)
    return str(folder)


@pytest.fixture
def scripts(monkeypatch):
    monkeypatch.syspath_prepend(SCRIPTS)
    import hip_eval
    import pretrained_tasks
    import stuffed_mamba

    return stuffed_mamba, hip_eval, pretrained_tasks


def test_stuffed_mamba_on_a_converted_checkpoint(tmp_path, text_dir, scripts):
    stuffed_mamba, _, tasks = scripts
    model_dir = str(tmp_path / "mamba2")
    assert zoo_main(["convert", "--from", "mamba_ssm", golden_dir("mamba2_ss"), "--out", model_dir,
                     "--tokenizer", "bytes"]) == 0  # fmt: skip
    out = tmp_path / "out"
    stuffed_mamba.main(["--workdir", str(out), "--pretrained", model_dir, "--text", text_dir, "--train_len", "64",
                        "--factors", "2", "--samples", "2", "--mitigations", "original,M3: window 32"])  # fmt: skip
    result = json.loads((out / "stuffed_mamba.json").read_text())
    assert result["lengths"] == [128] and result["tokenizer"]["kind"] == "bytes"
    assert list(result["rows"]) == ["original", "M3: window 32"]
    for row in result["rows"].values():
        assert len(row["exact_match"]) == len(row["exact_match_recent"]) == 1 and len(row["loss"]) == 32
    # the measurement is the model's own loss on the same windows
    model, tok, _ = tasks.load(model_dir)
    losses = tasks.token_losses(model, tasks.text_windows(tok, 129, 2, text_dir, seed=3))
    np.testing.assert_allclose(result["rows"]["original"]["loss_train_len"], losses[:, :64].mean(), rtol=1e-5)
    assert result["rows"]["M3: window 32"]["loss"] != result["rows"]["original"]["loss"]  # the window acts
    assert (out / "state_norms.png").is_file() and (out / "stuffed_mamba.png").is_file()


def test_hip_eval_on_a_converted_checkpoint(tmp_path, text_dir, scripts):
    _, hip_eval, _ = scripts
    model_dir = str(tmp_path / "llama")
    assert zoo_main(["convert", "--from", "hf", golden_dir("llama"), "--out", model_dir, "--tokenizer", "bytes"]) == 0
    out = tmp_path / "out"
    hip_eval.main(["--pretrained", model_dir, "--workdir", str(out), "--text", text_dir, "--lengths", "16,96",
                   "--samples", "2", "--no-passkey", "--k_blocks", "1", "--block_q", "16", "--block_k", "16",
                   "--window", "16", "--sinks", "0"])  # fmt: skip
    rows = json.loads((out / "hip_eval.json").read_text())["rows"]
    # 16 tokens: HiP's window covers every key, so HiP is dense; 96: one block + window + sinks of 96 keys
    assert rows[0]["max_abs_logit_diff"] < 1e-4 and rows[0]["top1_agreement"] == 1.0
    assert rows[0]["ppl_hip"] == pytest.approx(rows[0]["ppl_dense"], rel=1e-5)
    assert rows[1]["max_abs_logit_diff"] > 1e-2 and rows[1]["ppl_hip"] != rows[1]["ppl_dense"]
    assert (out / "hip_eval.png").is_file()
