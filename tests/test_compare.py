"""`zoo compare` end to end on its smallest preset: two models trained a few steps through the real
trainer, every measure written, the outputs consistent with the models; bad input is one error line."""

import json
import math

import pytest

from zoo.cli import main
from zoo.compare import rows_of, run_config
from zoo.configs.compare import get_settings
from zoo.models import registry

MODELS = ["transformer", "mamba2"]


@pytest.fixture(scope="module")
def report(tmp_path_factory):
    root = tmp_path_factory.mktemp("compare")
    out, runs = root / "out", root / "runs"
    argv = ["compare", "--preset", "test", "--models", ",".join(MODELS), "--out", str(out), "--workdir", str(runs)]
    assert main(argv) == 0
    return out, runs, json.loads((out / "compare.json").read_text())


def test_outputs_exist_and_rows_are_the_models_asked_for(report):
    out, _, r = report
    assert r["order"] == MODELS and set(r["rows"]) == set(MODELS)
    md = (out / "compare.md").read_text()
    for name in ("passkey", "mqar", "loss_by_position", "prefill_time", "decode_time", "prefill_memory", "params"):
        png = out / f"{name}.png"
        assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n", name
        assert f"]({name}.png)" in md
    summary = md.split("## Summary")[1].split("##")[0]
    table_rows = [line.split("|")[1].strip() for line in summary.splitlines() if line.startswith("| ")][1:]
    assert table_rows == MODELS
    assert "zoo compare --preset test" in md and r["machine"] in md


def test_numbers_are_consistent_with_the_models_and_settings(report):
    _, runs, r = report
    settings = get_settings("test")
    train_len = settings["data"]["seq_len"]
    lengths = [m * train_len for m in settings["eval"]["length_multiples"]]
    for name, row in r["rows"].items():
        # the parameter count is the trained model's own (from its checkpoint) and its config's
        from zoo.checkpoint import load_model
        from zoo.models.params import ParamView

        model, config = load_model(str(runs / name))
        assert config.model_name == name and config.model.d_model == settings["model"]["d_model"]
        assert row["params"] == sum(math.prod(p.shape) for p in ParamView(model).flat(model).values())
        assert row["step"] == settings["train"]["steps"] and math.isfinite(row["train"]["loss"])
        pk = row["passkey"]
        assert pk["lengths"] == lengths and pk["depths"] == settings["eval"]["depths"]
        for grid in (pk["exact_match"], pk["token_accuracy"]):
            assert all(0.0 <= x <= 1.0 for line in grid for x in line)
        assert row["mqar"]["lengths"] == lengths
        assert all(0.0 <= x <= 1.0 for x in row["mqar"]["token_accuracy"])
        lp = row["loss_by_position"]
        assert lp["length"] == max(lengths) and all(x > 0 and math.isfinite(x) for x in lp["loss"])
        beyond = [x for p, x in zip(lp["position"], lp["loss"]) if p >= train_len]
        assert lp["mean_beyond_train_length"] == pytest.approx(sum(beyond) / len(beyond))
        assert [b["length"] for b in row["inference"]] == settings["eval"]["bench_lengths"]
        for b in row["inference"]:
            assert b["prefill_s"] > 0 and b["decode_s"] > 0
            assert b["prefill_peak_bytes"] is None or b["prefill_peak_bytes"] > 0
        assert all(v is None or v > 0 for v in row["flops_per_token"].values())


def test_rows_are_the_language_models_plus_extra_and_converted_rows():
    settings = get_settings("tiny")
    rows = {row.name: row for row in rows_of(settings)}
    lms = registry.list_models("lm")
    assert set(rows) == set(lms) | set(settings["extra_rows"])
    assert not {"spacetime", "s4_classifier"} & set(rows)  # not language models
    assert rows["hip"].source == "transformer" and not rows["transformer"].source
    for name in lms:  # the shared width wherever the config has the field
        assert rows[name].fields["d_model"] == settings["model"]["d_model"]
    # every row trains on the same data with the same optimizer and steps (no model's own run settings,
    # e.g. the SSM presets' answer-only passkey loss, leaks in)
    configs = [run_config(settings, row) for row in rows.values()]
    for key in ("data", "optim", "train"):
        assert all(c[key].to_dict() == configs[0][key].to_dict() for c in configs), key
    assert configs[0].data.answer_only is False and configs[0].data.source == "passkey_recall"


def test_unknown_model_is_one_error_line(tmp_path, capsys):
    argv = ["compare", "--preset", "test", "--models", "transformer,nosuchmodel", "--out", str(tmp_path / "o")]
    assert main(argv) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("zoo: error: --models") and "nosuchmodel" in err[0]
    assert "transformer" in err[0]  # the rows to choose from
    assert not (tmp_path / "o").exists()
    assert main(["compare", "--preset", "test", "--models", "hip", "--out", str(tmp_path / "o")]) == 2
    assert "add transformer to --models" in capsys.readouterr().err
    assert main(["compare", "--preset", "nosuch", "--out", str(tmp_path / "o")]) == 2
    assert "--preset 'nosuch'" in capsys.readouterr().err
