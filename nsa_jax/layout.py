"""Where documents, compressed tokens and selection blocks lie in a (possibly packed) sequence.

Pure jnp, importing nothing of nsa_jax but the config, so the ops, the layers and the Pallas kernels
(which may not import nsa_jax.ops) share one definition of every layout.

Packed documents are marked by `segment_ids` [B, T]: a document is a maximal run of equal
consecutive ids. Every position, compressed token and selection block is counted from its
document's start, so a document packed with others is computed exactly as if it were alone.

Compressed-token layout: without segment_ids slot i holds compressed token i (tokens
[i*d, i*d + l - 1]) and there are Tc = (T - l) // d + 1 slots (0 if T < l). With segment_ids there
are Tc = T // d slots holding every document's compressed tokens in order, documents in order, and
padding slots (start -1) at the end; T // d always suffices because a document of L tokens has at
most L // d compressed tokens.
"""
from __future__ import annotations

from typing import NamedTuple

import jax.numpy as jnp
from jax import lax

from nsa_jax.config import NSAConfig


def check_token_kv(q, k, v) -> None:
    """The token-level attention inputs' shapes: q [B, T, Hq, Dk], k [B, T, Hkv, Dk], v [B, T, Hkv, Dv]
    with Hq a multiple of Hkv (GQA). Raises ValueError naming what differs."""
    if q.ndim != 4 or k.ndim != 4 or v.ndim != 4:
        raise ValueError(f"q, k, v must be [B, T, H, D]; got shapes {q.shape}, {k.shape}, "
                         f"{v.shape}")
    b, t, hq, dk = q.shape
    hkv = k.shape[2]
    if k.shape[:3] != (b, t, hkv) or v.shape[:3] != (b, t, hkv) or k.shape[3] != dk:
        raise ValueError(f"k must be [B, T, Hkv, Dk] and v [B, T, Hkv, Dv] matching q {q.shape}; "
                         f"got k {k.shape}, v {v.shape}")
    if hq % hkv:
        raise ValueError(f"query heads ({hq}) must be a multiple of KV heads ({hkv})")


def positions(batch: int, length: int):
    """[B, T] int32 absolute token index."""
    return jnp.broadcast_to(jnp.arange(length, dtype=jnp.int32), (batch, length))


def document_starts(segment_ids, batch: int, length: int):
    """[B, T] int32: index of the first token of each token's document (0 when unpacked)."""
    if segment_ids is None:
        return jnp.zeros((batch, length), jnp.int32)
    t = jnp.arange(length, dtype=jnp.int32)
    changed = segment_ids[:, 1:] != segment_ids[:, :-1]
    is_start = jnp.concatenate([jnp.ones((batch, 1), bool), changed], axis=1)
    return lax.cummax(jnp.where(is_start, t, 0), axis=1)


def document_ends(segment_ids, batch: int, length: int):
    """[B, T] int32: index of the last token of each token's document."""
    if segment_ids is None:
        return jnp.full((batch, length), length - 1, jnp.int32)
    t = jnp.arange(length, dtype=jnp.int32)
    changed = segment_ids[:, 1:] != segment_ids[:, :-1]
    is_end = jnp.concatenate([changed, jnp.ones((batch, 1), bool)], axis=1)
    return lax.cummin(jnp.where(is_end, t, length), axis=1, reverse=True)


def document_positions(segment_ids, batch: int, length: int):
    """[B, T] int32 position of each token inside its document (`arange(T)` without segment_ids):
    positions restart at 0 at every document start, which is what makes a packed document see
    exactly what it sees alone."""
    return positions(batch, length) - document_starts(segment_ids, batch, length)


class QueryLayout(NamedTuple):
    """Per query row [B, Tq] int32: absolute position in the sequence and the first token of its
    document."""

    position: jnp.ndarray
    document_start: jnp.ndarray


