"""`zoo data prepare`: every source into shards, read back exactly; resume, parallel workers, errors."""

import json
import os
import shutil

import numpy as np
import pytest
from data_testing import WORDS, tfds_builder, train_hf_tokenizer, write_text_corpus

from zoo import cli
from zoo.data import prepare as pp
from zoo.data import shards as sh
from zoo.data.text import TextFiles
from zoo.data.tokenizers import ByteTokenizer, load_tokenizer


def _all_docs(path, split):
    docs = sh.ShardDocuments(path, split)
    return [docs[i] for i in range(len(docs))]


def _text_split_docs(root, split, tok, fraction):
    """The tokenized files of `split` under `root` by the hash rule, in walk order (as TextFiles reads)."""
    out = []
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = sorted(dirnames)
        for f in sorted(filenames):
            full = os.path.join(dirpath, f)
            data = open(full, "rb").read()
            in_valid = pp.hash_fraction(os.path.relpath(full, root)) < fraction
            if data and b"\0" not in data[:4096] and in_valid == (split == "validation"):
                out.append(tok(data))
    return out


def _tree(path):
    """{relative path: bytes} of every file under `path` (to compare two preparations byte for byte)."""
    out = {}
    for dirpath, _, files in os.walk(path):
        for f in files:
            full = os.path.join(dirpath, f)
            with open(full, "rb") as fh:
                out[os.path.relpath(full, path)] = fh.read()
    return out


def test_text_dir_reads_back_as_tokenized_files(tmp_path):
    write_text_corpus(tmp_path / "in", 40)
    (tmp_path / "in" / "empty.txt").write_text("")
    (tmp_path / "in" / "blob.bin").write_bytes(b"\x00\x01\x02binary")
    m = pp.prepare(
        "text", str(tmp_path / "in"), str(tmp_path / "out"), shard_mb=0.004, record_tokens=300, validation_fraction=0.1
    )
    assert m["skipped"] == {"empty": 1, "binary": 1} and m["units"] > 3
    assert m["tokenizer"] == ByteTokenizer().spec()
    for split in ("train", "validation"):
        expected = _text_split_docs(tmp_path / "in", split, ByteTokenizer(), 0.1)
        # A fraction of 0.1 is the in-memory text source's split.
        assert all(np.array_equal(a, b) for a, b in zip(expected, TextFiles(str(tmp_path / "in"), split).docs))
        got = _all_docs(tmp_path / "out", split)
        assert len(got) == len(expected) == m["splits"][split]["documents"] > 0
        assert all(np.array_equal(a, b) and a.dtype == np.int32 for a, b in zip(got, expected))
        lengths = np.load(tmp_path / "out" / split / "lengths.npy")
        assert lengths.dtype == np.int64 and lengths.tolist() == [len(d) for d in expected]
        assert m["splits"][split]["tokens"] == int(lengths.sum())
    # Long documents span several records; a range read touches only its records and is exact.
    docs = sh.ShardDocuments(tmp_path / "out", "train")
    d = int(np.argmax(docs.lengths))
    assert docs.lengths[d] > 2 * 300 and docs.num_records > len(docs)
    full = docs[d]
    for start, stop in [(0, 1), (299, 301), (250, 650), (599, int(docs.lengths[d]))]:
        np.testing.assert_array_equal(docs.read(d, start, stop), full[start:stop])
    for s in m["splits"]["train"]["shards"]:  # the manifest's checksums are the files'
        assert s["sha256"] == pp.file_sha256(str(tmp_path / "out" / s["path"]))


def test_hf_tokenizer_and_cli_hooks(tmp_path, capsys):
    texts = write_text_corpus(tmp_path / "in", 20, nested=False)
    tok_path = train_hf_tokenizer(tmp_path / "tokenizer.json", texts)
    args = cli._parser().parse_args(
        [
            "data",
            "prepare",
            "--input",
            str(tmp_path / "in"),
            "--output",
            str(tmp_path / "out"),
            "--tokenizer",
            tok_path,
            "--shard-mb",
            "0.002",
            "--validation-fraction",
            "0.2",
        ]
    )
    assert pp.run(args) == 0
    out = capsys.readouterr().out
    assert "prepared" in out and "data.source=shards" in out and "hf " in out
    tok = load_tokenizer(tok_path)
    m = json.loads((tmp_path / "out" / "manifest.json").read_text())
    assert m["tokenizer"] == tok.spec()
    for split in ("train", "validation"):
        expected = _text_split_docs(tmp_path / "in", split, tok, 0.2)
        got = _all_docs(tmp_path / "out", split)
        assert len(got) == len(expected) > 0 and all(np.array_equal(a, b) for a, b in zip(got, expected))
    assert tok.decode(got[0]).startswith("doc ")


