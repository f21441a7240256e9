"""Measures of a model on this package's data, the model given as a function of a batch: the
validation loss of each corpus (the trainer's periodic evaluation and nsa-eval), and exact-match
(and per-token) accuracy of synthetic-task answers.

One teacher-forced forward pass suffices for the answers: greedy decoding reproduces an answer
exactly iff the argmax at every answer position (given the true prefix) is the answer token.
"""
from __future__ import annotations

import math
from typing import Callable, Iterator, Sequence

import numpy as np

from nsa_jax.data.data_config import DataConfig
from nsa_jax.data.packing import examples_to_batch
from nsa_jax.data.sampler import validation_batches
from nsa_jax.data.tasks import SyntheticExample


def validation_loss(eval_step, model_state, data: DataConfig, max_batches: int | None) -> dict:
    """{"val_loss", "val_perplexity", "val_loss/<corpus>", "val_tokens"}: mean loss per target
    token over up to max_batches batches of each corpus (all corpora pooled for val_loss)."""
    per_corpus = {}
    for corpus, _ in data.corpora:
        sums = [eval_step(model_state, batch) for batch in
                validation_batches(data, corpus, max_batches)]
        per_corpus[corpus] = (sum(float(t) for t, _ in sums), sum(float(c) for _, c in sums))
    total = sum(t for t, _ in per_corpus.values())
    count = sum(c for _, c in per_corpus.values())
    loss = total / count
    return {"val_loss": loss, "val_perplexity": math.exp(min(loss, 700.0)),
            "val_tokens": int(count), **{f"val_loss/{k}": t / c for k, (t, c) in per_corpus.items()}}


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