def query_layout(segment_ids, batch: int, num_queries: int, query_offset=None) -> QueryLayout:
    """Where the queries of q [B, Tq, ...] lie: every token of the sequence (query_offset None,
    Tq = T), or tokens query_offset .. query_offset + Tq - 1 of the sequence that segment_ids
    [B, T] spans (context parallelism: q is one device's shard and query_offset, an int or an int32
    scalar that may be traced, where it starts). Raises ValueError for query_offset without
    segment_ids."""
    rows = positions(batch, num_queries)
    if query_offset is None:
        return QueryLayout(rows, document_starts(segment_ids, batch, num_queries))
    starts = document_starts(segment_ids, batch, sequence_length(num_queries, segment_ids,
                                                                 query_offset))
    return QueryLayout(rows + query_offset,
                       lax.dynamic_slice_in_dim(starts, query_offset, num_queries, axis=1))


def sequence_length(num_queries: int, segment_ids, query_offset=None) -> int:
    """T of the sequence: the Tq rows of q, or with query_offset (q then holds a shard of the
    sequence, `query_layout`) the length of segment_ids, which must be given."""
    if query_offset is None:
        return num_queries
    if segment_ids is None:
        raise ValueError("query_offset needs segment_ids [B, T] (all zeros for one document): "
                         "they say how long the sequence is")
    return segment_ids.shape[1]


def num_compressed_slots(length: int, cfg: NSAConfig, packed: bool) -> int:
    """Tc of the layout above: T // d slots for packed documents, else cfg.num_compressed(T)."""
    return length // cfg.compress_stride if packed else cfg.num_compressed(length)


class CompressedLayout(NamedTuple):
    """Per compressed slot [B, Tc] int32: absolute index of its first raw token and its
    document-relative index i (both -1 for padding slots)."""

    start: jnp.ndarray
    index: jnp.ndarray


def compressed_layout(segment_ids, batch: int, length: int, cfg: NSAConfig) -> CompressedLayout:
    d, l = cfg.compress_stride, cfg.compress_block
    if segment_ids is None:
        tc = cfg.num_compressed(length)
        start = jnp.broadcast_to(jnp.arange(tc, dtype=jnp.int32) * d, (batch, tc))
        return CompressedLayout(start, start // d)
    tc = num_compressed_slots(length, cfg, packed=True)
    t = jnp.arange(length, dtype=jnp.int32)
    doc_start = document_starts(segment_ids, batch, length)
    doc_end = document_ends(segment_ids, batch, length)
    is_first = ((t - doc_start) % d == 0) & (t + l - 1 <= doc_end)
    slot = jnp.where(is_first, jnp.cumsum(is_first, axis=1) - 1, tc)
    rows = jnp.arange(batch)[:, None]
    start = jnp.full((batch, tc), -1, jnp.int32).at[rows, slot].set(
        jnp.broadcast_to(t, (batch, length)), mode="drop")
    doc = jnp.take_along_axis(doc_start, jnp.maximum(start, 0), axis=1)
    index = jnp.where(start >= 0, (start - doc) // d, -1)
    return CompressedLayout(start, index)


def compressed_visible(start, query_pos, query_doc_start, cfg: NSAConfig):
    """[B, Tq, Tc] bool: is compressed slot (first raw token `start` [B, Tc]) visible to each query
    (absolute position and document start [B, Tq])?

    A compressed token never straddles a document, so "starts inside the query's document and ends
    at or before the query" is the whole rule.
    """
    start = start[:, None, :]
    return ((start >= query_doc_start[:, :, None])
            & (start + cfg.compress_block - 1 <= query_pos[:, :, None]))


def selected_block_starts(indices, query_pos, query_doc_start, select_block: int):
    """Absolute first token of each selected block: indices [..., n] int (block ids counted from
    the query's document start) of queries at absolute positions `query_pos` with document
    starts `query_doc_start` (int32, both broadcastable to indices.shape[:-1]) -> [..., n]
    int32, -1 where the id names no key the query may see: negative, or a block starting after
    the query (every id past the document's or the sequence's blocks is one). Ids are compared
    with the query's own block before any multiplication, so no id, however large, overflows
    int32; the starts are <= the query's position.
    """
    own_block = ((query_pos - query_doc_start) // select_block)[..., None]
    indices = jnp.asarray(indices)
    usable = (indices >= 0) & (indices <= own_block)
    ids = jnp.where(usable, indices, 0).astype(jnp.int32)
    return jnp.where(usable, query_doc_start[..., None] + ids * select_block, -1)