def test_resume_after_kill_is_identical(tmp_path):
    write_text_corpus(tmp_path / "in", 30)
    src, out = str(tmp_path / "in"), tmp_path / "out"
    kw = dict(shard_mb=0.004, record_tokens=500, validation_fraction=0.1)
    m = pp.prepare("text", src, str(out), **kw)
    reference = _tree(out)
    shard0 = out / m["splits"]["train"]["shards"][0]["path"]
    # A kill mid-run: one shard lost, one corrupted, a temporary file left behind, no manifest.
    os.remove(shard0)
    victim = out / m["splits"]["train"]["shards"][1]["path"]
    victim.write_bytes(victim.read_bytes()[:-7] + b"garbage")
    (out / "train" / "shard-00002.arrayrecord.tmp.12345").write_bytes(b"partial")
    os.remove(out / "manifest.json")
    lines = []
    m2 = pp.prepare("text", src, str(out), log=lines.append, **kw)
    assert m2 == m and _tree(out) == reference
    assert lines[0].startswith(f"{m['units'] - 2} of {m['units']} units already prepared")
    assert len(lines) == 3  # only the two damaged units were redone
    # A finished directory is verified and left as it is.
    assert pp.prepare("text", src, str(out), **kw) == m and _tree(out) == reference
    # A uncommitted unit (commit record missing) is redone even though its shard is intact.
    os.remove(out / "work" / "unit-00000.json")
    lines = []
    assert pp.prepare("text", src, str(out), log=lines.append, **kw) == m and _tree(out) == reference
    assert len(lines) == 2


def test_small_corpus_gets_one_validation_document(tmp_path):
    write_text_corpus(tmp_path / "in", 12, max_words=40)
    root = tmp_path / "in"
    keys = sorted(os.path.relpath(os.path.join(d, f), root) for d, _, fs in os.walk(root) for f in fs)
    assert min(pp.hash_fraction(k) for k in keys) >= 0.01  # none falls below the default fraction
    lines = []
    m = pp.prepare("text", str(tmp_path / "in"), str(tmp_path / "out"), shard_mb=0.001, log=lines.append)
    assert m["splits"]["validation"]["documents"] == 1 and m["splits"]["train"]["documents"] == 11
    smallest = min(keys, key=pp.hash_fraction)
    assert any(repr(smallest) in line for line in lines)
    valid = sh.ShardDocuments(tmp_path / "out", "validation")[0]
    assert ByteTokenizer().decode(valid) == (tmp_path / "in" / smallest).read_text()
    # Deterministic: a second preparation and a rerun over the finished directory are the same.
    reference = _tree(tmp_path / "out")
    assert pp.prepare("text", str(tmp_path / "in"), str(tmp_path / "again"), shard_mb=0.001) == m
    assert _tree(tmp_path / "again") == reference
    assert pp.prepare("text", str(tmp_path / "in"), str(tmp_path / "out"), shard_mb=0.001) == m
    # The forced unit lost: redone, forced again, identical.
    forced = next(p for p in os.listdir(tmp_path / "out" / "validation") if p.startswith("shard"))
    os.remove(tmp_path / "out" / "validation" / forced)
    assert pp.prepare("text", str(tmp_path / "in"), str(tmp_path / "out"), shard_mb=0.001) == m
    assert _tree(tmp_path / "out") == reference
    # A fraction of 0 asks for no validation split.
    m0 = pp.prepare("text", str(tmp_path / "in"), str(tmp_path / "none"), validation_fraction=0)
    assert m0["splits"]["validation"]["documents"] == 0 and m0["splits"]["train"]["documents"] == 12
    with pytest.raises(ValueError, match="no documents in split 'validation'.*--validation-fraction F > 0"):
        sh.ShardDocuments(tmp_path / "none", "validation")
    with pytest.raises(ValueError, match="--validation-fraction 1.5 must be in"):
        pp.prepare("text", str(tmp_path / "in"), str(tmp_path / "bad"), validation_fraction=1.5)


