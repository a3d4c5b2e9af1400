"""In-memory text sources: a directory of text files, and TFDS datasets by name.

Both are random-access collections of documents (`len`, `[i]` -> int32 token array, `lengths`,
`eos_id`, `tokenizer_spec`), tokenized once into memory with a `zoo.data.tokenizers.Tokenizer`
(bytes by default), which the pipeline turns into fixed-length sequences (concat-and-chunk with
EOS), packed rows or dataset-decomposition buckets. They suit small corpora; a corpus that does
not fit in memory is tokenized once by `zoo data prepare` into shards (`zoo.data.shards`).

The embedded default corpus is the source code of the running Python's standard library
(`*.py` outside test folders, ~11 MB): it exists on every machine with Python, needs no download,
is real long-form structured text with long-range dependencies (imports, definitions used far
below), and is fixed for a given Python version. Documents are split into train/validation by a
hash of their path (10% validation), so the split does not depend on the file order.
"""

from __future__ import annotations

import hashlib
import os
import sysconfig

import numpy as np

from zoo.data.tokenizers import ByteTokenizer, Tokenizer

SKIP_DIRS = {"test", "tests", "idlelib", "site-packages", "__pycache__", "lib2to3", "turtledemo"}


def default_corpus_dir() -> str:
    """The default text corpus: the Python standard library's source directory."""
    return sysconfig.get_paths()["stdlib"]


def _in_split(relpath: str, split: str) -> bool:
    bucket = int(hashlib.sha1(relpath.encode()).hexdigest()[:8], 16) % 10
    if split == "train":
        return bucket != 0
    if split in ("validation", "test"):
        return bucket == 0
    raise ValueError(f"unknown split {split!r}; use 'train' or 'validation'")


class _InMemoryDocuments:
    """Documents tokenized into memory (`self.docs`, by `self.tokenizer`), indexable by position."""

    def _index_documents(self) -> None:
        self.lengths = np.array([len(d) for d in self.docs], np.int64)  # [D]
        self.eos_id = self.tokenizer.eos_id
        self.tokenizer_spec = self.tokenizer.spec()

    def __len__(self) -> int:
        return len(self.docs)

    def __getitem__(self, i: int) -> np.ndarray:
        return self.docs[i]


class TextFiles(_InMemoryDocuments):
    """Every regular text file under `path` (recursively; '' = the stdlib corpus) as one document."""

    def __init__(self, path: str = "", split: str = "train", tokenizer: Tokenizer | None = None):
        root = path or default_corpus_dir()
        if not os.path.isdir(root):
            raise ValueError(
                f"data.path {root!r} is not a directory; point it at a folder of text files "
                "(or '' for the default stdlib corpus)"
            )
        self.tokenizer = tokenizer or ByteTokenizer()
        files = []
        for dirpath, dirnames, filenames in os.walk(root):
            dirnames[:] = sorted(d for d in dirnames if not (not path and d in SKIP_DIRS))
            for f in sorted(filenames):
                full = os.path.join(dirpath, f)
                if (path or f.endswith(".py")) and _in_split(os.path.relpath(full, root), split):
                    files.append(full)
        self.docs = []
        for f in files:
            with open(f, "rb") as fh:
                data = fh.read()
            if data and b"\0" not in data[:4096]:  # skip binary files
                self.docs.append(self.tokenizer(data))
        if not self.docs:
            raise ValueError(f"no text files found under {root!r} for split {split!r}")
        self._index_documents()


class TfdsDocuments(_InMemoryDocuments):
    """A TFDS dataset read through `tfds.data_source` (array_record; no TensorFlow needed), tokenized
    into memory when opened."""

    def __init__(
        self,
        name: str,
        split: str = "train",
        data_dir: str = "",
        text_key: str = "text",
        tokenizer: Tokenizer | None = None,
    ):
        try:
            import tensorflow_datasets as tfds
        except ImportError as e:
            raise ValueError("data.source='tfds' needs tensorflow-datasets: pip install 'longcontext-zoo[tfds]'") from e
        if not name:
            raise ValueError("data.source='tfds' needs data.tfds_name (e.g. 'pg19')")
        try:
            self.source = tfds.data_source(name, split=split, data_dir=data_dir or None)
        except Exception as e:  # TFDS raises many types; one clear line for the user
            raise ValueError(
                f"cannot open TFDS dataset {name!r} split {split!r} in {data_dir or 'the default dir'}: "
                f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''} — prepare it with "
                "file_format='array_record' first"
            ) from e
        self.text_key = text_key
        self.tokenizer = tokenizer or ByteTokenizer()
        self.docs = [self._tokens(i) for i in range(len(self.source))]
        self._index_documents()

    def _tokens(self, i: int) -> np.ndarray:
        record = self.source[i]
        if self.text_key not in record:
            raise ValueError(
                f"TFDS record has no field {self.text_key!r}; fields: {sorted(record)} (set data.tfds_text_key)"
            )
        value = record[self.text_key]
        if isinstance(value, (bytes, str)):
            return self.tokenizer(value)
        return np.asarray(value, np.int32)
