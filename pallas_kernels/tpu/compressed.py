"""Compressed attention on TPU (Mosaic): flash-style forward, dQ and dK/dV kernels behind a
custom_vjp.

Slot c (first raw token start[c], -1 for padding) is visible to query t iff
doc_start[t] <= start[c] and start[c] + l - 1 <= t. Valid slot starts ascend, so the slots a query
tile may see, and the query tiles that may see a slot tile, are contiguous ranges; they are
computed in XLA and scalar-prefetched. Index maps clamp the grid's reduction axis into that range
(an unchanged block index issues no new DMA) and steps outside it skip their compute.
Forward/dQ grid: (B*Hkv, query tiles, slot tiles); dK/dV grid: (B*Hkv, slot tiles, query tiles).
"""
from __future__ import annotations

import dataclasses
import functools
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import tpu as pltpu

from nsa_jax import layout
from nsa_jax.config import NSAConfig, require_int
from pallas_kernels import MASKED
from pallas_kernels.tpu import common


@dataclasses.dataclass(frozen=True)
class Tiling:
    """Tile options: block_q query positions (x G heads) per query tile (None: enough for 128
    rows), block_k compressed slots per slot tile."""
    block_q: int | None = None
    block_k: int = 128

    def __post_init__(self):
        if self.block_q is not None:
            require_int("Tiling.block_q", self.block_q, 1)
        require_int("Tiling.block_k", self.block_k, 1)


class _Opts(NamedTuple):
    compress_block: int
    scale: float
    block_q: int
    block_k: int
    interpret: Any


class _Layout(NamedTuple):
    q: jnp.ndarray  # [B, Hkv, Tp*G, Dk]
    k: jnp.ndarray  # [B, Hkv, Tcp, Dk]
    v: jnp.ndarray  # [B, Hkv, Tcp, Dv]
    pos: jnp.ndarray  # [B, Tp*G, 1], -1 for padded rows
    doc: jnp.ndarray  # [B, Tp*G, 1]
    start: jnp.ndarray  # [B, 1, Tcp], -1 for padding slots
    slot_range: tuple  # ([B*NQ], [B*NQ]): slot tiles [lo, hi) each query tile may see
    query_range: tuple  # ([B*NK], [B*NK]): query tiles [lo, hi) that may see each slot tile
    group: int


