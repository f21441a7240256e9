"""Selected-block attention on TPU (Mosaic): forward, dQ and dK/dV kernels behind a custom_vjp.

Forward and dQ: grid (B*Hkv, query tiles). A tile holds block_q positions x G heads as rows.
The number of distinct blocks its queries selected is scalar-prefetched (PrefetchScalarGridSpec);
the block starts themselves arrive per step as an SMEM BlockSpec (pipelined like any block), since
all T*Hkv*n of them would not fit in SMEM at long T. The kernel walks them with a dynamic trip
count, DMAing each K/V block (K/V stay in HBM, memory_space=ANY) into a two-slot VMEM buffer
while the previous block is computed, and masks per row by "did this row select this block" and
"key <= query". dK/dV: grid (B*Hkv, key tiles of l' keys), walking the transposed list of query
tiles that touched the key tile (built in XLA, no atomics) the same way.
"""
from __future__ import annotations

import dataclasses
import functools
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import tpu as pltpu

from nsa_jax import layout
from nsa_jax.config import NSAConfig, require_int
from pallas_kernels import MASKED
from pallas_kernels.tpu import common


@dataclasses.dataclass(frozen=True)
class Tiling:
    """Tile options: block_q query positions (x G heads) per tile; None: enough for 128 rows."""
    block_q: int | None = None

    def __post_init__(self):
        if self.block_q is not None:
            require_int("Tiling.block_q", self.block_q, 1)


# --- Index tables, built in XLA: block j of query t's document covers the absolute tokens
# [doc_start[t] + j * l', doc_start[t] + (j + 1) * l'), so everything works with absolute starts.

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
    pos = layout.positions(b, t)[:, :, None]
    start = layout.selected_block_starts(indices, pos, doc_start[:, :, None], select_block)
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


class _Opts(NamedTuple):
    select_block: int
    scale: float
    block_q: int
    interpret: Any


class _Layout(NamedTuple):
    q: jnp.ndarray  # [B, Hkv, Tp*G, Dk]
    k: jnp.ndarray  # [B, Hkv, Tk, Dk], Tk >= T + l' (zero padded)
    v: jnp.ndarray  # [B, Hkv, Tk, Dv]
    pos: jnp.ndarray  # [B, Tp*G, 1] absolute query position, -1 for padded rows
    tiles: Any  # QueryTiles
    group: int


