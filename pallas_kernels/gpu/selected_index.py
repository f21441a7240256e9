"""Index tables for the selected-block kernels, built in XLA.

Blocks are named by their absolute first key position `a` (doc_start[t] + j * l'), so packed
documents need no special case in the kernels: a block of a document may start anywhere in the
buffer.

* Query side (forward and dQ): each program owns a tile of `qb` consecutive query positions and
  walks the sorted union of the blocks its queries selected, each with a bit mask saying which of
  the `qb` queries selected it. Neighbouring queries mostly select the same blocks, so a tile loads
  each shared block once.
* Key side (dK/dV): the transpose, "which query tiles selected a block overlapping key tile kt",
  as a CSR list per (batch, KV head). An unaligned block overlaps two l'-aligned key tiles and is
  listed under both; every (row, key) pair stays covered by exactly one entry.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp

_NO_BLOCK = jnp.iinfo(jnp.int32).max


def absolute_block_starts(indices, doc_start, block: int):
    """[B, T, H, n] block ids -> first key position of each block, -1 where nothing is visible.

    A block starting after its query holds no visible key; it becomes -1 so that no kernel ever
    reads past the buffer for an out-of-range id.
    """
    t = jnp.arange(indices.shape[1], dtype=jnp.int32)[None, :, None, None]
    start = doc_start[:, :, None, None] + indices * block
    return jnp.where((indices >= 0) & (start <= t), start, -1).astype(jnp.int32)


def _union_of_row(starts, query, qb: int):
    """Sorted distinct starts of one tile (length L) with the bit mask of the queries using them."""
    length = starts.shape[0]
    # Sorting (start, query) pairs puts a repeated pair next to its twin, so it is counted once.
    key = jnp.where(starts >= 0, starts * qb + query, _NO_BLOCK)
    key = jnp.sort(key)
    valid = key != _NO_BLOCK
    prev = jnp.concatenate([jnp.full((1,), -1, key.dtype), key[:-1]])
    new_pair = valid & (key != prev)
    new_start = valid & (key // qb != prev // qb)
    slot = jnp.where(valid, jnp.cumsum(new_start) - 1, length)  # invalid entries: a dump slot
    union = jnp.zeros((length + 1,), jnp.int32).at[slot].set(jnp.where(valid, key // qb, 0))
    qbit = jnp.where(new_pair, jnp.left_shift(1, key % qb), 0)
    bits = jnp.zeros((length + 1,), jnp.int32).at[slot].add(qbit)  # distinct bits: add is OR
    return union[:length], bits[:length], jnp.sum(new_start, dtype=jnp.int32)


def query_tile_union(abs_starts, qb: int):
    """abs_starts [B, Tq, H, n] (Tq a multiple of qb) -> (starts, bits, count).

    starts/bits [B, H, Tq // qb, qb * n] int32, count [B, H, Tq // qb] int32: entry i < count of
    tile c is a block start and the mask of the tile's queries (bit r = query c * qb + r) using it.
    A block listed twice by one query counts once.
    """
    b, tq, h, n = abs_starts.shape
    tiles = abs_starts.reshape(b, tq // qb, qb, h, n).transpose(0, 3, 1, 2, 4)
    tiles = tiles.reshape(b * h * (tq // qb), qb * n)
    query = jnp.repeat(jnp.arange(qb, dtype=jnp.int32), n)
    starts, bits, count = jax.vmap(_union_of_row, in_axes=(0, None, None))(tiles, query, qb)
    shape = (b, h, tq // qb)
    return starts.reshape(*shape, qb * n), bits.reshape(*shape, qb * n), count.reshape(shape)


def key_tile_entries(starts, bits, count, block: int, num_key_tiles: int, pad: int, aligned: bool):
    """Transpose the query-side union into per-key-tile entry lists.

    Returns (entry_tile, entry_start, entry_bits) [B, H, E + pad] sorted by key tile (query tile
    ascending inside one key tile, so the dK/dV sums run in a fixed order) and offsets
    [B, H, num_key_tiles + 1]: key tile kt owns entries offsets[kt] .. offsets[kt + 1] - 1. The
    `pad` trailing zero entries let a kernel read a whole chunk past the last real one.
    """
    b, h, nqt, length = starts.shape
    valid = jnp.arange(length)[None, None, None, :] < count[..., None]
    first_tile = starts // block
    candidates = [(first_tile, valid)]
    if not aligned:
        second = first_tile + 1
        candidates.append((second, valid & (starts % block != 0) & (second < num_key_tiles)))
    tile_id = jnp.broadcast_to(jnp.arange(nqt, dtype=jnp.int32)[:, None], (nqt, length))
    flat = lambda x: jnp.broadcast_to(x, starts.shape).reshape(b, h, -1)
    key = jnp.concatenate([flat(jnp.where(ok, kt, num_key_tiles)) for kt, ok in candidates], -1)
    order = jnp.argsort(key, axis=-1, stable=True)
    fields = [jnp.concatenate([flat(x)] * len(candidates), -1) for x in (tile_id, starts, bits)]
    fields = [jnp.take_along_axis(x, order, axis=-1) for x in fields]
    fields = [jnp.pad(x, ((0, 0), (0, 0), (0, pad))) for x in fields]
    sorted_key = jnp.take_along_axis(key, order, axis=-1)
    edges = jnp.arange(num_key_tiles + 1, dtype=jnp.int32)
    search = jax.vmap(jax.vmap(lambda row: jnp.searchsorted(row, edges, side="left")))
    offsets = search(sorted_key).astype(jnp.int32)
    return (*fields, offsets)
