"""Loop ranges of the compressed-attention kernels, built in XLA from the slot layout.

Slots hold every document's compressed tokens in order, documents in order, then padding
(start -1), so the valid starts are ascending: a binary search finds the slots a query may see.
All ranges are supersets (the kernels mask exactly); they only spare work.
"""
from __future__ import annotations

import functools

import jax
import jax.numpy as jnp

_PAD = jnp.iinfo(jnp.int32).max


def _search(side: str, sorted_rows, values):
    """Row-wise jnp.searchsorted: sorted_rows [B, N], values [B, M] -> [B, M] int32."""
    fn = functools.partial(jnp.searchsorted, side=side)
    return jax.vmap(fn)(sorted_rows, values).astype(jnp.int32)


def _ascending(start):
    return jnp.where(start >= 0, start, _PAD)


def first_slot_of_document(start, doc):
    """[B, T] index of the first slot at or after each query's document start."""
    return _search("left", _ascending(start), doc)


def key_tiles_per_query_tile(start, doc, qb: int, key_block: int, compress_block: int):
    """start [B, Tcp], doc [B, Tq] (Tq a multiple of qb) -> (lo, hi) [B, Tq // qb]: the key tiles
    holding any slot visible to a query of the tile."""
    tq = doc.shape[1]
    key = _ascending(start)
    lo = _search("left", key, doc[:, ::qb])
    last_query = jnp.arange(qb - 1, tq, qb, dtype=jnp.int32)
    hi = _search("right", key, jnp.broadcast_to(last_query - compress_block + 1, lo.shape))
    lo_tile = lo // key_block
    return lo_tile, jnp.where(hi > lo, -(-hi // key_block), lo_tile)


def query_tiles_per_key_tile(start, doc, qb: int, key_block: int, compress_block: int):
    """start [B, Tcp] (Tcp a multiple of key_block), doc [B, T] -> (lo, hi) [B, Tcp // key_block]:
    the query tiles of qb positions that may see a slot of the key tile. A slot is seen from its
    last token to the end of its document."""
    b, tcp = start.shape
    tiles = start.reshape(b, tcp // key_block, key_block)
    first, last = tiles[..., 0], tiles.max(axis=-1)
    valid = first >= 0
    last_doc = jnp.take_along_axis(doc, jnp.maximum(last, 0), axis=1)
    end = _search("right", doc, last_doc)  # one past the last query of that document
    lo = (first + compress_block - 1) // qb
    hi = -(-end // qb)
    return jnp.where(valid, lo, 0), jnp.where(valid & (hi > lo), hi, jnp.where(valid, lo, 0))
