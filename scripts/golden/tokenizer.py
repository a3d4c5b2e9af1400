"""Golden fixture of the tokenizers: a byte-level BPE `tokenizer.json` and its encodings of
Unicode test strings."""

from __future__ import annotations

import codecs
import contextlib
import io
import json
import os
import random
import sys

from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers

# ----------------------------------------------------------------------------------------------------------
# Tokenizer


_UNICODE_LINES = [
    "Naïve café owners say déjà vu: “façade” — résumé, coöperate, Ærøskøbing.",
    "Größe, Straße, Übermaß; ça va? Ñandú y pingüino.",
    "Ελληνικά γράμματα: αβγδε, Καλημέρα κόσμε.",
    "Русский текст: привет, мир; съешь ещё этих мягких булок.",
    "日本語のテキスト、東京と京都。中文：你好，世界。한국어: 안녕하세요.",
    "Emoji 🙂🚀✨ and symbols ∑∫√∞ ≤ ≥ ≠ ± × ÷ € £ ¥.",
    "Tabs\tand  double  spaces,\nnew lines\r\nand trailing space \n",
]


_TEST_STRINGS = [
    "Hello world",
    "The quick brown fox jumps over the lazy dog.",
    "Beautiful is better than ugly.",
    "  leading and trailing spaces  ",
    "tabs\tand\nnewlines\n\n  indented",
    "naïve café — 日本語 🙂 Ελληνικά",
    "1234567890 3.14159 -42",
    "a </s> literal eos and <s> bos inside text",
    " ",
    "",
]


def _tokenizer_corpus() -> list[str]:
    """A few KB of deterministic text: the Zen of Python (stable across versions), unicode lines, shuffles."""
    with contextlib.redirect_stdout(io.StringIO()):  # importing `this` prints the Zen
        import this  # noqa: F401  (the text is its attribute `s`, rot13-encoded)

    zen = codecs.decode(sys.modules["this"].s, "rot13").splitlines()
    lines = [line for line in zen if line] + _UNICODE_LINES
    rng = random.Random(1234)
    corpus = list(lines)
    while sum(len(x.encode()) for x in corpus) < 6000:
        corpus.append(" ".join(rng.sample(lines, 3)))
    return corpus


def make_tokenizer(out_dir: str) -> dict:
    """Byte-level BPE (vocab 320, `<s>` = 0 BOS, `</s>` = 1 EOS) trained with `tokenizers`, plus encodings."""
    directory = os.path.join(out_dir, "tokenizer")
    os.makedirs(directory)
    corpus = _tokenizer_corpus()
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=320,
        min_frequency=2,
        special_tokens=["<s>", "</s>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(corpus, trainer=trainer)
    bos, eos = tok.token_to_id("<s>"), tok.token_to_id("</s>")
    tok.post_processor = processors.Sequence(
        [
            processors.ByteLevel(trim_offsets=False),
            processors.TemplateProcessing(single="<s> $A", pair="<s> $A <s> $B", special_tokens=[("<s>", bos)]),
        ]
    )
    tok.save(os.path.join(directory, "tokenizer.json"), pretty=True)
    reloaded = Tokenizer.from_file(os.path.join(directory, "tokenizer.json"))
    cases = []
    for text in _TEST_STRINGS:
        enc = reloaded.encode(text)
        plain = reloaded.encode(text, add_special_tokens=False)
        assert enc.ids == tok.encode(text).ids
        decoded = reloaded.decode(plain.ids, skip_special_tokens=False)
        cases.append(
            {
                "text": text,
                "ids": enc.ids,
                "ids_without_special_tokens": plain.ids,
                "tokens": plain.tokens,
                "offsets": [list(o) for o in plain.offsets],
                "decoded": decoded,
                "decoded_skip_special_tokens": reloaded.decode(enc.ids, skip_special_tokens=True),
                "round_trip": decoded == text,
            }
        )
    encodings = {
        "tokenizer": "tokenizer.json",
        "vocab_size": reloaded.get_vocab_size(),
        "bos_token": "<s>",
        "bos_id": bos,
        "eos_token": "</s>",
        "eos_id": eos,
        "notes": (
            "ids: encode(text) (add_special_tokens=True: the TemplateProcessing post-processor prepends <s>); "
            "ids_without_special_tokens: encode(text, add_special_tokens=False); tokens/offsets of the latter; "
            "decoded: decode(ids_without_special_tokens, skip_special_tokens=False); "
            "decoded_skip_special_tokens: decode(ids, skip_special_tokens=True). Special tokens written in the "
            "text ('<s>', '</s>') are matched as special tokens before pre-tokenization; "
            "decode(skip_special_tokens=True) drops them."
        ),
        "cases": cases,
    }
    with open(os.path.join(directory, "encodings.json"), "w", encoding="utf-8") as f:
        json.dump(encodings, f, indent=1, ensure_ascii=False)
        f.write("\n")
    vocab = reloaded.get_vocab()
    return {
        "format": "tokenizers tokenizer.json (byte-level BPE)",
        "config": {
            "model": "BPE (no unk token, no dropout, no continuing_subword_prefix)",
            "pre_tokenizer": "ByteLevel(add_prefix_space=False, use_regex=True): GPT-2 regex split, bytes -> "
            "GPT-2 byte-to-unicode alphabet",
            "decoder": "ByteLevel",
            "post_processor": "Sequence[ByteLevel(trim_offsets=False), TemplateProcessing('<s> $A')]",
            "trainer": "BpeTrainer(vocab_size=320, min_frequency=2, special_tokens=['<s>', '</s>'], "
            "initial_alphabet=ByteLevel.alphabet())",
            "special_ids": {"<s>": bos, "</s>": eos},
            "byte_alphabet_ids": [
                min(vocab[c] for c in pre_tokenizers.ByteLevel.alphabet()),
                max(vocab[c] for c in pre_tokenizers.ByteLevel.alphabet()),
            ],
            "merges": len(json.loads(reloaded.to_str())["model"]["merges"]),
        },
        "corpus": (
            "the Zen of Python (codecs.decode(this.s, 'rot13')), the script's _UNICODE_LINES, then "
            "random.Random(1234) 3-line samples until >= 6000 UTF-8 bytes; "
            f"{len(corpus)} lines, {sum(len(x.encode()) for x in corpus)} bytes"
        ),
        "seeds": {"random.Random": 1234},
    }
