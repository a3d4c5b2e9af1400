"""Helpers shared by the data tests: configs, small corpora built on the spot, a tiny tokenizer.json."""

from __future__ import annotations

import os

import numpy as np

from zoo.config import make_config

WORDS = ["alpha", "beta", "gamma", "delta", "epsilon", "zeta", "theta", "kappa", "lambda", "sigma"]


def data_config(**overrides):
    """The `c.data` block of the transformer config with `overrides` applied."""
    data = make_config("transformer").data
    for k, v in overrides.items():
        data[k] = v
    return data


def write_text_corpus(
    root, n: int, *, seed: int = 0, min_words: int = 5, max_words: int = 400, nested: bool = True
) -> list[str]:
    """`n` text files of random words under `root` (some in a sub-directory); returns their texts."""
    rng = np.random.default_rng(seed)
    os.makedirs(root, exist_ok=True)
    texts = []
    for i in range(n):
        sub = os.path.join(root, f"part{i % 3}") if nested and i % 2 else str(root)
        os.makedirs(sub, exist_ok=True)
        text = f"doc {i}: " + " ".join(rng.choice(WORDS, int(rng.integers(min_words, max_words)))) + "\n"
        with open(os.path.join(sub, f"doc{i:04d}.txt"), "w") as f:
            f.write(text)
        texts.append(text)
    return texts


def write_random_bytes_corpus(root, n: int, *, seed: int = 0, min_len: int = 20, max_len: int = 900) -> None:
    """`n` files of lowercase letters with log-uniform-ish lengths in [min_len, max_len)."""
    rng = np.random.default_rng(seed)
    os.makedirs(root, exist_ok=True)
    for i in range(n):
        length = int(rng.integers(min_len, max_len))
        with open(os.path.join(root, f"d{i:04d}.txt"), "wb") as f:
            f.write(rng.integers(97, 123, length).astype(np.uint8).tobytes())


def train_hf_tokenizer(path, texts, vocab_size: int = 300) -> str:
    """Trains a byte-level BPE `tokenizer.json` on `texts` (no download) with `<|endoftext|>`; returns its path."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=["<unk>", "<|endoftext|>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(texts, trainer)
    tok.save(str(path))
    return str(path)


_TINY_DOCS: list = []  # TFDS registers builder classes by name: define the class once per process


def tfds_builder(tmp_path):
    """A local TFDS dataset `tiny_docs` (10 train, 3 validation short texts), prepared as array_record."""
    import tensorflow_datasets as tfds

    if not _TINY_DOCS:

        class TinyDocs(tfds.core.GeneratorBasedBuilder):
            """Short text documents, written locally (no download)."""

            VERSION = tfds.core.Version("1.0.0")

            def _info(self):
                return tfds.core.DatasetInfo(
                    builder=self, features=tfds.features.FeaturesDict({"text": tfds.features.Text()})
                )

            def _split_generators(self, dl_manager):
                return {"train": self._generate_examples(0, 10), "validation": self._generate_examples(10, 13)}

            def _generate_examples(self, lo, hi):
                for i in range(lo, hi):
                    yield i, {"text": f"doc {i}: " + "lorem ipsum " * (20 + i)}

        _TINY_DOCS.append(TinyDocs)
    builder = _TINY_DOCS[0](data_dir=str(tmp_path), file_format="array_record")
    builder.download_and_prepare()
    return builder


def same_batches(a: list[dict], b: list[dict]) -> bool:
    """Bitwise equality of two lists of batches (same keys, dtypes and values)."""
    return len(a) == len(b) and all(
        x.keys() == y.keys() and all(x[k].dtype == y[k].dtype and np.array_equal(x[k], y[k]) for k in x)
        for x, y in zip(a, b)
    )
