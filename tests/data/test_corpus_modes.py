"""Training on prepared shards: EOS in concat-and-chunk, packing with segment ids, decomposition over
shards, several hosts, exact resume, the toy-corpus guard and `describe`."""

import json

import grain
import numpy as np
import pytest
from data_testing import data_config, same_batches, write_random_bytes_corpus, write_text_corpus
from grain.experimental import FirstFitPackIterDataset

from zoo.data import pipeline as pl
from zoo.data.packing import DocumentPieces, packed_inputs
from zoo.data.prepare import prepare
from zoo.data.shards import ShardDocuments
from zoo.data.text import TextFiles


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    """60 files of 20..900 random letters, and their shards (small records: documents span several)."""
    root = tmp_path_factory.mktemp("corpus")
    write_random_bytes_corpus(root / "text", 60)
    # A validation fraction of 0.1 splits as the in-memory text source does, so both can be compared.
    prepare(
        "text", str(root / "text"), str(root / "shards"), shard_mb=0.005, record_tokens=128, validation_fraction=0.1
    )
    return root


def _take(it, n):
    return [next(it) for _ in range(n)]


def _shards(corpus, **kw):
    return data_config(source="shards", path=str(corpus / "shards"), **kw)


def _text(corpus, **kw):
    return data_config(source="text", path=str(corpus / "text"), **kw)


