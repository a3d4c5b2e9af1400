"""Grain input pipelines: examples -> per-host batches -> global arrays, with checkpointable state.

Sources (`data.source`): synthetic tasks; `text` and `tfds` (tokenized into memory; `text` with
`data.path=''` is the embedded stdlib corpus, refused when `data.allow_toy` is False); `shards`, a
directory written by `zoo data prepare` (`zoo.data.prepare`), read lazily.

Three modes, chosen by `data.mode`:
- "fixed": every step has `data.batch_size` sequences of `data.seq_len` tokens (plus the shifted
  target), from a synthetic task or from documents joined with the tokenizer's EOS token and
  chunked (the concat-and-chunk baseline; lazy, rows are located from the length index). Each
  host reads only its own shard of rows (`process_index::process_count`).
- "packed": documents (+ EOS) cut into pieces of at most seq_len + 1 tokens and packed into rows
  by Grain's first-fit packer; batches also carry `segment_ids` and `positions` [B, T]
  (`zoo.data.packing`), and each host packs its own documents (`process_index::process_count`).
- "decomposition" (Pouransari et al., 2024): documents are cut into power-of-two pieces that never
  cross a document boundary (`zoo.data.decomposition`); step s trains on one bucket 2^k with
  batch tokens_per_step / 2^k, the bucket drawn by the curriculum as a pure function of
  (seed, s), identical on every host. Synthetic tasks are generated directly at length 2^k.
The iterator state is a small JSON dict saved in every checkpoint, so a resumed run continues
with exactly the batches an uninterrupted run would have seen.
"""

from __future__ import annotations

from typing import Any

import grain
import numpy as np

from zoo.data import decomposition as dd
from zoo.data import ruler, synthetic
from zoo.data.offsets import BlockCumsum, document_lengths, read_tokens
from zoo.data.packing import DocumentPieces, packed_inputs
from zoo.data.schedule import BucketBatcher, BucketSchedule, host_slice
from zoo.data.shards import ShardDocuments, read_manifest
from zoo.data.text import TextFiles, TfdsDocuments
from zoo.data.tokenizers import load_tokenizer, tokenizer_for

SOURCES = ("passkey", "recall", "mqar", "selective_copy", "passkey_recall", *ruler.TASKS, "text", "tfds", "shards")
DOCUMENT_SOURCES = ("text", "tfds", "shards")
MODES = ("fixed", "decomposition", "packed")
BATCH_KEYS = ("inputs", "targets", "loss_mask", "answer_mask")
PACKED_KEYS = (*BATCH_KEYS, "segment_ids", "positions")
# Background reading: a few threads and a short buffer (Grain's default buffers 500 elements, which
# for batches of a large run is gigabytes). Neither changes the batches nor the iterator state.
READ_OPTIONS = grain.ReadOptions(num_threads=2, prefetch_buffer_size=4)


class ConcatChunks:
    """Documents joined into one stream, each followed by the EOS token, cut into rows of `length + 1`.

    Row i is stream[i * length: (i + 1) * length + 1] (consecutive rows share one token, so every
    next-token pair is trained once). Nothing is concatenated in memory: the document and offset
    of a row's first token come from block prefix sums of `lengths + 1` (`zoo.data.offsets`), and
    only the documents (for shards: the records) the row covers are read.
    """

    def __init__(self, docs, length: int, eos_id: int):
        self.docs, self.length, self.eos_id = docs, int(length), int(eos_id)
        self.lengths = document_lengths(docs)  # [D]
        self.stream = BlockCumsum(self.lengths, lambda n: n + 1)
        if self.stream.total < self.length + 1:
            raise ValueError(
                f"the text has {self.stream.total} tokens (with EOS), fewer than one sequence of "
                f"{self.length + 1}; lower data.seq_len or add documents"
            )

    def __len__(self) -> int:
        return (self.stream.total - 1) // self.length

    def __getitem__(self, i: int) -> dict[str, np.ndarray]:
        if not 0 <= i < len(self):
            raise IndexError(f"row {i} is out of range [0, {len(self)})")
        d, offset = self.stream.locate(int(i) * self.length)
        parts, need = [], self.length + 1
        while need > 0:
            n = int(self.lengths[d])
            if offset < n:
                part = read_tokens(self.docs, d, offset, min(n, offset + need))
                parts.append(part)
                need -= len(part)
            if need > 0:  # the row reaches this document's end: its EOS, then the next document
                parts.append(np.array([self.eos_id], np.int32))
                need -= 1
                d, offset = d + 1, 0
        tokens = np.concatenate(parts).astype(np.int32)  # [length + 1]
        ones = np.ones(self.length, np.float32)
        return {"tokens": tokens, "loss_mask": ones, "answer_mask": ones}


