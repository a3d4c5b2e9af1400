"""Sequence packing with segment ids: documents never see each other inside a row.

Every document gets an EOS token appended and is cut into pieces of at most ``seq_len + 1``
tokens that overlap by one token (piece ``j`` is ``doc_eos[j*seq_len : (j+1)*seq_len + 1]``), so
each next-token pair ``(t, t+1)`` of the document, including "last token -> EOS", lies in exactly
one piece. :class:`DocumentPieces` is a random-access source of those pieces (resolved from the
length index, no tokens held); Grain's ``FirstFitPackIterDataset`` packs them into rows of
``seq_len + 1`` tokens (checkpointable: its state is the parent's position plus the next row);
:func:`packed_inputs` turns a packed row into the model's arrays:

* ``inputs`` = row[:-1], ``targets`` = row[1:]                         int32 [T]
* ``segment_ids``: 1, 2, ... for the pieces of the row in order, 0 on padding   int32 [T]
* ``positions``: the position of the input token within its piece (0 at each piece's start;
  ``< T`` always, the range the model was trained on)                  int32 [T]
* ``loss_mask`` = ``answer_mask``: 1 where the target is the next token of the same piece; 0 on
  padding and on the last token of every piece (its target would be the next piece's first token)
  float32 [T]

A model must restrict attention (and any recurrence) to equal ``segment_ids`` and may use
``positions`` for its position encoding; the loss mask alone already keeps the loss off the
boundaries.
"""

from __future__ import annotations

import numpy as np

from zoo.data.offsets import BlockCumsum, document_lengths, read_tokens


def pieces_per_document(lengths: np.ndarray, seq_len: int) -> np.ndarray:
    """Pieces of a document of ``n`` tokens plus EOS: ``ceil(n / seq_len)`` (0 for an empty document)."""
    return -(-np.asarray(lengths, np.int64) // int(seq_len))


class DocumentPieces:
    """Random-access pieces (``{"tokens": int32 [<= seq_len + 1]}``) of one host's documents.

    Args:
        docs: a document collection (``len``, ``[d]``, optionally ``lengths`` and ``read``).
        seq_len: model sequence length T; pieces hold at most T + 1 tokens.
        eos_id: the end-of-document token appended to every document.
        process_index, process_count: this host takes documents ``process_index::process_count``
            (hosts hold disjoint documents).
    """

    def __init__(self, docs, seq_len: int, eos_id: int, *, process_index: int = 0, process_count: int = 1):
        if not 0 <= process_index < process_count:
            raise ValueError(f"process_index={process_index} must lie in [0, process_count={process_count})")
        self.docs, self.seq_len, self.eos_id = docs, int(seq_len), int(eos_id)
        self.process_index, self.process_count = process_index, process_count
        self.lengths = document_lengths(docs)[process_index::process_count]  # [D_host] (a view of a memory map)
        self.index = BlockCumsum(self.lengths, lambda n: pieces_per_document(n, self.seq_len))
        if self.index.total == 0:
            raise ValueError(
                f"host {process_index} of {process_count} has no document tokens to pack; use fewer "
                "hosts or more documents"
            )

    def __len__(self) -> int:
        return self.index.total

    def locate(self, i: int) -> tuple[int, int]:
        """``(global document id, start of the piece in the document)`` of piece ``i``."""
        j, k = self.index.locate(int(i))
        return self.process_index + j * self.process_count, k * self.seq_len

    def __getitem__(self, i: int) -> dict[str, np.ndarray]:
        d, start = self.locate(i)
        n = int(self.lengths[(d - self.process_index) // self.process_count])
        stop = min(start + self.seq_len + 1, n + 1)  # position n is the EOS
        tokens = read_tokens(self.docs, d, start, min(stop, n))
        if stop == n + 1:
            tokens = np.concatenate([tokens, np.array([self.eos_id], np.int32)])
        return {"tokens": tokens.astype(np.int32)}


def packed_inputs(row: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """Model arrays of one packed row (``tokens``, ``tokens_segment_ids``, ``tokens_positions``, each [T + 1])."""
    tokens = np.asarray(row["tokens"], np.int32)  # [T + 1]
    seg = np.asarray(row["tokens_segment_ids"], np.int32)  # [T + 1]
    pos = np.asarray(row["tokens_positions"], np.int32)  # [T + 1]
    mask = ((seg[:-1] > 0) & (seg[1:] == seg[:-1])).astype(np.float32)  # [T]
    return {
        "inputs": tokens[:-1],
        "targets": tokens[1:],
        "loss_mask": mask,
        "answer_mask": mask.copy(),
        "segment_ids": seg[:-1],
        "positions": pos[:-1],
    }
