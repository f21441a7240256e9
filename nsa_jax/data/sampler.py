"""Stateless batches: training batch (seed, step) is a pure function of those two and the config,
so a resumed run needs no data-loader state to see exactly the batches it would have seen.

Each row r draws from its own numpy Generator seeded by (seed, step, r), so a row does not depend on
the batch size and a host can build only its own rows. A row is, with the config's probabilities,
a passkey example, an MQAR example, or a window of seq_len + 1 tokens at a uniform offset of one
corpus's train stream (the corpus chosen by weight), i.e. documents sampled in proportion to length
and packed as they fall.
"""
from __future__ import annotations

from typing import Iterator

import numpy as np

from nsa_jax.config import require_int
from nsa_jax.data.data_config import DataConfig
from nsa_jax.data.packing import Row, corpus_row, example_row, padding_row, rows_to_batch
from nsa_jax.data.streams import TokenStream, corpus_streams
from nsa_jax.data.tasks import PASSKEY_DIGITS, mqar_example, passkey_example


def split_stream(cfg: DataConfig, corpus: str, split: str) -> TokenStream:
    """The tokenized split, checked to hold at least one seq_len + 1 window."""
    stream = corpus_streams(corpus, cfg.validation_fraction)[split]
    if stream.tokens.size < cfg.seq_len + 1:
        raise ValueError(f"corpus {corpus!r} {split} split has {stream.tokens.size} tokens, fewer "
                         f"than seq_len + 1 = {cfg.seq_len + 1}; lower seq_len or raise "
                         "validation_fraction")
    return stream


def _train_row(cfg: DataConfig, rng: np.random.Generator, streams, corpus_p) -> Row:
    kind = rng.random()
    if kind < cfg.passkey_prob:
        example = passkey_example(cfg.seq_len, rng.random(), rng, num_digits=PASSKEY_DIGITS)
    elif kind < cfg.passkey_prob + cfg.mqar_prob:
        example = mqar_example(cfg.seq_len, cfg.mqar_num_pairs, rng)
    else:
        stream = streams[rng.choice(len(streams), p=corpus_p)]
        return corpus_row(stream, int(rng.integers(stream.tokens.size - cfg.seq_len)), cfg.seq_len)
    return example_row(example, cfg.seq_len)


def make_train_batch(cfg: DataConfig, seed: int, step: int, rows: range | None = None) -> dict:
    """{tokens, targets, segment_ids: int32 [B, T]; loss_mask: float32 [B, T]} for (seed, step)
    (no segment_ids when cfg.packed is False). With `rows`, only those rows of the batch (a
    process's share of a global batch)."""
    require_int("seed", seed, 0)
    require_int("step", step, 0)
    streams = [split_stream(cfg, name, "train") for name, _ in cfg.corpora]
    weights = np.array([w for _, w in cfg.corpora])
    rows = [_train_row(cfg, np.random.default_rng([seed, step, r]), streams, weights / weights.sum())
            for r in (range(cfg.batch_size) if rows is None else rows)]
    return _layout(cfg, rows_to_batch(rows))


def _layout(cfg: DataConfig, batch: dict) -> dict:
    """The batch as cfg.packed asks: unpacked rows carry no segment ids (see DataConfig)."""
    return batch if cfg.packed else {k: v for k, v in batch.items() if k != "segment_ids"}


def validation_batches(cfg: DataConfig, corpus: str | None = None,
                       max_batches: int | None = None) -> Iterator[dict]:
    """Batches covering the validation split of `corpus` (default: each configured corpus in
    turn) in consecutive seq_len + 1 windows overlapping by one token, so every token but the
    stream's tail is a target exactly once. With max_batches, that many batches per corpus of
    windows spread evenly over the split. The last batch is filled with zero-loss padding rows."""
    if max_batches is not None and max_batches < 1:
        raise ValueError(f"max_batches must be None or >= 1, got {max_batches!r}")
    names = [name for name, _ in cfg.corpora] if corpus is None else [corpus]
    for name in names:
        stream = split_stream(cfg, name, "validation")
        num_windows = (stream.tokens.size - 1) // cfg.seq_len
        starts = np.arange(num_windows) * cfg.seq_len
        if max_batches is not None and max_batches * cfg.batch_size < num_windows:
            starts = starts[np.linspace(0, num_windows - 1, max_batches * cfg.batch_size).round()
                            .astype(int)]
        for first in range(0, starts.size, cfg.batch_size):
            rows = [corpus_row(stream, int(o), cfg.seq_len)
                    for o in starts[first:first + cfg.batch_size]]
            yield _layout(cfg, rows_to_batch(
                rows + [padding_row(cfg.seq_len)] * (cfg.batch_size - len(rows))))
