"""`zoo bench train`: each preset at its own run shape by default, the tiny presets without
arguments, defaults in --help, one line and status 2 for a bad name."""

import json

from zoo import bench
from zoo.cli import main
from zoo.models import registry


def test_bench_train_runs_each_preset_at_its_run_shape(tmp_path, capsys):
    out = tmp_path / "rows.json"
    assert main(["bench", "train", "transformer:tiny", "mamba2:tiny", "--reps", "1", "--json", str(out)]) == 0
    rows = json.loads(out.read_text())
    assert [(r["config"], r["batch"], r["seq_len"]) for r in rows] == [
        ("transformer:tiny", 16, 160),
        ("mamba2:tiny", 16, 128),
    ]
    assert all("error" not in r and r["step_ms"] > 0 for r in rows), rows
    assert "16 x 160" in capsys.readouterr().out
    # explicit sizes apply to every preset
    rows = bench.bench_train(["transformer:tiny"], batch_size=2, seq_len=32, reps=1, peak=1e12)
    assert (rows[0]["batch"], rows[0]["seq_len"]) == (2, 32) and "error" not in rows[0]


def test_bench_train_defaults_and_errors(capsys):
    assert bench.tiny_presets() == [f"{n}:tiny" for n in registry.list_models("lm")]
    assert bench.run_shape("mamba2:130m") == (256, 2048)
    try:
        main(["bench", "train", "--help"])
    except SystemExit as e:
        assert e.code == 0
    text = " ".join(capsys.readouterr().out.split())
    assert "(default: 5)" in text and "default: each preset's data.seq_len" in text and "tiny preset" in text
    for argv, match in [
        (["bench", "train", "nosuch:tiny"], "no packaged config 'nosuch'"),
        (["bench", "train", "transformer:huge"], "unknown preset 'huge'"),
        (["bench", "train", "transformer:tiny", "--config.data.nokey=1"], "nokey"),
    ]:
        assert main(argv) == 2, argv
        err = capsys.readouterr().err
        assert err.startswith("zoo: error:") and match in err and err.count("\n") == 1, err