def _ranges(doc_start, starts, opts: _Opts, tp: int):
    """Slot-tile range per query tile and query-tile range per slot tile (see the module
    docstring), from the padded slot starts [B, Tcp]. Too wide would only waste work (the kernels
    mask every logit); these are tight."""
    b, t = doc_start.shape
    tcp = starts.shape[1]
    l, qb, kb = opts.compress_block, opts.block_q, opts.block_k
    ascending = jnp.where(starts >= 0, starts, common.AFTER_ALL)
    search = jax.vmap(functools.partial(jnp.searchsorted, side="left"))
    search_right = jax.vmap(functools.partial(jnp.searchsorted, side="right"))

    first_q = jnp.arange(0, tp, qb)
    last_q = jnp.minimum(first_q + qb, t) - 1
    lo = search(ascending, doc_start[:, first_q])
    hi = search_right(ascending, jnp.broadcast_to(last_q - (l - 1), (b, len(last_q))))
    slot_lo, slot_hi = lo // kb, jnp.where(hi > lo, -(-hi // kb), lo // kb)

    tiles = starts.reshape(b, tcp // kb, kb)
    smin = jnp.min(jnp.where(tiles >= 0, tiles, common.AFTER_ALL), axis=-1)
    smax = jnp.max(tiles, axis=-1)
    seen_until = search_right(doc_start, smax)  # first query whose document starts after smax
    q_lo = jnp.where(smax >= 0, (smin + l - 1) // qb, 0)
    q_hi = jnp.where(smax >= 0, -(-seen_until // qb), 0)

    def pack(lo, hi, num_tiles):  # lo kept a valid tile index so clamped index maps stay in range
        empty = hi <= lo
        lo = jnp.minimum(lo, num_tiles - 1)
        hi = jnp.where(empty, lo, hi)
        return lo.reshape(-1).astype(jnp.int32), hi.reshape(-1).astype(jnp.int32)

    return pack(slot_lo, slot_hi, tcp // kb), pack(q_lo, q_hi, tp // qb)


def _layout(q, k, v, doc_start, slot_start, opts: _Opts) -> _Layout:
    b, t, hq, _ = q.shape
    hkv = k.shape[2]
    g = hq // hkv
    tp = common.round_up(t, opts.block_q)
    tcp = common.round_up(max(k.shape[1], 1), opts.block_k)
    pos = common.per_row(jnp.broadcast_to(jnp.arange(t, dtype=jnp.int32), (b, t)), g, tp, -1)
    start = jnp.pad(slot_start, [(0, 0), (0, tcp - slot_start.shape[1])], constant_values=-1)
    slot_range, query_range = _ranges(doc_start, start, opts, tp)
    return _Layout(common.to_rows(q, hkv, tp), common.keys_major(k, tcp),
                   common.keys_major(v, tcp), pos[..., None],
                   common.per_row(doc_start, g, tp, 0)[..., None], start[:, None, :],
                   slot_range, query_range, g)


def _visible(start, pos, doc, compress_block):
    return (start >= doc) & (start + (compress_block - 1) <= pos)


def _active(lo_ref, hi_ref, kv_heads: int):
    """Does this grid step's reduction tile lie in its (batch, outer tile)'s range?"""
    r = (pl.program_id(0) // kv_heads) * pl.num_programs(1) + pl.program_id(1)
    j = pl.program_id(2)
    return (j >= lo_ref[r]) & (j < hi_ref[r])


def _spec_makers(kv_heads: int, tiles_outer: int):
    """BlockSpec makers for grid (B*Hkv, outer, reduction): `outer` blocks follow the outer tile,
    `inner` blocks the reduction tile clamped into [lo, hi - 1] (lo when empty). place(b, h, tile)
    returns the block indices."""

    def clamp(bh, i, j, lo_ref, hi_ref):
        r = (bh // kv_heads) * tiles_outer + i
        lo, hi = lo_ref[r], hi_ref[r]
        return jnp.minimum(jnp.maximum(j, lo), jnp.maximum(hi - 1, lo))

    def outer(block, place):
        return pl.BlockSpec(block, lambda bh, i, j, *_: place(bh // kv_heads, bh % kv_heads, i))

    def inner(block, place):
        return pl.BlockSpec(block, lambda bh, i, j, *refs: place(
            bh // kv_heads, bh % kv_heads, clamp(bh, i, j, *refs)))

    return outer, inner


def _fwd_kernel(lo_ref, hi_ref, q_ref, pos_ref, doc_ref, start_ref, k_ref, v_ref, o_ref, lse_ref,
                m_sc, l_sc, acc_sc, *, opts: _Opts, kv_heads: int):
    @pl.when(pl.program_id(2) == 0)
    def _():
        m_sc[...] = jnp.full(m_sc.shape, MASKED, jnp.float32)
        l_sc[...] = jnp.zeros(l_sc.shape, jnp.float32)
        acc_sc[...] = jnp.zeros(acc_sc.shape, jnp.float32)

    @pl.when(_active(lo_ref, hi_ref, kv_heads))
    def _():
        logits = common.dot(q_ref[...], k_ref[...], transpose_b=True) * opts.scale
        mask = _visible(start_ref[...], pos_ref[...], doc_ref[...], opts.compress_block)
        carry = (m_sc[...], l_sc[...], acc_sc[...])
        m_sc[...], l_sc[...], acc_sc[...] = common.online_softmax_step(carry, logits, mask,
                                                                       v_ref[...])

    @pl.when(pl.program_id(2) == pl.num_programs(2) - 1)
    def _():
        o, lse = common.softmax_result(m_sc[...], l_sc[...], acc_sc[...])
        o_ref[...] = o.astype(o_ref.dtype)
        lse_ref[...] = lse


def _dq_kernel(lo_ref, hi_ref, q_ref, pos_ref, doc_ref, do_ref, lse_ref, delta_ref, start_ref,
               k_ref, v_ref, dq_ref, dq_sc, *, opts: _Opts, kv_heads: int):
    @pl.when(pl.program_id(2) == 0)
    def _():
        dq_sc[...] = jnp.zeros(dq_sc.shape, jnp.float32)

    @pl.when(_active(lo_ref, hi_ref, kv_heads))
    def _():
        k = k_ref[...]
        logits = common.dot(q_ref[...], k, transpose_b=True) * opts.scale
        mask = _visible(start_ref[...], pos_ref[...], doc_ref[...], opts.compress_block)
        p = common.recomputed_probs(logits, mask, lse_ref[...])
        ds = p * (common.dot(do_ref[...], v_ref[...], transpose_b=True) - delta_ref[...])
        dq_sc[...] += common.dot(ds.astype(k.dtype), k)

    @pl.when(pl.program_id(2) == pl.num_programs(2) - 1)
    def _():
        dq_ref[...] = (dq_sc[...] * opts.scale).astype(dq_ref.dtype)


def _dkv_kernel(lo_ref, hi_ref, k_ref, v_ref, start_ref, q_ref, do_ref, pos_ref, doc_ref, rowf_ref,
                dk_ref, dv_ref, dk_sc, dv_sc, *, opts: _Opts, kv_heads: int):
    """Transposed: slots on sublanes, query rows on lanes; rowf [2, R] = (lse, delta)."""

    @pl.when(pl.program_id(2) == 0)
    def _():
        dk_sc[...] = jnp.zeros(dk_sc.shape, jnp.float32)
        dv_sc[...] = jnp.zeros(dv_sc.shape, jnp.float32)

    @pl.when(_active(lo_ref, hi_ref, kv_heads))
    def _():
        q, do, rowf = q_ref[...], do_ref[...], rowf_ref[...]
        logits_t = common.dot(k_ref[...], q, transpose_b=True) * opts.scale
        mask = _visible(start_ref[...], pos_ref[...], doc_ref[...], opts.compress_block)
        p_t = common.recomputed_probs(logits_t, mask, rowf[0:1])
        ds_t = p_t * (common.dot(v_ref[...], do, transpose_b=True) - rowf[1:2])
        dk_sc[...] += common.dot(ds_t.astype(q.dtype), q)
        dv_sc[...] += common.dot(p_t.astype(do.dtype), do)

    @pl.when(pl.program_id(2) == pl.num_programs(2) - 1)
    def _():
        dk_ref[...] = (dk_sc[...] * opts.scale).astype(dk_ref.dtype)
        dv_ref[...] = dv_sc[...].astype(dv_ref.dtype)


def _call(kernel, lay: _Layout, ranges, grid, in_specs, out_specs, out_shape, scratch, opts, args):
    kernel = functools.partial(kernel, opts=opts, kv_heads=lay.q.shape[1])
    return common.prefetch_call(kernel, (*ranges, *args), grid=grid, num_prefetch=2,
                                in_specs=in_specs, out_specs=out_specs, out_shape=out_shape,
                                scratch=scratch, num_reduction_axes=1, interpret=opts.interpret)


def _query_tile_call(kernel, lay: _Layout, row_inputs, outputs, scratch, opts: _Opts):
    """Forward/dQ: q rows, positions, documents, `row_inputs` ([B, Hkv, Tp*G, *] each), then slot
    starts, K and V along the reduction axis."""
    b, hkv, total, dk = lay.q.shape
    rows, kb = opts.block_q * lay.group, opts.block_k
    nq, nk = total // rows, lay.k.shape[2] // kb
    outer, inner = _spec_makers(hkv, nq)
    rows_spec = lambda w: outer((None, None, rows, w), lambda b_, h, i: (b_, h, i, 0))
    col_spec = outer((None, rows, 1), lambda b_, h, i: (b_, i, 0))
    in_specs = [rows_spec(dk), col_spec, col_spec] + [rows_spec(x.shape[-1]) for x in row_inputs]
    in_specs += [inner((None, 1, kb), lambda b_, h, j: (b_, 0, j))]
    in_specs += [inner((None, None, kb, x.shape[-1]), lambda b_, h, j: (b_, h, j, 0))
                 for x in (lay.k, lay.v)]
    out_specs = [rows_spec(o.shape[-1]) for o in outputs]
    return _call(kernel, lay, lay.slot_range, (b * hkv, nq, nk), in_specs, out_specs, outputs,
                 scratch, opts, (lay.q, lay.pos, lay.doc, *row_inputs, lay.start, lay.k, lay.v))


def _slot_tile_call(lay: _Layout, do_rows, rowf, opts: _Opts):
    """dK/dV: K, V and slot starts per slot tile; q/do rows, positions, documents and (lse,
    delta) along the reduction axis (query tiles), rows on lanes where they are per-row scalars."""
    b, hkv, total, dk = lay.q.shape
    dv = lay.v.shape[-1]
    rows, kb = opts.block_q * lay.group, opts.block_k
    nq, nk = total // rows, lay.k.shape[2] // kb
    outer, inner = _spec_makers(hkv, nk)
    slot_spec = lambda w: outer((None, None, kb, w), lambda b_, h, c: (b_, h, c, 0))
    in_specs = [slot_spec(dk), slot_spec(dv), outer((None, kb, 1), lambda b_, h, c: (b_, c, 0))]
    in_specs += [inner((None, None, rows, w), lambda b_, h, i: (b_, h, i, 0)) for w in (dk, dv)]
    in_specs += [inner((None, 1, rows), lambda b_, h, i: (b_, 0, i))] * 2
    in_specs += [inner((None, None, 2, rows), lambda b_, h, i: (b_, h, 0, i))]
    outputs = [jax.ShapeDtypeStruct(lay.k.shape, lay.k.dtype),
               jax.ShapeDtypeStruct(lay.v.shape, lay.v.dtype)]
    scratch = [pltpu.VMEM((kb, dk), jnp.float32), pltpu.VMEM((kb, dv), jnp.float32)]
    lanes = lambda x: x.transpose(0, 2, 1)
    args = (lay.k, lay.v, lanes(lay.start), lay.q, do_rows, lanes(lay.pos), lanes(lay.doc), rowf)
    return _call(_dkv_kernel, lay, lay.query_range, (b * hkv, nk, nq), in_specs,
                 [slot_spec(dk), slot_spec(dv)], outputs, scratch, opts, args)


def _forward(q, k, v, doc_start, slot_start, opts: _Opts):
    lay = _layout(q, k, v, doc_start, slot_start, opts)
    b, hkv, total, _ = lay.q.shape
    rows, dv = opts.block_q * lay.group, v.shape[-1]
    outputs = [jax.ShapeDtypeStruct((b, hkv, total, dv), q.dtype),
               jax.ShapeDtypeStruct((b, hkv, total, 1), jnp.float32)]
    scratch = [pltpu.VMEM((rows, 1), jnp.float32), pltpu.VMEM((rows, 1), jnp.float32),
               pltpu.VMEM((rows, dv), jnp.float32)]
    o_rows, lse_rows = _query_tile_call(_fwd_kernel, lay, [], outputs, scratch, opts)
    t = q.shape[1]
    o = common.from_rows(o_rows, t, lay.group)
    return (o, common.from_rows(lse_rows, t, lay.group)[..., 0]), (o_rows, lse_rows)


def _backward(opts: _Opts, res, cotangents):
    q, k, v, doc_start, slot_start, o_rows, lse_rows = res
    do, dlse = cotangents
    lay = _layout(q, k, v, doc_start, slot_start, opts)
    t, hkv = q.shape[1], k.shape[2]
    tp = lay.q.shape[2] // lay.group
    do_rows = common.to_rows(do, hkv, tp)
    # d lse / d logits = p, so the lse cotangent enters as a shift of delta.
    delta = jnp.sum(do_rows.astype(jnp.float32) * o_rows.astype(jnp.float32), -1, keepdims=True)
    delta = delta - common.to_rows(dlse[..., None].astype(jnp.float32), hkv, tp)
    lse = common.lse_for_backward(lse_rows)
    scratch = [pltpu.VMEM((opts.block_q * lay.group, q.shape[-1]), jnp.float32)]
    (dq_rows,) = _query_tile_call(_dq_kernel, lay, [do_rows, lse, delta],
                                  [jax.ShapeDtypeStruct(lay.q.shape, q.dtype)], scratch, opts)
    rowf = jnp.concatenate([lse, delta], -1).transpose(0, 1, 3, 2)
    dk, dv = _slot_tile_call(lay, do_rows, rowf, opts)
    tc = k.shape[1]
    from_slots = lambda x: x[:, :, :tc].transpose(0, 2, 1, 3)
    return common.from_rows(dq_rows, t, lay.group), from_slots(dk), from_slots(dv), None, None


# (q, k, v, doc_start, slot_start, opts); residuals (o_rows, lse_rows)
_compressed = common.kernel_with_vjp(_forward, _backward, num_inputs=5)


def compressed_attention(q, k_cmp, v_cmp, cfg: NSAConfig, *, segment_ids=None, scale=None,
                         interpret: Any = False, tiling: Tiling | None = None):
    """Attention over compressed tokens -> (o [B, T, Hq, Dv], lse [B, T, Hq] float32): the
    semantics of nsa_jax.ops.compressed_attention (nsa_spec.md §2.1).

    q [B, T, Hq, Dk], k_cmp [B, Tc, Hkv, Dk], v_cmp [B, Tc, Hkv, Dv] (float32 or bfloat16), slots
    laid out as nsa_jax.layout says; segment_ids [B, T] int or None; scale defaults to 1/sqrt(Dk).
    Rows that see nothing get o = 0 and lse = -inf (zero gradients). `interpret` is passed to
    pallas_call (e.g. pltpu.InterpretParams()).
    """
    b, t, hq, dk = q.shape
    group = hq // k_cmp.shape[2]
    tiling = tiling or Tiling()
    opts = _Opts(cfg.compress_block, float(dk ** -0.5 if scale is None else scale),
                 tiling.block_q or common.default_block_q(group), tiling.block_k, interpret)
    return _compressed(q, k_cmp, v_cmp, layout.document_starts(segment_ids, b, t),
                       layout.compressed_layout(segment_ids, b, t, cfg).start, opts)
