"""Grain input pipelines: examples -> per-host batches -> global arrays, with checkpointable state.

Two modes, chosen by `data.mode`:
- "fixed": every step has `data.batch_size` sequences of `data.seq_len` tokens (plus the shifted
  target), from a synthetic task or from text documents concatenated and chunked (the
  concat-and-chunk baseline). Each host reads only its own shard (`process_index::process_count`).
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
from zoo.data import synthetic
from zoo.data.text import TextFiles, TfdsDocuments, Tokenizer

SOURCES = ("passkey", "recall", "selective_copy", "text", "tfds")


class ConcatChunks:
    """Documents concatenated into one stream and cut into chunks of `length + 1` tokens."""

    def __init__(self, docs, length: int):
        self.stream = np.concatenate([np.asarray(docs[i], np.int32) for i in range(len(docs))])
        self.length = length
        if len(self.stream) < length + 1:
            raise ValueError(f"the text has {len(self.stream)} tokens, fewer than one sequence of {length + 1}")

    def __len__(self) -> int:
        return (len(self.stream) - 1) // self.length

    def __getitem__(self, i: int) -> dict[str, np.ndarray]:
        tokens = self.stream[i * self.length: (i + 1) * self.length + 1]
        ones = np.ones(self.length, np.float32)
        return {"tokens": tokens, "loss_mask": ones, "answer_mask": ones}


def documents(data: Any, split: str):
    """The document collection of a text or TFDS source."""
    tok = Tokenizer(data.sp_model)
    if data.source == "text":
        return TextFiles(data.path, split, tok)
    return TfdsDocuments(data.tfds_name, data.tfds_split if split == "train" else "test" if split == "test"
                         else "validation", data.tfds_data_dir, data.tfds_text_key, tok)


def example_source(data: Any, split: str, length: int, depth: float | None = None):
    """A random-access source of examples of `length` tokens for `data.source`."""
    seed = data.seed + (0 if split == "train" else 1_000_003)
    if data.source == "passkey":
        d = depth if depth is not None else (None if data.depth < 0 else data.depth)
        return synthetic.Passkey(length, depth=d, seed=seed, answer_only=data.answer_only)
    if data.source == "recall":
        return synthetic.AssociativeRecall(length, data.num_pairs, data.num_queries, seed=seed)
    if data.source == "selective_copy":
        return synthetic.SelectiveCopy(length, data.num_data, seed=seed)
    if data.source in ("text", "tfds"):
        return ConcatChunks(documents(data, split), length)
    raise ValueError(f"unknown data.source {data.source!r}; choose one of {SOURCES}")


def to_model_inputs(example: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    tokens = np.asarray(example["tokens"], np.int32)
    return {"inputs": tokens[:-1], "targets": tokens[1:], "loss_mask": example["loss_mask"],
            "answer_mask": example["answer_mask"]}


def check_vocab(batch: dict[str, np.ndarray], vocab_size: int, where: str) -> None:
    """Token ids must lie in [0, vocab_size); an embedding lookup would silently clamp them."""
    for key in ("inputs", "targets"):
        lo, hi = int(batch[key].min()), int(batch[key].max())
        if lo < 0 or hi >= vocab_size:
            bad = hi if hi >= vocab_size else lo
            raise ValueError(f"token id {bad} in {where} is outside the vocabulary [0, {vocab_size}); set "
                             f"--config.model.vocab_size to at least {hi + 1} or use a tokenizer that fits")


class _GrainBatches:
    """A Grain iterator of per-host batches whose state (a small JSON dict) is checkpointable."""

    _iter: grain.DatasetIterator

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

    def __init__(self, data: Any, split: str = "train", *, process_index: int = 0, process_count: int = 1,
                 length: int | None = None, batch_size: int | None = None):
        batch_size = batch_size or data.batch_size
        if batch_size % process_count:
            raise ValueError(f"data.batch_size {batch_size} must be divisible by the {process_count} processes")
        source = example_source(data, split, length or data.seq_len)
        ds = grain.MapDataset.source(source)
        if data.source in ("text", "tfds"):
            ds = ds.shuffle(seed=data.seed).repeat(None)
        ds = ds[process_index::process_count].map(to_model_inputs)
        self.dataset = ds.batch(batch_size // process_count, drop_remainder=True)
        self._iter = iter(self.dataset.to_iter_dataset())


def make_batches(data: Any, split: str = "train", *, process_index: int = 0, process_count: int = 1):
    """The training batch iterator for `data.mode` (fixed-length or decomposition buckets)."""
    if data.source not in SOURCES:
        raise ValueError(f"unknown data.source {data.source!r}; choose one of {SOURCES}")
    if data.mode == "fixed":
        return FixedLengthBatches(data, split, process_index=process_index, process_count=process_count)
    if data.mode == "decomposition":
        return DecompositionBatches(data, split, process_index=process_index, process_count=process_count)
    raise ValueError(f"unknown data.mode {data.mode!r}; choose 'fixed' or 'decomposition'")


class DecompositionBatches(_GrainBatches):
    """Variable-length batches from dataset-decomposition buckets; state = the next step."""

    def __init__(self, data: Any, split: str = "train", *, process_index: int = 0, process_count: int = 1):
        ks = list(range(data.min_log2, data.max_log2 + 1))
        self.process_index, self.process_count = process_index, process_count
        fixed_k = data.max_log2 if data.curriculum == "fixed" else None
        if data.source in ("text", "tfds"):
            self.index = dd.BucketIndex.build(documents(data, split), min_log2=data.min_log2,
                                              max_log2=data.max_log2, seed=data.seed)
            self.schedule = dd.BucketSchedule(ks, data.tokens_per_step, data.curriculum, data.seed, fixed_k=fixed_k,
                                              availability=self.index.tokens_per_bucket())
            self.batcher = dd.BucketBatcher(self.index, self.schedule)
            self.tasks = None
        else:  # synthetic tasks: each bucket is the task generated at length 2^k
            self.index = self.batcher = None
            self.schedule = dd.BucketSchedule(ks, data.tokens_per_step, data.curriculum, data.seed, fixed_k=fixed_k)
            self.tasks = {k: example_source(data, split, 1 << k) for k in ks}
        for k in ks:
            if self.schedule.batch_size(k) % process_count:
                raise ValueError(f"bucket 2^{k} has a global batch of {self.schedule.batch_size(k)}, not divisible "
                                 f"by {process_count} processes; raise data.tokens_per_step")
        ds = grain.MapDataset.range(2**62).map(self.batch)
        self._iter = iter(ds.to_iter_dataset())

    def batch(self, step: int) -> dict[str, np.ndarray]:
        """This host's shard of the global batch of `step` (a pure function of the step)."""
        if self.tasks is None:
            k, tokens = self.batcher.host_batch(int(step), self.process_index, self.process_count)
            ones = np.ones((tokens.shape[0], 1 << k), np.float32)
            return {"inputs": tokens[:, :-1].astype(np.int32), "targets": tokens[:, 1:].astype(np.int32),
                    "loss_mask": ones, "answer_mask": ones}
        k, j = self.schedule.position(int(step))
        b = self.schedule.batch_size(k)
        ids = dd.host_slice(j * b + np.arange(b), self.process_index, self.process_count)
        items = [to_model_inputs(self.tasks[k][int(i)]) for i in ids]
        return {key: np.stack([it[key] for it in items]) for key in items[0]}