def is_toy(data: Any) -> bool:
    """Whether `data` reads the embedded stdlib corpus (source 'text' with no path)."""
    return data.source == "text" and not data.path


def check_toy(data: Any) -> None:
    """Refuses the embedded stdlib corpus unless `data.allow_toy` (pod presets set it to False)."""
    if is_toy(data) and not data.get("allow_toy", True):
        raise ValueError(
            "data.source='text' with data.path='' is the embedded stdlib corpus (toy data, ~11 MB); "
            "tokenize a real corpus with `zoo data prepare --output DIR ...` and set "
            "data.source=shards data.path=DIR, or set data.allow_toy=True to train on it anyway"
        )


def documents(data: Any, split: str):
    """The document collection of a text, TFDS or shards source (`len`, `[d]`, `lengths`, `eos_id`)."""
    if data.source == "shards":
        docs = ShardDocuments(data.path, split)
        name = data.get("tokenizer", "")
        if name:  # an explicit tokenizer must be the one the shards were prepared with
            spec = load_tokenizer(name).spec()
            if (spec["kind"], spec.get("sha256")) != (docs.tokenizer_spec["kind"], docs.tokenizer_spec.get("sha256")):
                raise ValueError(
                    f"data.tokenizer {name!r} is not the tokenizer {data.path!r} was prepared with "
                    f"({docs.tokenizer_spec.get('path', docs.tokenizer_spec['kind'])}); set "
                    "data.tokenizer='' to use the manifest's"
                )
        return docs
    tok = tokenizer_for(data)
    if data.source == "text":
        return TextFiles(data.path, split, tok)
    return TfdsDocuments(
        data.tfds_name,
        data.tfds_split if split == "train" else "test" if split == "test" else "validation",
        data.tfds_data_dir,
        data.tfds_text_key,
        tok,
    )


def example_source(data: Any, split: str, length: int, depth: float | None = None):
    """A random-access source of examples of `length` tokens for `data.source`."""
    seed = data.seed + (0 if split == "train" else 1_000_003)
    if data.source == "passkey":
        d = depth if depth is not None else (None if data.depth < 0 else data.depth)
        return synthetic.Passkey(length, depth=d, seed=seed, answer_only=data.answer_only)
    if data.source == "recall":
        return synthetic.AssociativeRecall(length, data.num_pairs, data.num_queries, seed=seed)
    if data.source == "mqar":
        return synthetic.MQAR(length, data.num_pairs, data.power_a, seed=seed)
    if data.source == "selective_copy":
        return synthetic.SelectiveCopy(length, data.num_data, seed=seed)
    if data.source == "passkey_recall":
        return synthetic.PasskeyRecall(
            length, seed=seed, answer_only=data.answer_only, num_pairs=data.num_pairs, num_queries=data.num_queries
        )
    if data.source in ruler.TASKS:
        return ruler.TASKS[data.source](length, seed=seed)
    if data.source in DOCUMENT_SOURCES:
        docs = documents(data, split)
        return ConcatChunks(docs, length, docs.eos_id)
    raise ValueError(f"unknown data.source {data.source!r}; choose one of {SOURCES}")


