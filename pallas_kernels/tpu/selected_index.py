"""Index tensors of the selected-block kernels, built in XLA before the kernels run.

Selection block j of the document of query t covers the absolute tokens
[doc_start[t] + j * l', doc_start[t] + (j + 1) * l'), so with packed documents a block need not be
aligned to l'. Everything below therefore works with absolute block starts.
"""
from __future__ import annotations

from typing import NamedTuple

import jax.numpy as jnp

from pallas_kernels.tpu import common

class QueryTiles(NamedTuple):
    """row_starts [B, Hkv, Tp*G, n]: each row's usable block starts (-1: slot unused);
    blocks [B*Hkv, NT, 1, QB*n]: the distinct block starts any query of a tile uses, ascending;
    count [B*Hkv*NT]: how many entries of `blocks` are real."""

    row_starts: jnp.ndarray
    blocks: jnp.ndarray
    count: jnp.ndarray


def query_tiles(indices, doc_start, *, select_block: int, block_q: int, padded_length: int,
                group: int) -> QueryTiles:
    """Slots that are -1, repeat an earlier slot, or start after the query (so contribute nothing)
    are dropped here; that also keeps every DMA inside [0, T + l')."""
    b, t, hkv, n = indices.shape
    num_blocks = -(-t // select_block)
    idx = jnp.clip(indices, -1, num_blocks)
    start = doc_start[:, :, None, None] + idx * select_block
    pos = jnp.arange(t, dtype=jnp.int32)[None, :, None, None]
    start = jnp.where((idx >= 0) & (start <= pos), start, -1)  # [B, T, Hkv, n]
    rows = common.per_row(start, group, padded_length, -1)  # [B, Tp*G, Hkv, n]
    row_starts = rows.transpose(0, 2, 1, 3)

    padded = jnp.pad(start, [(0, 0), (0, padded_length - t), (0, 0), (0, 0)], constant_values=-1)
    nt = padded_length // block_q
    tiles = padded.reshape(b, nt, block_q, hkv, n).transpose(0, 3, 1, 2, 4)
    unused = common.AFTER_ALL
    tiles = jnp.sort(jnp.where(tiles >= 0, tiles, unused).reshape(b * hkv, nt, block_q * n), -1)
    first = jnp.concatenate([jnp.ones_like(tiles[..., :1], bool),
                             tiles[..., 1:] != tiles[..., :-1]], axis=-1) & (tiles != unused)
    blocks = jnp.sort(jnp.where(first, tiles, unused), axis=-1)
    blocks = jnp.where(blocks == unused, 0, blocks)
    count = jnp.sum(first, axis=-1, dtype=jnp.int32).reshape(-1)
    return QueryTiles(row_starts, blocks[:, :, None], count)


def key_tiles(tiles: QueryTiles, *, select_block: int, num_key_tiles: int):
    """The transposed index for dK/dV: for every aligned key tile of l' keys, the query tiles
    whose selected blocks overlap it (ascending, [B*Hkv, NKT, 1, NT]) and their number
    ([B*Hkv*NKT]). An unaligned block overlaps two key tiles and is listed under both."""
    blocks = tiles.blocks[:, :, 0]
    bh, nt, width = blocks.shape
    used = jnp.arange(width) < tiles.count.reshape(bh, nt)[..., None]
    hit = jnp.zeros((bh, num_key_tiles + 1, nt), bool)
    rows = jnp.arange(bh)[:, None, None]
    cols = jnp.arange(nt)[None, :, None]
    for last_key in (0, select_block - 1):
        key_tile = jnp.where(used, (blocks + last_key) // select_block, num_key_tiles)
        hit = hit.at[rows, key_tile, cols].set(True)
    hit = hit[:, :num_key_tiles]
    order = jnp.argsort(~hit, axis=-1, stable=True).astype(jnp.int32)
    return order[:, :, None], jnp.sum(hit, axis=-1, dtype=jnp.int32).reshape(-1)
