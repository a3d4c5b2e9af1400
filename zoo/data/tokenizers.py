"""Tokenizers: one interface, three implementations (bytes, SentencePiece, Hugging Face tokenizer.json).

Every tokenizer gives ``vocab_size``, ``eos_id`` (the end-of-document token the pipeline puts
between documents), ``encode(text) -> int32 array``, ``decode(ids) -> str`` and ``spec()``, a small
JSON-able description (kind, model file path and its sha256, vocabulary size, EOS id) that
``zoo data prepare`` writes into a manifest; :func:`from_spec` rebuilds the tokenizer from it and
refuses a model file whose content changed.

* :class:`ByteTokenizer`: UTF-8 bytes, vocabulary 256. Its EOS is id 0, the NUL byte: text sources
  skip files with a NUL byte in their first 4 KiB as binary, so in practice NUL does not occur
  inside a document (a text file with a NUL after its first 4 KiB would collide with it).
* :class:`SentencePieceTokenizer`: a SentencePiece ``.model`` file (``sentencepiece`` package);
  EOS is the model's ``eos_id()`` (``</s>``, id 2 with the trainer's defaults).
* :class:`HFTokenizer`: a Hugging Face ``tokenizer.json`` (``tokenizers`` package). The file does
  not say which token ends a document; the EOS is ``eos_token`` if given, else the ``eos_token``
  of a ``tokenizer_config.json`` beside the file, else the first of :data:`HF_EOS_CANDIDATES` in
  the vocabulary.

:func:`load_tokenizer` picks the implementation from a name: ``""``/``"bytes"``, a path ending in
``.json`` (or a directory holding ``tokenizer.json``), or any other existing file (SentencePiece).
"""

from __future__ import annotations

import abc
import hashlib
import json
import os
from typing import Any

import numpy as np

BYTE_EOS_ID = 0
HF_EOS_CANDIDATES = (
    "<|endoftext|>",
    "</s>",
    "<eos>",
    "<|end_of_text|>",
    "<|eot_id|>",
    "<|im_end|>",
    "[SEP]",
    "<|end|>",
)
KINDS = ("bytes", "sentencepiece", "hf")


