"""Packed rows and the model batches made from them.

A row is T + 1 tokens with a segment id per token (0 = padding, documents numbered 1, 2, ... from
the left, so neighbouring documents always differ) and a per-token "may be a target" weight.
The batch's inputs are the first T tokens and its targets the last T; a target counts only if it
lies in the same document as its input, so nothing is ever predicted across a boundary: each
document's last input (whose target would be the next document's BOS) gets loss weight 0.
"""
from __future__ import annotations

from typing import Sequence

import numpy as np

from nsa_jax.data.streams import TokenStream
from nsa_jax.data.tasks import SyntheticExample
from nsa_jax.data.tokenizer import PAD_ID

Row = tuple[np.ndarray, np.ndarray, np.ndarray]  # tokens, segment ids, target weight; each [T+1]


def renumber_segments(doc_index: np.ndarray) -> np.ndarray:
    """[..., L] document indices -> int32 ids 1, 2, ... along the last axis, new id at each change."""
    doc_index = np.asarray(doc_index)
    ids = np.ones(doc_index.shape, dtype=np.int32)
    ids[..., 1:] += np.cumsum(doc_index[..., 1:] != doc_index[..., :-1], axis=-1, dtype=np.int32)
    return ids


def corpus_row(stream: TokenStream, offset: int, seq_len: int) -> Row:
    """Stream tokens [offset, offset + seq_len + 1): documents it cuts are packed as they fall."""
    if not 0 <= offset <= stream.tokens.size - seq_len - 1:
        raise ValueError(f"offset {offset} leaves no {seq_len + 1}-token window in a stream of "
                         f"{stream.tokens.size} tokens")
    positions = np.arange(offset, offset + seq_len + 1)
    segments = renumber_segments(stream.document_index(positions))
    return stream.tokens[offset:offset + seq_len + 1].astype(np.int32), segments, np.ones(seq_len + 1, dtype=bool)


def example_row(example: SyntheticExample, seq_len: int) -> Row:
    """One synthetic example right-padded to seq_len + 1 tokens, targets only on its answers."""
    n = example.tokens.size
    if n > seq_len:
        raise ValueError(f"example has {n} tokens, more than seq_len={seq_len}")
    tokens = np.full(seq_len + 1, PAD_ID, dtype=np.int32)
    segments = np.zeros(seq_len + 1, dtype=np.int32)
    weight = np.zeros(seq_len + 1, dtype=bool)
    tokens[:n], segments[:n], weight[:n] = example.tokens, 1, example.answer_mask()
    return tokens, segments, weight


def padding_row(seq_len: int) -> Row:
    """A row with no data and no loss: keeps batch shapes fixed."""
    return (np.full(seq_len + 1, PAD_ID, dtype=np.int32), np.zeros(seq_len + 1, dtype=np.int32),
            np.zeros(seq_len + 1, dtype=bool))


def rows_to_batch(rows: Sequence[Row]) -> dict:
    """Rows -> dict of [B, T] arrays: tokens, targets, segment_ids (int32), loss_mask (float32)."""
    tokens, segments, weight = (np.stack(parts) for parts in zip(*rows))
    same_doc = (segments[:, 1:] == segments[:, :-1]) & (segments[:, 1:] != 0)
    return {
        "tokens": tokens[:, :-1],
        "targets": tokens[:, 1:],
        "segment_ids": segments[:, :-1],
        "loss_mask": (same_doc & weight[:, 1:]).astype(np.float32),
    }


def examples_to_batch(examples: Sequence[SyntheticExample], seq_len: int | None = None) -> dict:
    """One synthetic example per row, right-padded to seq_len (default: the longest example).
    Row b's answer span (s, e) is predicted by the logits at positions s-1 .. e-2."""
    seq_len = max(e.tokens.size for e in examples) if seq_len is None else seq_len
    return rows_to_batch([example_row(e, seq_len) for e in examples])
