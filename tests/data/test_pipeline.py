"""Grain pipelines: synthetic tasks, text files, TFDS (built locally and mocked), decomposition."""

import numpy as np
import pytest
from data_testing import data_config as _data
from data_testing import tfds_builder

from zoo.data import synthetic
from zoo.data.pipeline import FixedLengthBatches, make_batches
from zoo.data.text import TextFiles
from zoo.data.tokenizers import load_tokenizer


def test_passkey_layout_and_depth():
    for depth in (0.0, 0.5, 1.0):
        ex = synthetic.Passkey(300, depth=depth, seed=3)[7]
        text = bytes(ex["tokens"].astype(np.uint8)).decode()
        assert len(ex["tokens"]) == 301
        key = text[-5:]
        assert key.isdigit() and text.endswith(synthetic.QUESTION + key)
        needle = synthetic.NEEDLE.format(key=key)
        n_fill = 301 - len(needle) - len(synthetic.QUESTION) - 5
        at = text.index(needle) / n_fill
        assert abs(at - depth) < 0.1, (depth, at)  # snapped to the nearest sentence boundary
        assert ex["answer_mask"].sum() == 5 and ex["answer_mask"][-5:].all()
    a, b = synthetic.Passkey(200, seed=1)[5], synthetic.Passkey(200, seed=1)[5]
    assert (a["tokens"] == b["tokens"]).all()
    with pytest.raises(ValueError, match="too short"):
        synthetic.Passkey(50)


def test_passkey_loss_masks():
    full, only = synthetic.Passkey(200, seed=1)[4], synthetic.Passkey(200, seed=1, answer_only=True)[4]
    assert (full["tokens"] == only["tokens"]).all() and (full["loss_mask"] == 1).all()
    np.testing.assert_array_equal(only["loss_mask"], full["answer_mask"])


def test_recall_and_selective_copy_answers():
    ex = synthetic.AssociativeRecall(64, num_pairs=6, num_queries=3, seed=0)[2]
    tok, ans = ex["tokens"], ex["answer_mask"]
    pairs = dict(zip(tok[:12:2], tok[1:12:2]))
    for t in np.flatnonzero(ans):  # target t is tokens[t + 1], the value of the key tokens[t]
        assert pairs[tok[t]] == tok[t + 1]
    ex = synthetic.SelectiveCopy(40, num_data=5, seed=0)[1]
    data = ex["tokens"][:-6][ex["tokens"][:-6] > 2]
    assert (ex["tokens"][-5:] == data).all()


def test_fixed_batches_resume_bitwise():
    data = _data(batch_size=4, seq_len=128)
    it = FixedLengthBatches(data)
    for _ in range(3):
        next(it)
    state = it.get_state()
    expected = [next(it) for _ in range(3)]
    again = FixedLengthBatches(data)
    again.set_state(state)
    for e in expected:
        got = next(again)
        assert all((got[k] == e[k]).all() for k in e)


def test_hosts_read_disjoint_shards():
    data = _data(batch_size=4, seq_len=128)
    h0 = next(FixedLengthBatches(data, process_index=0, process_count=2))
    h1 = next(FixedLengthBatches(data, process_index=1, process_count=2))
    full = next(FixedLengthBatches(data))
    assert h0["inputs"].shape == (2, 128)
    rows = lambda b: {r.tobytes() for r in b["inputs"]}  # noqa: E731
    assert rows(h0) | rows(h1) == rows(full) and not rows(h0) & rows(h1)


def test_text_files_split_and_errors(tmp_path):
    for i in range(30):
        (tmp_path / f"doc{i}.txt").write_text(f"document {i} " * 20)
    train, valid = TextFiles(str(tmp_path), "train"), TextFiles(str(tmp_path), "validation")
    assert len(train) + len(valid) == 30 and len(valid) > 0
    docs = {bytes(d.astype(np.uint8)) for d in train.docs}
    assert not docs & {bytes(d.astype(np.uint8)) for d in valid.docs}
    with pytest.raises(ValueError, match="not a directory"):
        TextFiles(str(tmp_path / "missing"))
    batch = next(make_batches(_data(source="text", path=str(tmp_path), batch_size=2, seq_len=32)))
    assert batch["inputs"].shape == (2, 32) and (batch["targets"][:, :-1] == batch["inputs"][:, 1:]).all()