def file_sha256(path: str, chunk: int = 1 << 20) -> str:
    """Hex sha256 of a file's content, read in chunks."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


def _as_text(text: str | bytes) -> str:
    return text.decode("utf-8", "replace") if isinstance(text, (bytes, bytearray, memoryview)) else text


class Tokenizer(abc.ABC):
    """Text <-> int32 token ids, with an end-of-document token and a JSON-able spec."""

    kind: str = ""

    @property
    @abc.abstractmethod
    def vocab_size(self) -> int:
        """Number of token ids; every id lies in ``[0, vocab_size)``."""

    @property
    @abc.abstractmethod
    def eos_id(self) -> int:
        """The end-of-document token id."""

    @abc.abstractmethod
    def encode(self, text: str | bytes) -> np.ndarray:
        """Token ids of ``text`` as an int32 array ``[N]`` (no EOS appended)."""

    @abc.abstractmethod
    def decode(self, ids: Any) -> str:
        """The text of token ids ``ids`` (invalid UTF-8 is replaced)."""

    @abc.abstractmethod
    def spec(self) -> dict:
        """A stable JSON-able description: kind, model path and sha256, vocab_size, eos_id."""

    def __call__(self, text: str | bytes) -> np.ndarray:
        return self.encode(text)

    def __repr__(self) -> str:
        return f"{type(self).__name__}({json.dumps(self.spec(), sort_keys=True)})"


class ByteTokenizer(Tokenizer):
    """UTF-8 bytes as token ids (vocabulary 256); EOS is 0, the NUL byte (binary files are skipped)."""

    kind = "bytes"

    @property
    def vocab_size(self) -> int:
        return 256

    @property
    def eos_id(self) -> int:
        return BYTE_EOS_ID

    def encode(self, text: str | bytes) -> np.ndarray:
        data = text.encode("utf-8") if isinstance(text, str) else bytes(text)
        return np.frombuffer(data, np.uint8).astype(np.int32)

    def decode(self, ids: Any) -> str:
        return bytes(np.asarray(ids, np.int64).astype(np.uint8)).decode("utf-8", "replace")

    def spec(self) -> dict:
        return {"kind": "bytes", "vocab_size": 256, "eos_id": BYTE_EOS_ID}


class SentencePieceTokenizer(Tokenizer):
    """A SentencePiece model file; EOS is the model's ``eos_id()``."""

    kind = "sentencepiece"

    def __init__(self, path: str):
        if not os.path.isfile(path):
            raise ValueError(f"SentencePiece model {path!r} does not exist; give a .model file or 'bytes'")
        try:
            import sentencepiece
        except ImportError as e:
            raise ValueError(
                "a SentencePiece tokenizer needs sentencepiece: pip install 'longcontext-zoo[sentencepiece]'"
            ) from e
        self.path = os.path.abspath(path)
        self.sha256 = file_sha256(self.path)
        try:
            self.sp = sentencepiece.SentencePieceProcessor(model_file=self.path)
        except Exception as e:  # sentencepiece raises OSError/RuntimeError on a bad file
            raise ValueError(f"{path!r} is not a SentencePiece model ({type(e).__name__}); give a .model file") from e
        if self.sp.eos_id() < 0:
            raise ValueError(
                f"SentencePiece model {path!r} has no EOS piece (eos_id=-1); retrain it with "
                "--eos_id=2 (the default) so documents can be separated"
            )

    @property
    def vocab_size(self) -> int:
        return int(self.sp.get_piece_size())

    @property
    def eos_id(self) -> int:
        return int(self.sp.eos_id())

    def encode(self, text: str | bytes) -> np.ndarray:
        return np.asarray(self.sp.encode(_as_text(text)), np.int32)

    def decode(self, ids: Any) -> str:
        return self.sp.decode([int(i) for i in np.asarray(ids).reshape(-1)])

    def spec(self) -> dict:
        return {
            "kind": "sentencepiece",
            "path": self.path,
            "sha256": self.sha256,
            "vocab_size": self.vocab_size,
            "eos_id": self.eos_id,
        }


def _config_eos_token(path: str) -> str | None:
    """The ``eos_token`` of a ``tokenizer_config.json`` beside ``path``, if there is one."""
    cfg = os.path.join(os.path.dirname(path), "tokenizer_config.json")
    if not os.path.isfile(cfg):
        return None
    with open(cfg) as f:
        token = json.load(f).get("eos_token")
    if isinstance(token, dict):
        token = token.get("content")
    return token if isinstance(token, str) and token else None


class HFTokenizer(Tokenizer):
    """A Hugging Face ``tokenizer.json`` through the ``tokenizers`` package."""

    kind = "hf"

    def __init__(self, path: str, eos_token: str | None = None):
        if os.path.isdir(path):
            path = os.path.join(path, "tokenizer.json")
        if not os.path.isfile(path):
            raise ValueError(f"tokenizer file {path!r} does not exist; give a Hugging Face tokenizer.json or 'bytes'")
        try:
            import tokenizers
        except ImportError as e:
            raise ValueError("a tokenizer.json needs the tokenizers package: pip install tokenizers") from e
        self.path = os.path.abspath(path)
        self.sha256 = file_sha256(self.path)
        try:
            self.tok = tokenizers.Tokenizer.from_file(self.path)
        except Exception as e:  # tokenizers raises its own Exception subclass on a bad file
            raise ValueError(f"{path!r} is not a Hugging Face tokenizer.json ({str(e).splitlines()[0][:120]})") from e
        token = eos_token or _config_eos_token(self.path)
        if token is None:
            token = next((t for t in HF_EOS_CANDIDATES if self.tok.token_to_id(t) is not None), None)
        if token is None or self.tok.token_to_id(token) is None:
            raise ValueError(
                f"tokenizer {path!r} has no end-of-document token {token or HF_EOS_CANDIDATES!r}; "
                "pass eos_token= (zoo data prepare --eos-token) naming one of its special tokens"
            )
        self.eos_token = token

    @property
    def vocab_size(self) -> int:
        return int(self.tok.get_vocab_size(with_added_tokens=True))

    @property
    def eos_id(self) -> int:
        return int(self.tok.token_to_id(self.eos_token))

    def encode(self, text: str | bytes) -> np.ndarray:
        return np.asarray(self.tok.encode(_as_text(text), add_special_tokens=False).ids, np.int32)

    def encode_batch(self, texts: list[str | bytes]) -> list[np.ndarray]:
        """``[encode(t) for t in texts]``, tokenized in one call (the library's threads)."""
        out = self.tok.encode_batch([_as_text(t) for t in texts], add_special_tokens=False)
        return [np.asarray(e.ids, np.int32) for e in out]

    def decode(self, ids: Any) -> str:
        return self.tok.decode([int(i) for i in np.asarray(ids).reshape(-1)], skip_special_tokens=False)

    def spec(self) -> dict:
        return {
            "kind": "hf",
            "path": self.path,
            "sha256": self.sha256,
            "vocab_size": self.vocab_size,
            "eos_id": self.eos_id,
            "eos_token": self.eos_token,
        }


