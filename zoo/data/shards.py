"""Prepared token shards: the on-disk format of ``zoo data prepare`` and its lazy reader.

Layout of a prepared directory (``docs/data.md`` has the full description)::

    manifest.json                         format, tokenizer spec, source, counts, shards + sha256
    plan.json                             the work list of the preparation (resume bookkeeping)
    train/shard-00000.arrayrecord ...     ArrayRecord files (group_size:1) of int32 token records
    train/lengths.npy                     int64 [documents]: tokens of every document, global order
    validation/...                        the same for the validation split
    work/unit-00000.json ...              per-unit commit records (resume bookkeeping)

A document of ``n`` tokens is stored as ``ceil(n / record_tokens)`` consecutive records; each record
is the raw little-endian int32 token ids (``"<i4"``, no header) of ``record_tokens`` tokens (the last
one shorter). Documents are never empty. Records are in global document order across the shards of
a split, so document ``d``'s first record is ``sum_{e<d} ceil(len_e / record_tokens)``.

:class:`ShardDocuments` reads one split through Grain's ``ArrayRecordDataSource`` (readers opened
lazily, record indices offloaded to disk): ``len`` and per-shard counts come from the manifest, the
length index is a read-only memory map, and only the records a request touches are read, so memory
does not grow with the corpus.
"""

from __future__ import annotations

import dataclasses
import json
import os
from typing import Any

import numpy as np

from zoo.data.offsets import BlockCumsum

MANIFEST = "manifest.json"
PLAN = "plan.json"
FORMAT = "zoo-token-shards"
FORMAT_VERSION = 1
RECORD_DTYPE = "<i4"
WRITER_OPTIONS = "group_size:1"
READER_OPTIONS = {"index_storage_option": "offloaded", "footer_prefetch_bytes": "0"}
SPLITS = ("train", "validation")


def split_name(split: str) -> str:
    """The prepared split read for a pipeline split: train -> train; validation/test -> validation."""
    if split == "train":
        return "train"
    if split in ("validation", "test"):
        return "validation"
    raise ValueError(f"unknown split {split!r}; use 'train' or 'validation'")


def read_manifest(path: str) -> dict:
    """The manifest of a prepared directory; one-line ValueErrors for a missing or foreign one."""
    if not path:
        raise ValueError("data.source='shards' needs data.path, the output directory of `zoo data prepare`")
    file = os.path.join(path, MANIFEST)
    if not os.path.isfile(file):
        raise ValueError(
            f"data.path {path!r} has no {MANIFEST}; prepare it first: zoo data prepare --output {path} ..."
        )
    with open(file) as f:
        manifest = json.load(f)
    if manifest.get("format") != FORMAT or manifest.get("format_version") != FORMAT_VERSION:
        raise ValueError(
            f"{file} is not a {FORMAT} v{FORMAT_VERSION} manifest (format {manifest.get('format')!r} "
            f"v{manifest.get('format_version')!r}); prepare the data again with this zoo"
        )
    return manifest


@dataclasses.dataclass(frozen=True)
class _FileInstruction:
    """What ``ArrayRecordDataSource`` accepts instead of a path: it then opens no file to count records."""

    filename: str
    skip: int
    take: int
    examples_in_shard: int