def _layout(q, k, v, indices, doc_start, opts: _Opts) -> _Layout:
    b, t, hq, _ = q.shape
    hkv, lp = k.shape[2], opts.select_block
    g = hq // hkv
    tp = common.round_up(t, opts.block_q)
    tk = (-(-t // lp) + 1) * lp
    pos = common.per_row(jnp.broadcast_to(jnp.arange(t, dtype=jnp.int32), (b, t)), g, tp, -1)
    tiles = query_tiles(indices, doc_start, select_block=lp, block_q=opts.block_q,
                        padded_length=tp, group=g)
    return _Layout(common.to_rows(q, hkv, tp), common.keys_major(k, tk), common.keys_major(v, tk),
                   pos[..., None], tiles, g)


def _block_mask(start, row_starts, pos, select_block):
    """[R, l'] bool: the row selected the block starting at `start` and the key is not after it."""
    member = jnp.max(jnp.where(row_starts == start, 1.0, 0.0), axis=1, keepdims=True) > 0
    key = start + lax.broadcasted_iota(jnp.int32, (1, select_block), 1)
    return member & (key <= pos)


def _walk_blocks(count_ref, blocks_ref, k_hbm, v_hbm, bufs, body, init):
    """gather_loop over the tile's selected blocks: body(start, k_block, v_block, carry)."""
    kbuf, vbuf, sems = bufs
    bh, i = pl.program_id(0), pl.program_id(1)
    hkv, lp = k_hbm.shape[1], kbuf.shape[1]
    b, h = bh // hkv, bh % hkv
    sources = [lambda u, ref=ref: ref.at[b, h, pl.ds(blocks_ref[0, u], lp)]
               for ref in (k_hbm, v_hbm)]
    count = count_ref[bh * pl.num_programs(1) + i]
    step = lambda u, views, carry: body(blocks_ref[0, u], views[0][...], views[1][...], carry)
    return common.gather_loop(count, sources, [kbuf, vbuf], sems, step, init)


def _fwd_kernel(count_ref, blocks_ref, q_ref, pos_ref, starts_ref, k_hbm, v_hbm, o_ref, lse_ref,
                *bufs, opts: _Opts):
    q, pos, row_starts = q_ref[...], pos_ref[...], starts_ref[...]

    def body(start, k, v, carry):
        logits = common.dot(q, k, transpose_b=True) * opts.scale
        mask = _block_mask(start, row_starts, pos, opts.select_block)
        return common.online_softmax_step(carry, logits, mask, v)

    rows = q.shape[0]
    init = (jnp.full((rows, 1), MASKED, jnp.float32), jnp.zeros((rows, 1), jnp.float32),
            jnp.zeros((rows, o_ref.shape[-1]), jnp.float32))
    o, lse = common.softmax_result(*_walk_blocks(count_ref, blocks_ref, k_hbm, v_hbm, bufs, body,
                                                 init))
    o_ref[...] = o.astype(o_ref.dtype)
    lse_ref[...] = lse


def _dq_kernel(count_ref, blocks_ref, q_ref, pos_ref, starts_ref, do_ref, lse_ref, delta_ref,
               k_hbm, v_hbm, dq_ref, *bufs, opts: _Opts):
    q, pos, row_starts = q_ref[...], pos_ref[...], starts_ref[...]
    do, lse, delta = do_ref[...], lse_ref[...], delta_ref[...]

    def body(start, k, v, dq):
        logits = common.dot(q, k, transpose_b=True) * opts.scale
        p = common.recomputed_probs(logits, _block_mask(start, row_starts, pos, opts.select_block),
                                    lse)
        ds = p * (common.dot(do, v, transpose_b=True) - delta)
        return dq + common.dot(ds.astype(k.dtype), k)

    dq = _walk_blocks(count_ref, blocks_ref, k_hbm, v_hbm, bufs, body,
                      jnp.zeros(dq_ref.shape, jnp.float32))
    dq_ref[...] = (dq * opts.scale).astype(dq_ref.dtype)


def _dkv_kernel(count_ref, tiles_ref, k_ref, v_ref, q_hbm, do_hbm, rowf_hbm, rowi_hbm,
                dk_ref, dv_ref, *bufs, opts: _Opts):
    """rowf [2, R]: (lse, delta) per row; rowi [1 + n, R]: (position, block starts) per row."""
    qbuf, dobuf, fbuf, ibuf, sems = bufs
    bh, c = pl.program_id(0), pl.program_id(1)
    hkv, rows, lp = q_hbm.shape[1], qbuf.shape[1], opts.select_block
    b, h = bh // hkv, bh % hkv
    sources = [lambda s, ref=ref: ref.at[b, h, pl.ds(tiles_ref[0, s] * rows, rows)]
               for ref in (q_hbm, do_hbm)]
    sources += [lambda s, ref=ref: ref.at[b, h, :, pl.ds(tiles_ref[0, s] * rows, rows)]
                for ref in (rowf_hbm, rowi_hbm)]
    k, v = k_ref[...], v_ref[...]
    key = c * lp + lax.broadcasted_iota(jnp.int32, (lp, 1), 0)

    def body(_, views, carry):
        q, do, rowf, rowi = (view[...] for view in views)
        member = jnp.zeros((lp, rows), bool)
        for j in range(1, rowi.shape[0]):
            start = rowi[j:j + 1]
            member |= (start >= 0) & (start <= key) & (key < start + lp)
        mask = member & (key <= rowi[0:1])
        p_t = common.recomputed_probs(common.dot(k, q, transpose_b=True) * opts.scale, mask,
                                      rowf[0:1])
        ds_t = p_t * (common.dot(v, do, transpose_b=True) - rowf[1:2])
        dk, dv = carry
        return dk + common.dot(ds_t.astype(q.dtype), q), dv + common.dot(p_t.astype(do.dtype), do)

    count = count_ref[bh * pl.num_programs(1) + c]
    init = (jnp.zeros(dk_ref.shape, jnp.float32), jnp.zeros(dv_ref.shape, jnp.float32))
    dk, dv = common.gather_loop(count, sources, [qbuf, dobuf, fbuf, ibuf], sems, body, init)
    dk_ref[...] = (dk * opts.scale).astype(dk_ref.dtype)
    dv_ref[...] = dv.astype(dv_ref.dtype)


def _rows_spec(rows: int, width: int, hkv: int):
    return pl.BlockSpec((None, None, rows, width), lambda bh, i, *_: (bh // hkv, bh % hkv, i, 0))


def _smem_list_spec(width: int):
    """This grid step's list [1, width] of a [B*Hkv, tiles, 1, width] array, into SMEM."""
    return pl.BlockSpec((None, None, 1, width), lambda bh, i, _: (bh, i, 0, 0),
                        memory_space=pltpu.SMEM)


def _call(kernel, grid, in_specs, out_specs, out_shape, scratch, opts, *args):
    return common.prefetch_call(functools.partial(kernel, opts=opts), args, grid=grid,
                                num_prefetch=1, in_specs=in_specs, out_specs=out_specs,
                                out_shape=out_shape, scratch=scratch, num_reduction_axes=0,
                                interpret=opts.interpret)


def _query_tile_call(kernel, lay: _Layout, row_inputs, outputs, opts: _Opts):
    """Forward/dQ pallas_call: scalar-prefetched block counts, SMEM block list, q rows, positions,
    row block starts, `row_inputs` (more [B, Hkv, Tp*G, *] arrays), K and V in HBM."""
    b, hkv, total, dk = lay.q.shape
    rows = opts.block_q * lay.group
    width = lay.tiles.blocks.shape[-1]
    in_specs = [_smem_list_spec(width),
                _rows_spec(rows, dk, hkv),
                pl.BlockSpec((None, rows, 1), lambda bh, i, _: (bh // hkv, i, 0)),
                _rows_spec(rows, lay.tiles.row_starts.shape[-1], hkv)]
    in_specs += [_rows_spec(rows, x.shape[-1], hkv) for x in row_inputs]
    in_specs += [pl.BlockSpec(memory_space=pl.ANY)] * 2
    out_specs = [_rows_spec(rows, o.shape[-1], hkv) for o in outputs]
    scratch = common.dma_scratch([((opts.select_block, dk), lay.k.dtype),
                                  ((opts.select_block, lay.v.shape[-1]), lay.v.dtype)])
    return _call(kernel, (b * hkv, total // rows), in_specs, out_specs, outputs, scratch, opts,
                 lay.tiles.count, lay.tiles.blocks, lay.q, lay.pos, lay.tiles.row_starts,
                 *row_inputs, lay.k, lay.v)


def _forward(q, k, v, indices, doc_start, opts: _Opts):
    lay = _layout(q, k, v, indices, doc_start, opts)
    b, hkv, total, _ = lay.q.shape
    outputs = [jax.ShapeDtypeStruct((b, hkv, total, v.shape[-1]), q.dtype),
               jax.ShapeDtypeStruct((b, hkv, total, 1), jnp.float32)]
    o_rows, lse_rows = _query_tile_call(_fwd_kernel, lay, [], outputs, opts)
    return common.from_rows(o_rows, q.shape[1], lay.group), (o_rows, lse_rows)


def _key_tile_call(lay: _Layout, do_rows, rowf, rowi, opts: _Opts):
    """dK/dV pallas_call over (B*Hkv, key tiles) with the transposed query-tile lists."""
    b, hkv, total, dk = lay.q.shape
    dv, lp = lay.v.shape[-1], opts.select_block
    rows = opts.block_q * lay.group
    num_key_tiles = lay.k.shape[2] // lp - 1
    order, count = key_tiles(lay.tiles, select_block=lp, num_key_tiles=num_key_tiles)
    key_spec = lambda width: pl.BlockSpec((None, None, lp, width),
                                          lambda bh, c, _: (bh // hkv, bh % hkv, c, 0))
    in_specs = [_smem_list_spec(order.shape[-1]), key_spec(dk), key_spec(dv)]
    in_specs += [pl.BlockSpec(memory_space=pl.ANY)] * 4
    outputs = [jax.ShapeDtypeStruct(lay.k.shape, lay.k.dtype),
               jax.ShapeDtypeStruct(lay.v.shape, lay.v.dtype)]
    scratch = common.dma_scratch([((rows, dk), lay.q.dtype), ((rows, dv), do_rows.dtype),
                                  ((rowf.shape[2], rows), rowf.dtype),
                                  ((rowi.shape[2], rows), rowi.dtype)])
    return _call(_dkv_kernel, (b * hkv, num_key_tiles), in_specs, [key_spec(dk), key_spec(dv)],
                 outputs, scratch, opts, count, order, lay.k, lay.v, lay.q, do_rows, rowf, rowi)


def _backward(opts: _Opts, res, do):
    q, k, v, indices, doc_start, o_rows, lse_rows = res
    lay = _layout(q, k, v, indices, doc_start, opts)
    t, hkv = q.shape[1], k.shape[2]
    do_rows = common.to_rows(do, hkv, lay.q.shape[2] // lay.group)
    delta = jnp.sum(do_rows.astype(jnp.float32) * o_rows.astype(jnp.float32), -1, keepdims=True)
    lse = common.lse_for_backward(lse_rows)
    dq_out = [jax.ShapeDtypeStruct(lay.q.shape, q.dtype)]
    (dq_rows,) = _query_tile_call(_dq_kernel, lay, [do_rows, lse, delta], dq_out, opts)
    rowf = jnp.concatenate([lse, delta], -1).transpose(0, 1, 3, 2)
    pos = jnp.broadcast_to(lay.pos[:, None], lay.q.shape[:3] + (1,))
    rowi = jnp.concatenate([pos, lay.tiles.row_starts], -1).transpose(0, 1, 3, 2)
    dk, dv = _key_tile_call(lay, do_rows, rowf, rowi, opts)
    from_keys = lambda x: x[:, :, :t].transpose(0, 2, 1, 3)
    return (common.from_rows(dq_rows, t, lay.group), from_keys(dk), from_keys(dv), None, None)


# (q, k, v, indices, doc_start, opts); residuals (o_rows, lse_rows)
_selected = common.kernel_with_vjp(_forward, _backward, num_inputs=5)


def selected_attention(q, k, v, indices, cfg: NSAConfig, *, segment_ids=None, scale=None,
                       interpret: Any = False, tiling: Tiling | None = None):
    """Attention of each query over the keys of its selected blocks -> [B, T, Hq, Dv]: the
    semantics of nsa_jax.ops.selected_attention (nsa_spec.md §2.3).

    q [B, T, Hq, Dk], k [B, T, Hkv, Dk], v [B, T, Hkv, Dv] (float32 or bfloat16); indices
    [B, T, Hkv, n] int: block j of the query's document covers its tokens [j*l', (j+1)*l'), keys
    after the query are masked, negative slots are skipped and a repeated block counts once;
    segment_ids [B, T] int or None; scale defaults to 1/sqrt(Dk). `interpret` is passed to
    pallas_call (e.g. pltpu.InterpretParams()).
    """
    b, t, hq, dk = q.shape
    group = hq // k.shape[2]
    block_q = (tiling or Tiling()).block_q or common.default_block_q(group)
    opts = _Opts(cfg.select_block, float(dk ** -0.5 if scale is None else scale), block_q,
                 interpret)
    return _selected(q, k, v, indices.astype(jnp.int32),
                     layout.document_starts(segment_ids, b, t), opts)
