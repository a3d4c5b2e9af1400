"""Reading prepared shards keeps memory bounded: streaming a corpus 8x larger does not grow the
process by more than a few MiB, far below the corpus's own size as int32 tokens."""

import numpy as np
from data_testing import data_config

from zoo.data import pipeline as pl
from zoo.data.prepare import prepare
from zoo.data.shards import ShardDocuments

MIB = 1 << 20


def _rss() -> int:
    """Resident set size of this process in bytes (Linux)."""
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * 4096


def _corpus(root, files: int, size: int, seed: int) -> str:
    rng = np.random.default_rng(seed)
    (root / "text").mkdir(parents=True)
    for i in range(files):
        (root / "text" / f"{i:05d}.txt").write_bytes(rng.integers(97, 123, size).astype(np.uint8).tobytes())
    prepare("text", str(root / "text"), str(root / "shards"), shard_mb=1, record_tokens=4096)
    return str(root / "shards")


def _stream(path: str) -> int:
    """Reads every training document, every concat-and-chunk row and one packed epoch; returns the
    RSS growth in bytes measured after a warm-up (readers opened, buffers allocated)."""
    docs = ShardDocuments(path)
    rows = pl.FixedLengthBatches(data_config(source="shards", path=path, seq_len=1024, batch_size=8))
    packed = pl.make_batches(
        data_config(source="shards", path=path, mode="packed", seq_len=1024, batch_size=8, pack_bins=16)
    )
    n_rows = len(pl.example_source(data_config(source="shards", path=path), "train", 1024)) // 8  # batches / epoch
    n_packed = docs.num_tokens // (8 * 1024)
    warm = max(1, len(docs) // 20)
    checksum = sum(int(docs[d][:8].sum()) for d in range(warm)) + int(next(rows)["inputs"].sum())
    checksum += int(next(packed)["inputs"].sum())
    before = _rss()
    for d in range(warm, len(docs)):
        checksum += int(docs[d][-8:].sum())
    for _ in range(n_rows - 1):
        checksum += int(next(rows)["inputs"][:, 0].sum())
    for _ in range(n_packed):
        checksum += int(next(packed)["targets"][:, -1].sum())
    assert checksum > 0
    return _rss() - before


def test_streaming_shards_does_not_grow_with_the_corpus(tmp_path):
    small = _corpus(tmp_path / "small", 32, 32_000, seed=0)  # 1 M tokens
    large = _corpus(tmp_path / "large", 256, 32_000, seed=1)  # 8 M tokens = 32 MiB as int32
    assert ShardDocuments(large).num_tokens > 7 * ShardDocuments(small).num_tokens
    grow_small = _stream(small)
    grow_large = _stream(large)
    tokens_bytes = 4 * ShardDocuments(large).num_tokens
    assert grow_large < 12 * MIB < tokens_bytes / 2, (grow_small / MIB, grow_large / MIB)
    assert grow_large < grow_small + 8 * MIB, (grow_small / MIB, grow_large / MIB)