def test_splits_by_path_for_text_and_jsonl(tmp_path):
    write_text_corpus(tmp_path / "in" / "train", 6, nested=False)
    write_text_corpus(tmp_path / "in" / "valid", 2, seed=1, nested=False)
    m = pp.prepare("text", str(tmp_path / "in"), str(tmp_path / "out"), splits="train=train,validation=valid")
    assert m["splits"]["train"]["documents"] == 6 and m["splits"]["validation"]["documents"] == 2
    (tmp_path / "in" / "stray.txt").write_text("outside both splits")
    with pytest.raises(ValueError, match="'stray.txt' lies under none of"):
        pp.prepare("text", str(tmp_path / "in"), str(tmp_path / "out2"), splits="train=train,validation=valid")
    with pytest.raises(ValueError, match="does not exist"):
        pp.prepare("text", str(tmp_path / "in"), str(tmp_path / "out2"), splits="train=nosuch")
    with pytest.raises(ValueError, match="write train=PATH,validation=PATH"):
        pp.prepare("text", str(tmp_path / "in"), str(tmp_path / "out2"), splits="test=valid")
    (tmp_path / "j").mkdir()
    for name, n in (("train.jsonl", 5), ("dev.jsonl", 2)):
        (tmp_path / "j" / name).write_text("".join(json.dumps({"text": f"{name} {i}"}) + "\n" for i in range(n)))
    m = pp.prepare(
        "jsonl", str(tmp_path / "j"), str(tmp_path / "jout"), splits="train=train.jsonl,validation=dev.jsonl"
    )
    assert m["splits"]["train"]["documents"] == 5 and m["splits"]["validation"]["documents"] == 2
    with pytest.raises(ValueError, match="needs --input to be a directory"):
        pp.prepare("jsonl", str(tmp_path / "j" / "dev.jsonl"), str(tmp_path / "jout2"), splits="train=dev.jsonl")


def test_parallel_workers_write_identical_shards(tmp_path):
    write_text_corpus(tmp_path / "in", 24)
    one = pp.prepare("text", str(tmp_path / "in"), str(tmp_path / "one"), shard_mb=0.004, workers=1)
    two = pp.prepare("text", str(tmp_path / "in"), str(tmp_path / "two"), shard_mb=0.004, workers=2)
    assert one["units"] >= 4 and one == two
    assert _tree(tmp_path / "one") == _tree(tmp_path / "two")


def test_jsonl_byte_ranges(tmp_path):
    rng = np.random.default_rng(1)
    (tmp_path / "in").mkdir()
    texts = []
    for name in ("a.jsonl", "b.jsonl"):
        lines = []
        for i in range(25):
            text = f"{name} line {i}: " + " ".join(rng.choice(WORDS, int(rng.integers(1, 60))))
            texts.append((name, text))
            lines.append(json.dumps({"id": i, "content": text}))
        lines.insert(3, "")  # blank lines are skipped
        (tmp_path / "in" / name).write_text("\n".join(lines) + "\n")
    m = pp.prepare("jsonl", str(tmp_path / "in"), str(tmp_path / "out"), text_key="content", shard_mb=0.0005)
    assert m["units"] > 4 and m["documents"] == 50
    tok = ByteTokenizer()
    got = {tok.decode(d) for split in ("train", "validation") for d in _all_docs(tmp_path / "out", split)}
    assert got == {t for _, t in texts}
    # Order within a split is file order, then line order.
    train = [tok.decode(d) for d in _all_docs(tmp_path / "out", "train")]
    assert train == [t for t in (t for _, t in texts) if t in set(train)]
    # Unit boundaries do not change the result.
    m_one = pp.prepare("jsonl", str(tmp_path / "in"), str(tmp_path / "one"), text_key="content", shard_mb=64)
    assert m_one["units"] == 2 and m_one["splits"]["train"]["documents"] == m["splits"]["train"]["documents"]
    assert [tok.decode(d) for d in _all_docs(tmp_path / "one", "train")] == train
    with pytest.raises(ValueError, match="no string field 'text'"):
        pp.prepare("jsonl", str(tmp_path / "in" / "a.jsonl"), str(tmp_path / "bad"))


def test_tfds_dataset(tmp_path):
    import tensorflow_datasets as tfds

    builder = tfds_builder(tmp_path / "tfds")
    m = pp.prepare(
        "tfds", str(tmp_path / "tfds"), str(tmp_path / "out"), tfds_name=builder.name, docs_per_shard=4, workers=2
    )
    assert m["source"]["splits"] == {"train": "train", "validation": "validation"}
    assert m["splits"]["train"]["documents"] == 10 and m["splits"]["validation"]["documents"] == 3
    assert len(m["splits"]["train"]["shards"]) == 3
    tok = ByteTokenizer()
    train = [tok.decode(d) for d in _all_docs(tmp_path / "out", "train")]
    source = tfds.data_source(builder.name, split="train", data_dir=str(tmp_path / "tfds"))
    assert train == [source[i]["text"].decode() for i in range(10)]  # TFDS's record order
    assert sorted(train) == sorted(f"doc {i}: " + "lorem ipsum " * (20 + i) for i in range(10))
    m2 = pp.prepare(
        "tfds", str(tmp_path / "tfds"), str(tmp_path / "hashed"), tfds_name=builder.name, splits="train=validation"
    )
    assert m2["splits"]["train"]["documents"] == 3 and m2["splits"]["validation"]["documents"] == 0
    with pytest.raises(ValueError, match="cannot open TFDS dataset 'no_such_dataset_xyz'"):
        pp.prepare("tfds", str(tmp_path / "tfds"), str(tmp_path / "x"), tfds_name="no_such_dataset_xyz")