def test_sentencepiece_tokenizer(tmp_path):
    import sentencepiece as spm  # in the `test` extra

    corpus = tmp_path / "docs"
    corpus.mkdir()
    words = ["alpha", "beta", "gamma", "delta", "epsilon", "zeta", "theta", "kappa"]
    rng = np.random.default_rng(0)
    for i in range(12):
        (corpus / f"doc{i}.txt").write_text(" ".join(rng.choice(words, 200)) + "\n")
    spm.SentencePieceTrainer.train(
        input=",".join(str(p) for p in sorted(corpus.iterdir())),
        model_prefix=str(tmp_path / "sp"),
        vocab_size=40,
        model_type="bpe",
        num_threads=1,
        minloglevel=2,
    )
    tok = load_tokenizer(str(tmp_path / "sp.model"))
    ids = tok("gamma delta kappa")
    assert tok.vocab_size == 40 and ids.dtype == np.int32 and len(ids) < len("gamma delta kappa")
    assert tok.sp.decode(ids.tolist()) == "gamma delta kappa"
    batch = next(
        make_batches(
            _data(source="text", path=str(corpus), batch_size=2, seq_len=16, sp_model=str(tmp_path / "sp.model"))
        )
    )
    assert batch["inputs"].max() < 40 and (batch["targets"][:, :-1] == batch["inputs"][:, 1:]).all()
    with pytest.raises(ValueError, match="does not exist"):
        load_tokenizer(str(tmp_path / "missing.model"))


def test_default_corpus_is_python_stdlib():
    docs = TextFiles("", "validation")
    assert len(docs) > 20 and all(d.dtype == np.int32 for d in docs.docs[:5])


def test_decomposition_batches_constant_tokens_and_resume(tmp_path):
    rng = np.random.default_rng(0)
    for i in range(40):
        (tmp_path / f"d{i}.txt").write_bytes(
            rng.integers(97, 123, int(rng.integers(20, 900))).astype(np.uint8).tobytes()
        )
    data = _data(
        source="text",
        path=str(tmp_path),
        mode="decomposition",
        min_log2=4,
        max_log2=7,
        tokens_per_step=256,
        curriculum="uniform",
    )
    it = make_batches(data)
    shapes = []
    for _ in range(6):
        b = next(it)
        shapes.append(b["inputs"].shape)
        assert b["inputs"].shape[0] * b["inputs"].shape[1] == 256
        assert (b["targets"][:, :-1] == b["inputs"][:, 1:]).all()
    assert len(set(shapes)) > 1
    state = it.get_state()
    expected = [next(it) for _ in range(4)]
    again = make_batches(data)
    again.set_state(state)
    for e in expected:
        got = next(again)
        assert all((got[k] == e[k]).all() for k in e)


def test_decomposition_synthetic_buckets():
    data = _data(
        source="recall", mode="decomposition", min_log2=5, max_log2=7, tokens_per_step=512, curriculum="uniform"
    )
    it = make_batches(data)
    lengths = {next(it)["inputs"].shape[1] for _ in range(12)}
    assert lengths <= {32, 64, 128} and len(lengths) > 1


def test_tfds_local_builder_through_grain(tmp_path):
    import tensorflow_datasets  # noqa: F401  (a dependency; a missing one must fail, not skip)

    builder = tfds_builder(tmp_path)
    data = _data(source="tfds", tfds_name=builder.name, tfds_data_dir=str(tmp_path), batch_size=2, seq_len=64)
    batch = next(make_batches(data))
    assert batch["inputs"].shape == (2, 64)
    text = bytes(np.concatenate([batch["inputs"][0], batch["targets"][0][-1:]]).astype(np.uint8))
    assert b"lorem ipsum" in text
    dd = _data(
        source="tfds",
        tfds_name=builder.name,
        tfds_data_dir=str(tmp_path),
        mode="decomposition",
        min_log2=4,
        max_log2=6,
        tokens_per_step=128,
    )
    assert next(make_batches(dd))["inputs"].size == 128
    with pytest.raises(ValueError, match="cannot open TFDS dataset"):
        make_batches(_data(source="tfds", tfds_name="no_such_dataset_xyz", tfds_data_dir=str(tmp_path)))


def test_tfds_mock_data_pg19():
    import tensorflow_datasets as tfds

    with tfds.testing.mock_data(num_examples=6):
        data = _data(source="tfds", tfds_name="pg19", tfds_text_key="book_text", batch_size=1, seq_len=8)
        batch = next(make_batches(data))
    assert batch["inputs"].shape == (1, 8) and batch["inputs"].max() < 256