def test_concat_and_chunk_puts_eos_between_documents(corpus):
    docs = TextFiles(str(corpus / "text"), "train").docs
    stream = np.concatenate([np.append(d, 0) for d in docs])  # bytes: EOS is 0
    source = pl.example_source(_shards(corpus), "train", 64)
    assert len(source) == (len(stream) - 1) // 64
    for i in [0, 1, 7, len(source) // 2, len(source) - 1]:
        np.testing.assert_array_equal(source[i]["tokens"], stream[i * 64 : (i + 1) * 64 + 1])
    in_memory = pl.example_source(_text(corpus), "train", 64)
    assert all(np.array_equal(in_memory[i]["tokens"], source[i]["tokens"]) for i in range(len(source)))
    batch = next(pl.make_batches(_shards(corpus, batch_size=4, seq_len=64)))
    assert sorted(batch) == ["answer_mask", "inputs", "loss_mask", "targets"] and batch["inputs"].shape == (4, 64)
    assert (batch["inputs"] == 0).any()  # 4 random rows of ~64 tokens across ~500-token documents


def _check_packed_row(row):
    """Segment ids count up from 1 then pad with 0; positions restart at every segment; the loss
    mask is 1 exactly where the target continues the input's segment."""
    seg, pos, mask = row["segment_ids"], row["positions"], row["loss_mask"]
    real = seg > 0
    assert real[0] and np.all(np.diff(real.astype(int)) <= 0)  # padding only at the end
    ids = seg[real]
    assert ids[0] == 1 and np.all(np.diff(ids) >= 0) and np.all(np.diff(ids) <= 1)
    for s in np.unique(ids):
        np.testing.assert_array_equal(pos[seg == s], np.arange(np.sum(seg == s)))
    assert np.all(row["answer_mask"] == mask) and np.all(row["inputs"][~real] == 0)
    nxt = np.append(seg[1:], 0)
    # the last input of the row has a target in the row's extra token: it counts when that token is real
    expected = real & (nxt == seg)
    np.testing.assert_array_equal(mask[:-1].astype(bool), expected[:-1])


def test_packing_trains_every_token_once_per_epoch():
    rng = np.random.default_rng(0)
    lengths = np.concatenate([rng.integers(1, 40, 50), [64, 65, 130, 200]])
    offsets = np.concatenate([[0], np.cumsum(lengths)])
    docs = [np.arange(offsets[d], offsets[d + 1], dtype=np.int32) + 1 for d in range(len(lengths))]  # unique ids
    expected = {}
    for d in docs:
        ext = np.append(d, 0)
        for a, b in zip(ext[:-1], ext[1:]):
            expected[(int(a), int(b))] = 1
    pieces = DocumentPieces(docs, 64, eos_id=0)
    assert len(pieces) == int(np.sum(-(-lengths // 64)))
    ds = FirstFitPackIterDataset(
        grain.MapDataset.source(pieces).shuffle(seed=3).to_iter_dataset(),
        length_struct={"tokens": 65},
        num_packing_bins=4,
        shuffle_bins=False,
    )
    seen: dict = {}
    for raw in ds:
        row = packed_inputs(raw)
        _check_packed_row(row)
        for a, b, m in zip(row["inputs"], row["targets"], row["loss_mask"]):
            if m:
                seen[(int(a), int(b))] = seen.get((int(a), int(b)), 0) + 1
    assert seen == expected  # every next-token pair of every document (and document -> EOS) exactly once


def test_packed_batches_shape_resume_and_hosts(corpus):
    data = _shards(corpus, mode="packed", batch_size=4, seq_len=96, pack_bins=8)
    it = pl.make_batches(data)
    first = _take(it, 3)
    for b in first:
        assert sorted(b) == sorted(pl.PACKED_KEYS) and all(v.shape == (4, 96) for v in b.values())
        assert b["segment_ids"].dtype == b["positions"].dtype == b["inputs"].dtype == np.int32
        assert b["loss_mask"].dtype == np.float32
        for r in range(4):
            _check_packed_row({k: v[r] for k, v in b.items()})
        assert np.all(b["positions"] < 96)
    state = json.loads(json.dumps(it.get_state()))  # a checkpoint stores it as JSON
    expected = _take(it, 5)
    assert max(b["segment_ids"].max() for b in first + expected) > 1  # some row holds several pieces
    again = pl.make_batches(data)
    again.set_state(state)
    assert same_batches(_take(again, 5), expected)
    assert same_batches(_take(pl.make_batches(data), 3), first)  # deterministic
    # Hosts pack disjoint documents that together are the corpus.
    docs = ShardDocuments(str(corpus / "shards"))
    owners = [DocumentPieces(docs, 96, docs.eos_id, process_index=h, process_count=2) for h in (0, 1)]
    held = [{p.locate(i)[0] for i in range(len(p))} for p in owners]
    assert not held[0] & held[1] and held[0] | held[1] == set(range(len(docs)))
    h0 = next(pl.make_batches(data, process_index=0, process_count=2))
    h1 = next(pl.make_batches(data, process_index=1, process_count=2))
    assert h0["inputs"].shape == h1["inputs"].shape == (2, 96) and not np.array_equal(h0["inputs"], h1["inputs"])
    with pytest.raises(ValueError, match="packs documents"):
        pl.make_batches(data_config(source="passkey", mode="packed"))


def test_decomposition_over_shards_equals_in_memory(corpus):
    kw = dict(mode="decomposition", min_log2=4, max_log2=7, tokens_per_step=256, curriculum="uniform")
    shards, memory = pl.make_batches(_shards(corpus, **kw)), pl.make_batches(_text(corpus, **kw))
    for k in shards.index.ks:  # the same index, built from the length index alone
        for a, b in zip(shards.index.locations(k), memory.index.locations(k)):
            np.testing.assert_array_equal(a, b)
    assert same_batches(_take(shards, 12), _take(memory, 12))


def test_decomposition_over_shards_two_hosts_and_resume(corpus):
    data = _shards(corpus, mode="decomposition", min_log2=4, max_log2=7, tokens_per_step=256, curriculum="uniform")
    single = _take(pl.make_batches(data), 10)
    hosts = [pl.make_batches(data, process_index=h, process_count=2) for h in (0, 1)]
    for step, full in enumerate(single):
        parts = [next(h) for h in hosts]
        rows = [{r.tobytes() for r in p["inputs"]} for p in parts]
        assert not rows[0] & rows[1]
        for key in full:  # host 0 holds the first half of the global batch, host 1 the second
            np.testing.assert_array_equal(np.concatenate([parts[0][key], parts[1][key]]), full[key])
    it = pl.make_batches(data, process_index=1, process_count=2)
    _take(it, 4)
    state = json.loads(json.dumps(it.get_state()))
    expected = _take(it, 4)
    again = pl.make_batches(data, process_index=1, process_count=2)
    again.set_state(state)
    assert same_batches(_take(again, 4), expected)


def test_toy_corpus_guard():
    with pytest.raises(ValueError, match="embedded stdlib corpus.*zoo data prepare.*allow_toy=True"):
        pl.make_batches(data_config(source="text", path="", allow_toy=False))
    assert pl.is_toy(data_config(source="text", path="")) and not pl.is_toy(data_config(source="text", path="x"))


def test_describe(corpus):
    text = pl.describe(_shards(corpus, batch_size=4, seq_len=64), steps=100)
    manifest = json.loads((corpus / "shards" / "manifest.json").read_text())
    train = manifest["splits"]["train"]
    assert f"shards {corpus / 'shards'}" in text and "bytes (vocab 256, eos 0)" in text
    assert f"train      {train['documents']:,} documents, {train['tokens']:,} tokens" in text
    assert f"100 steps x 256 tokens/step = 25,600 tokens = {25600 / train['tokens']:.2f} epochs" in text
    memory = pl.describe(_text(corpus, batch_size=4, seq_len=64), steps=100)
    assert memory.splitlines()[2:] == text.splitlines()[2:]  # same counts as the shards
    assert "synthetic task 'passkey'" in pl.describe(data_config(), steps=10)
    with pytest.raises(ValueError, match="has no manifest.json"):
        pl.describe(data_config(source="shards", path=str(corpus / "text")))


def test_own_small_corpus_prepares_trains_and_evaluates(tmp_path, capsys):
    """12 short text files: `zoo data prepare` gives them a one-document validation split, `zoo train`
    on the shards trains and evaluates within what that split holds, and a split too small for the
    evaluation length is one line naming the fix."""
    from conftest import TINY_OVERRIDES

    from zoo import cli

    write_text_corpus(tmp_path / "text", 12, max_words=300)
    assert cli.main(["data", "prepare", "--input", str(tmp_path / "text"), "--output", str(tmp_path / "shards")]) == 0
    valid = ShardDocuments(str(tmp_path / "shards"), "validation")
    assert len(valid) == 1 and len(ShardDocuments(str(tmp_path / "shards"), "train")) == 11
    rows = (int(valid.lengths[0]) + 1 - 1) // 112  # concat-and-chunk rows of 112 tokens (+ EOS)
    assert 1 <= rows < 64
    data = ["--config.data.source=shards", f"--config.data.path={tmp_path / 'shards'}"]
    work = str(tmp_path / "run")
    args = ["train", "--config", "transformer:tiny", "--workdir", work, *TINY_OVERRIDES, *data]
    assert cli.main([*args, "--config.train.steps=3", "--config.eval.samples=64"]) == 0
    ev = json.loads((tmp_path / "run" / "eval.json").read_text())
    assert ev["loss_by_position"]["length"] == 112 and np.isfinite(ev["loss_by_position"]["loss"]).all()
    assert cli.main(["eval", "--workdir", work]) == 0
    capsys.readouterr()
    with open(tmp_path / "run" / "config.json") as f:
        config = json.load(f)
    config["eval"]["lengths"] = [100_000]
    with open(tmp_path / "run" / "config.json", "w") as f:
        json.dump(config, f)
    assert cli.main(["eval", "--workdir", work]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "validation split" in err and "--validation-fraction" in err