def test_hugging_face_datasets_directory(tmp_path):
    import datasets

    rows = {"train": [f"train row {i} " + "word " * i for i in range(30)], "test": [f"test row {i}" for i in range(7)]}
    dd = datasets.DatasetDict(
        {k: datasets.Dataset.from_dict({"body": v, "n": list(range(len(v)))}) for k, v in rows.items()}
    )
    dd.save_to_disk(str(tmp_path / "hf"), max_shard_size="1KB")
    m = pp.prepare("hf", str(tmp_path / "hf"), str(tmp_path / "out"), text_key="body", docs_per_shard=8)
    assert m["source"]["splits"] == {"train": "train", "test": "validation"}
    tok = ByteTokenizer()
    train = [tok.decode(d) for d in _all_docs(tmp_path / "out", "train")]
    assert train == rows["train"]
    assert [tok.decode(d) for d in _all_docs(tmp_path / "out", "validation")] == rows["test"]
    # A single Dataset (no DatasetDict) with only a train split is split by hash.
    datasets.Dataset.from_dict({"text": rows["train"]}).save_to_disk(str(tmp_path / "single"))
    m = pp.prepare("hf", str(tmp_path / "single"), str(tmp_path / "out2"))
    assert m["source"]["splits"] == {"train": "hash"} and m["documents"] == 30
    assert 0 < m["splits"]["validation"]["documents"] < 30
    with pytest.raises(ValueError, match="no column 'missing'"):
        pp.prepare("hf", str(tmp_path / "single"), str(tmp_path / "out3"), text_key="missing")


def test_clear_errors(tmp_path):
    write_text_corpus(tmp_path / "in", 5)
    with pytest.raises(ValueError, match="is not a directory"):
        pp.prepare("text", str(tmp_path / "missing"), str(tmp_path / "out"))
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match="holds no files"):
        pp.prepare("text", str(tmp_path / "empty"), str(tmp_path / "out"))
    (tmp_path / "only_empty").mkdir()
    (tmp_path / "only_empty" / "a.txt").write_text("")
    with pytest.raises(ValueError, match="yielded no non-empty documents"):
        pp.prepare("text", str(tmp_path / "only_empty"), str(tmp_path / "out_empty"))
    with pytest.raises(ValueError, match="unknown tokenizer 'gpt9'"):
        pp.prepare("text", str(tmp_path / "in"), str(tmp_path / "out"), tokenizer="gpt9")
    with pytest.raises(ValueError, match="--source 'csv' is unknown"):
        pp.prepare("csv", str(tmp_path / "in"), str(tmp_path / "out"))
    with pytest.raises(ValueError, match="--workers 0 must be >= 1"):
        pp.prepare("text", str(tmp_path / "in"), str(tmp_path / "out"), workers=0)
    pp.prepare("text", str(tmp_path / "in"), str(tmp_path / "out"))
    with pytest.raises(ValueError, match="holds a different preparation \\(differs in record_tokens\\)"):
        pp.prepare("text", str(tmp_path / "in"), str(tmp_path / "out"), record_tokens=7)
    (tmp_path / "in" / "new.txt").write_text("a new file changes the plan")
    with pytest.raises(ValueError, match="differs in source, units"):
        pp.prepare("text", str(tmp_path / "in"), str(tmp_path / "out"))
    (tmp_path / "other").mkdir()
    (tmp_path / "other" / "notes.txt").write_text("mine")
    with pytest.raises(ValueError, match="is not empty and holds no zoo preparation"):
        pp.prepare("text", str(tmp_path / "in"), str(tmp_path / "other"))
    shutil.rmtree(tmp_path / "out" / "validation")
    os.remove(tmp_path / "out" / "manifest.json")
    with pytest.raises(ValueError, match="has no manifest.json; prepare it first"):
        sh.ShardDocuments(str(tmp_path / "out"))
