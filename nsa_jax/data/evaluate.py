"""Exact-match (and per-token) accuracy of synthetic-task answers under a model.

One teacher-forced forward pass suffices: greedy decoding reproduces an answer exactly iff the
argmax at every answer position (given the true prefix) is the answer token.
"""
from __future__ import annotations

from typing import Callable, Iterator, Sequence

import numpy as np

from nsa_jax.data.packing import examples_to_batch
from nsa_jax.data.tasks import SyntheticExample


def answer_token_hits(logits: np.ndarray, examples: Sequence[SyntheticExample]
                      ) -> list[np.ndarray]:
    """Per answer span of `examples` (row b of `logits` [B, T, V]): [span length] bool, whether
    the argmax at each of its positions is the answer token."""
    predicted = np.asarray(logits).argmax(-1)
    return [predicted[b, start - 1:end - 1] == example.tokens[start:end]
            for b, example in enumerate(examples) for start, end in example.answer_spans]


def answer_hits(logits: np.ndarray, examples: Sequence[SyntheticExample]) -> np.ndarray:
    """[num answers] bool: the answer spans of `examples` (row b of `logits` [B, T, V]) that
    are predicted exactly."""
    return np.array([hits.all() for hits in answer_token_hits(logits, examples)], dtype=bool)


def padded_batches(examples: Sequence[SyntheticExample], batch_size: int
                   ) -> Iterator[tuple[list[SyntheticExample], dict]]:
    """(examples of the batch, batch) pairs: the dicts of `examples_to_batch` (tokens, targets,
    segment_ids, loss_mask), all [batch_size, longest example] so a jitted model compiles once (a
    short last batch repeats its final example; only the examples returned with it count)."""
    if not examples:
        raise ValueError("evaluation needs at least one example")
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    length = max(e.tokens.size for e in examples)
    for i in range(0, len(examples), batch_size):
        chunk = list(examples[i:i + batch_size])
        yield chunk, examples_to_batch(chunk + chunk[-1:] * (batch_size - len(chunk)), length)


def answer_accuracy(logits_fn: Callable[[dict], np.ndarray],
                    examples: Sequence[SyntheticExample], batch_size: int = 8) -> float:
    """Fraction of all answers (one per passkey example, num_pairs per MQAR example) that
    `logits_fn(batch) -> [B, T, V]` gets exactly right, over the `padded_batches` of `examples`."""
    hits = [answer_hits(logits_fn(batch), chunk)
            for chunk, batch in padded_batches(examples, batch_size)]
    return float(np.concatenate(hits).mean())