def to_model_inputs(example: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """An example's `tokens` [T+1] as inputs [T] and next-token targets [T], with its loss and answer masks."""
    tokens = np.asarray(example["tokens"], np.int32)
    return {
        "inputs": tokens[:-1],
        "targets": tokens[1:],
        "loss_mask": example["loss_mask"],
        "answer_mask": example["answer_mask"],
    }


def check_vocab(batch: dict[str, np.ndarray], vocab_size: int, where: str) -> None:
    """Token ids must lie in [0, vocab_size); an embedding lookup would silently clamp them."""
    for key in ("inputs", "targets"):
        lo, hi = int(batch[key].min()), int(batch[key].max())
        if lo < 0 or hi >= vocab_size:
            bad = hi if hi >= vocab_size else lo
            raise ValueError(
                f"token id {bad} in {where} is outside the vocabulary [0, {vocab_size}); set "
                f"--config.model.vocab_size to at least {hi + 1} or use a tokenizer that fits"
            )


class _GrainBatches:
    """A Grain iterator of per-host batches whose state (a small JSON dict) is checkpointable.

    `keys` names the arrays of every batch; `global_shapes` lists the global [batch, length] shapes
    it yields (one, or one per decomposition bucket) and `max_shape` the longest of them.
    """

    _iter: grain.DatasetIterator
    keys: tuple[str, ...] = BATCH_KEYS
    global_shapes: tuple[tuple[int, int], ...]

    @property
    def max_shape(self) -> tuple[int, int]:
        """The global [batch, length] of the longest batch (what a step's memory is checked at)."""
        return max(self.global_shapes, key=lambda shape: shape[1])

    def __iter__(self):
        return self

    def __next__(self) -> dict[str, np.ndarray]:
        return next(self._iter)

    def get_state(self) -> dict:
        return self._iter.get_state()

    def set_state(self, state: dict) -> None:
        self._iter.set_state(state)


class FixedLengthBatches(_GrainBatches):
    """Per-host batches of fixed shape [batch_size / process_count, seq_len]."""

    def __init__(
        self,
        data: Any,
        split: str = "train",
        *,
        process_index: int = 0,
        process_count: int = 1,
        length: int | None = None,
        batch_size: int | None = None,
    ):
        batch_size = batch_size or data.batch_size
        if batch_size % process_count:
            raise ValueError(f"data.batch_size {batch_size} must be divisible by the {process_count} processes")
        source = example_source(data, split, length or data.seq_len)
        ds = grain.MapDataset.source(source)
        if data.source in DOCUMENT_SOURCES:
            ds = ds.shuffle(seed=data.seed).repeat(None)
        ds = ds[process_index::process_count].map(to_model_inputs)
        self.dataset = ds.batch(batch_size // process_count, drop_remainder=True)
        self._iter = iter(self.dataset.to_iter_dataset(READ_OPTIONS))
        self.global_shapes = ((batch_size, length or data.seq_len),)


class PackedBatches(_GrainBatches):
    """Per-host batches of packed rows [batch_size / process_count, seq_len] with segment ids.

    Pieces of this host's documents (`zoo.data.packing.DocumentPieces`) are shuffled per epoch,
    repeated, and packed first-fit into `data.pack_bins` open rows at a time by Grain's
    `FirstFitPackIterDataset`; the iterator state (parent position + next row) is a small JSON dict.
    Every batch has the keys `PACKED_KEYS`.
    """

    def __init__(
        self,
        data: Any,
        split: str = "train",
        *,
        process_index: int = 0,
        process_count: int = 1,
        length: int | None = None,
        batch_size: int | None = None,
    ):
        from grain.experimental import FirstFitPackIterDataset

        if data.source not in DOCUMENT_SOURCES:
            raise ValueError(
                f"data.mode='packed' packs documents; data.source {data.source!r} is a synthetic task of "
                f"fixed-length examples: use one of {DOCUMENT_SOURCES} or data.mode='fixed'"
            )
        batch_size = batch_size or data.batch_size
        if batch_size % process_count:
            raise ValueError(f"data.batch_size {batch_size} must be divisible by the {process_count} processes")
        length = length or data.seq_len
        bins = int(data.get("pack_bins", 64))
        if bins < 1:
            raise ValueError(f"data.pack_bins {bins} must be >= 1 (rows packed at a time; 64 is a good default)")
        docs = documents(data, split)
        self.pieces = DocumentPieces(
            docs, length, docs.eos_id, process_index=process_index, process_count=process_count
        )
        ds = (
            grain.MapDataset.source(self.pieces)
            .shuffle(seed=data.seed)
            .repeat(None)
            .to_iter_dataset(grain.ReadOptions(num_threads=2, prefetch_buffer_size=4 * bins))
        )
        ds = FirstFitPackIterDataset(
            ds, length_struct={"tokens": length + 1}, num_packing_bins=bins, shuffle_bins=False
        )
        self.dataset = ds.map(packed_inputs).batch(batch_size // process_count, drop_remainder=True)
        self._iter = iter(self.dataset)
        self.keys = PACKED_KEYS
        self.global_shapes = ((batch_size, length),)


def make_batches(data: Any, split: str = "train", *, process_index: int = 0, process_count: int = 1):
    """The training batch iterator for `data.mode` (fixed-length, decomposition buckets or packed)."""
    if data.source not in SOURCES:
        raise ValueError(f"unknown data.source {data.source!r}; choose one of {SOURCES}")
    check_toy(data)
    if data.mode == "fixed":
        return FixedLengthBatches(data, split, process_index=process_index, process_count=process_count)
    if data.mode == "decomposition":
        return DecompositionBatches(data, split, process_index=process_index, process_count=process_count)
    if data.mode == "packed":
        return PackedBatches(data, split, process_index=process_index, process_count=process_count)
    raise ValueError(f"unknown data.mode {data.mode!r}; choose one of {MODES}")


class DecompositionBatches(_GrainBatches):
    """Variable-length batches from dataset-decomposition buckets; state = the next step."""

    def __init__(self, data: Any, split: str = "train", *, process_index: int = 0, process_count: int = 1):
        ks = list(range(data.min_log2, data.max_log2 + 1))
        self.process_index, self.process_count = process_index, process_count
        fixed_k = data.max_log2 if data.curriculum == "fixed" else None
        if data.source in DOCUMENT_SOURCES:  # the index needs only the length index, never the tokens
            docs = documents(data, split)
            self.index = dd.BucketIndex.from_lengths(
                document_lengths(docs), min_log2=data.min_log2, max_log2=data.max_log2, seed=data.seed, source=docs
            )
            self.schedule = BucketSchedule(
                ks,
                data.tokens_per_step,
                data.curriculum,
                data.seed,
                fixed_k=fixed_k,
                availability=self.index.tokens_per_bucket(),
            )
            self.batcher = BucketBatcher(self.index, self.schedule)
            self.tasks = None
        else:  # synthetic tasks: each bucket is the task generated at length 2^k
            self.index = self.batcher = None
            self.schedule = BucketSchedule(ks, data.tokens_per_step, data.curriculum, data.seed, fixed_k=fixed_k)
            self.tasks = {k: example_source(data, split, 1 << k) for k in ks}
        for k in ks:
            if self.schedule.batch_size(k) % process_count:
                raise ValueError(
                    f"bucket 2^{k} has a global batch of {self.schedule.batch_size(k)}, not divisible "
                    f"by {process_count} processes; raise data.tokens_per_step"
                )
        ds = grain.MapDataset.range(2**62).map(self.batch)
        self._iter = iter(ds.to_iter_dataset(READ_OPTIONS))
        self.global_shapes = tuple((b, 1 << k) for k, b in sorted(self.schedule.batch_sizes.items()))

    def batch(self, step: int) -> dict[str, np.ndarray]:
        """This host's shard of the global batch of `step` (a pure function of the step)."""
        if self.tasks is None:
            k, tokens = self.batcher.host_batch(int(step), self.process_index, self.process_count)
            ones = np.ones((tokens.shape[0], 1 << k), np.float32)
            return {
                "inputs": tokens[:, :-1].astype(np.int32),
                "targets": tokens[:, 1:].astype(np.int32),
                "loss_mask": ones,
                "answer_mask": ones,
            }
        k, j = self.schedule.position(int(step))
        b = self.schedule.batch_size(k)
        ids = host_slice(j * b + np.arange(b), self.process_index, self.process_count)
        items = [to_model_inputs(self.tasks[k][int(i)]) for i in ids]
        return {key: np.stack([it[key] for it in items]) for key in items[0]}


def tokens_per_step(data: Any) -> int:
    """Input tokens of one global step: `tokens_per_step` in decomposition mode, else batch x length."""
    return int(data.tokens_per_step) if data.mode == "decomposition" else int(data.batch_size) * int(data.seq_len)


def describe(data: Any, steps: int = 0) -> str:
    """A few lines for `zoo info`: the corpus, its tokenizer, documents and tokens per split, and the
    tokens (and epochs of the training split) a run of `steps` steps will use.

    Text and TFDS sources are tokenized to count (what training would do first); shards are read
    from their manifest; synthetic tasks are generated without end.
    """
    from zoo.data.text import default_corpus_dir
    from zoo.data.tokenizers import describe_spec

    per_step = tokens_per_step(data)
    run = f"run        {steps:,} steps x {per_step:,} tokens/step = {steps * per_step:,} tokens"
    if data.source not in DOCUMENT_SOURCES:
        return "\n".join(
            [
                f"corpus     synthetic task {data.source!r}, generated on the fly (no epochs)",
                "tokenizer  bytes (vocab 256)",
                run,
            ]
        )
    if data.source == "shards":
        manifest = read_manifest(data.path)
        src = manifest["source"]
        corpus = f"shards {data.path} (zoo data prepare of {src['kind']} {src.get('path') or src.get('name', '')})"
        spec = manifest["tokenizer"]
        counts = {k: (v["documents"], v["tokens"]) for k, v in manifest["splits"].items()}
    else:
        if is_toy(data):
            corpus = f"embedded stdlib corpus ({default_corpus_dir()}, toy data; data.allow_toy={data.allow_toy})"
        elif data.source == "text":
            corpus = f"text files under {data.path} (tokenized into memory)"
        else:
            corpus = f"tfds {data.tfds_name} in {data.tfds_data_dir or 'the default data_dir'} (tokenized into memory)"
        counts, spec = {}, None
        for split in ("train", "validation"):
            try:
                docs = documents(data, split)
            except ValueError:  # e.g. a corpus too small to have a validation document
                counts[split] = (0, 0)
                continue
            counts[split] = (len(docs), int(np.sum(docs.lengths)))
            spec = docs.tokenizer_spec
        spec = spec or tokenizer_for(data).spec()
    lines = [f"corpus     {corpus}", f"tokenizer  {describe_spec(spec)}"]
    for split, (n_docs, n_tokens) in counts.items():
        lines.append(f"{split:<10} {n_docs:,} documents, {n_tokens:,} tokens")
    train_tokens = counts.get("train", (0, 0))[1]
    if train_tokens:
        run += f" = {steps * per_step / train_tokens:.2f} epochs of train (mode {data.mode})"
    lines.append(run)
    return "\n".join(lines)