def load_tokenizer(name: str = "", eos_token: str | None = None) -> Tokenizer:
    """The tokenizer named by ``name``.

    Args:
        name: ``""`` or ``"bytes"``; a ``tokenizer.json`` path (or a directory holding one); or a
            SentencePiece ``.model`` file.
        eos_token: for a ``tokenizer.json``, the token that ends a document (default: see
            :class:`HFTokenizer`).
    """
    if name in ("", "bytes"):
        return ByteTokenizer()
    if name.endswith(".json") or os.path.isdir(name):
        return HFTokenizer(name, eos_token)
    if os.path.isfile(name) or name.endswith(".model") or os.sep in name:
        return SentencePieceTokenizer(name)
    raise ValueError(
        f"unknown tokenizer {name!r}: use 'bytes', a SentencePiece .model file or a Hugging Face tokenizer.json path"
    )


def tokenizer_for(data: Any) -> Tokenizer:
    """The tokenizer of a ``c.data`` config: ``data.tokenizer``, else ``data.sp_model``, else bytes."""
    name = data.get("tokenizer", "") or data.get("sp_model", "")
    return load_tokenizer(name)


def run_tokenizer(data: Any) -> Tokenizer:
    """The tokenizer a run's ``c.data`` trained with: for prepared shards without ``data.tokenizer``
    the manifest's, else :func:`tokenizer_for`."""
    if data.get("source") == "shards" and not (data.get("tokenizer", "") or data.get("sp_model", "")):
        from zoo.data.shards import read_manifest

        return from_spec(read_manifest(data.path)["tokenizer"])
    return tokenizer_for(data)


def from_spec(spec: dict) -> Tokenizer:
    """Rebuilds a tokenizer from :meth:`Tokenizer.spec`; refuses a model file whose sha256 changed."""
    kind = spec.get("kind")
    if kind == "bytes":
        return ByteTokenizer()
    if kind not in KINDS:
        raise ValueError(f"unknown tokenizer kind {kind!r} in spec; expected one of {KINDS}")
    tok: Tokenizer = (
        SentencePieceTokenizer(spec["path"])
        if kind == "sentencepiece"
        else HFTokenizer(spec["path"], spec.get("eos_token"))
    )
    if tok.sha256 != spec.get("sha256"):
        raise ValueError(
            f"tokenizer file {spec['path']!r} changed since the spec was written (sha256 "
            f"{tok.sha256[:12]} != {str(spec.get('sha256'))[:12]}); restore it or prepare the data again"
        )
    return tok


def describe_spec(spec: dict) -> str:
    """One line for humans: ``bytes (vocab 256, eos 0)`` or ``hf /path/tokenizer.json (vocab ..., eos ...)``."""
    where = f" {spec['path']}" if spec.get("path") else ""
    return f"{spec.get('kind')}{where} (vocab {spec.get('vocab_size')}, eos {spec.get('eos_id')})"
