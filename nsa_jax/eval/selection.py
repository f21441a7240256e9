"""Selection hit rate: did the queries that must recall a fact select the blocks holding it?

For each answer span (s, e) of an example and its evidence span, the queries are the positions
s-1 .. e-2 (those whose logits predict the answer tokens); a query hits in a layer and KV head when
every selection block that holds an evidence token (block = position // select_block, positions
counted from the document's start) is among its selected indices. A hit is *forced* when all those
blocks are ones NSA always selects for that query (the first num_init_blocks, the num_local_blocks
ending at the query's own block, or every block when the query sees no more than num_selected):
it says nothing about the learned scores.
"""
from __future__ import annotations

from typing import Sequence

import numpy as np

from nsa_jax.config import NSAConfig
from nsa_jax.data import SyntheticExample


def _queries_and_blocks(example: SyntheticExample, select_block: int):
    """-> [(query positions [Q], evidence blocks [E])] per answer of `example`."""
    pairs = []
    for (start, end), (first, last) in zip(example.answer_spans, example.evidence_spans):
        pairs.append((np.arange(start - 1, end - 1),
                      np.unique(np.arange(first, last) // select_block)))
    return pairs


def forced_blocks(queries: np.ndarray, blocks: np.ndarray, cfg: NSAConfig) -> np.ndarray:
    """[Q, E] bool: evidence block e is always selected for query queries[q]."""
    own = queries[:, None] // cfg.select_block
    local = (blocks[None] <= own) & (blocks[None] > own - cfg.num_local_blocks)
    return local | (blocks[None] < cfg.num_init_blocks) | (own < cfg.num_selected)


def selection_hits(indices: np.ndarray, examples: Sequence[SyntheticExample],
                   cfg: NSAConfig) -> tuple[np.ndarray, np.ndarray]:
    """indices [num_layers, B, T, Hkv, n] (row b belongs to examples[b]; later rows are ignored)
    -> (hits [num_layers, N] bool, forced [N] bool), N = every (example, answer, query, KV head)."""
    indices = np.asarray(indices)
    if indices.ndim != 5:
        raise ValueError(f"indices must be [num_layers, B, T, Hkv, n], got shape {indices.shape}")
    if len(examples) > indices.shape[1]:
        raise ValueError(f"{len(examples)} examples but indices hold only {indices.shape[1]} rows")
    hits, forced = [], []
    for b, example in enumerate(examples):
        if example.tokens.size > indices.shape[2]:
            raise ValueError(f"example {b} has {example.tokens.size} tokens, indices only "
                             f"{indices.shape[2]} positions")
        for queries, blocks in _queries_and_blocks(example, cfg.select_block):
            chosen = indices[:, b, queries]  # [L, Q, Hkv, n]
            present = (chosen[..., None, :] == blocks[:, None]).any(-1)  # [L, Q, Hkv, E]
            hits.append(present.all(-1).reshape(indices.shape[0], -1))
            always = forced_blocks(queries, blocks, cfg).all(-1)  # [Q]
            forced.append(np.repeat(always, indices.shape[3]))
    return np.concatenate(hits, axis=1), np.concatenate(forced)