def records_per_document(lengths: np.ndarray, record_tokens: int) -> np.ndarray:
    """``ceil(len / record_tokens)``: how many records each document occupies."""
    return -(-np.asarray(lengths, np.int64) // int(record_tokens))


def encode_records(tokens: np.ndarray, record_tokens: int) -> list[bytes]:
    """One document's records: consecutive slices of ``record_tokens`` tokens as little-endian int32 bytes."""
    data = np.ascontiguousarray(tokens, dtype=RECORD_DTYPE)  # [n]
    return [data[i : i + record_tokens].tobytes() for i in range(0, len(data), record_tokens)]


class ShardDocuments:
    """The documents of one split of a prepared directory, random access and lazy.

    ``len(docs)`` documents; ``docs[d]`` the int32 tokens ``[len_d]`` of document ``d``;
    ``docs.read(d, start, stop)`` only the records holding tokens ``start:stop``; ``docs.lengths`` the
    int64 length index (read-only memory map); ``docs.eos_id`` and ``docs.tokenizer_spec`` from the
    manifest.
    """

    def __init__(self, path: str, split: str = "train"):
        self.path = path
        self.manifest = read_manifest(path)
        self.split = split_name(split)
        info = self.manifest["splits"].get(self.split)
        if not info or not info["documents"]:
            raise ValueError(
                f"{path!r} has no documents in split {self.split!r} (splits: "
                f"{sorted(k for k, v in self.manifest['splits'].items() if v['documents'])}); "
                "prepare it again with a validation split (zoo data prepare --validation-fraction F > 0, or --splits)"
            )
        self.info = info
        self.tokenizer_spec = self.manifest["tokenizer"]
        self.eos_id = int(self.tokenizer_spec["eos_id"])
        self.record_tokens = int(self.manifest["record_tokens"])
        self.lengths = np.load(os.path.join(path, info["lengths"]), mmap_mode="r")  # [D] int64
        if len(self.lengths) != info["documents"]:
            raise ValueError(
                f"{info['lengths']} in {path!r} has {len(self.lengths)} entries, the manifest says "
                f"{info['documents']}; prepare the data again"
            )
        self.num_records = sum(s["records"] for s in info["shards"])
        self._records = BlockCumsum(self.lengths, lambda n: records_per_document(n, self.record_tokens))
        self._source = None

    @property
    def source(self):
        """Grain's ``ArrayRecordDataSource`` over the split's shards (created on first use)."""
        if self._source is None:
            import grain

            files = [
                _FileInstruction(os.path.join(self.path, s["path"]), 0, s["records"], s["records"])
                for s in self.info["shards"]
            ]
            self._source = grain.sources.ArrayRecordDataSource(files, reader_options=READER_OPTIONS)
        return self._source

    def __len__(self) -> int:
        return int(self.info["documents"])

    @property
    def num_tokens(self) -> int:
        return int(self.info["tokens"])

    def read(self, d: int, start: int = 0, stop: int | None = None) -> np.ndarray:
        """Tokens ``start:stop`` of document ``d`` (int32), reading only the records that hold them."""
        if not 0 <= d < len(self):
            raise IndexError(f"document {d} is out of range [0, {len(self)})")
        n = int(self.lengths[d])
        stop = n if stop is None else min(int(stop), n)
        start = max(int(start), 0)
        if start >= stop:
            return np.zeros(0, np.int32)
        first = self._records.start(d)
        r0, r1 = start // self.record_tokens, (stop - 1) // self.record_tokens
        keys = list(range(first + r0, first + r1 + 1))
        try:
            raw = self.source.__getitems__(keys) if len(keys) > 1 else [self.source[keys[0]]]
        except RuntimeError as e:  # Riegeli/ArrayRecord: a truncated or corrupted file
            raise self._damaged(keys[0], str(e).strip().splitlines()[0][:120]) from None
        tokens = np.frombuffer(b"".join(raw), RECORD_DTYPE).astype(np.int32)  # [(r1 - r0 + 1) * R or less]
        base = r0 * self.record_tokens
        out = tokens[start - base : stop - base]
        if len(out) != stop - start:  # records shorter than the length index says: a damaged shard
            raise self._damaged(keys[0], f"document {d} has {len(out)} of its tokens {start}:{stop}")
        return out

    def __getitem__(self, d: int) -> np.ndarray:
        return self.read(int(d))

    def _damaged(self, record: int, why: str) -> ValueError:
        """One line naming the shard that holds global record `record` of the split, and the fix."""
        ends = np.cumsum([s["records"] for s in self.info["shards"]])
        shard = self.info["shards"][min(int(np.searchsorted(ends, record, side="right")), len(ends) - 1)]
        return ValueError(
            f"{os.path.join(self.path, shard['path'])!r} is damaged ({why}); rerun the same `zoo data prepare` "
            "command: it verifies every shard's checksum and redoes the damaged ones"
        )

    def __getstate__(self) -> dict:
        state = dict(self.__dict__)
        state["_source"] = None  # readers are reopened in the receiving process
        return state


def describe_manifest(path: str) -> dict[str, Any]:
    """Documents and tokens per split of a prepared directory, with its tokenizer spec and source."""
    m = read_manifest(path)
    return {
        "tokenizer": m["tokenizer"],
        "source": m["source"],
        "splits": {k: {"documents": v["documents"], "tokens": v["tokens"]} for k, v in m["splits"].items()},
    }
