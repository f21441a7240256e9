"""Backward kernels of compressed-token attention (Pallas, Triton lowering), without atomics.

* dQ: the forward grid and key-tile walk; probabilities recomputed from the saved LSE.
* dK/dV: grid (key tile, batch * KV head). A program walks the query tiles that can see any slot
  of its key tile (ranges precomputed in XLA) and writes its dK/dV tile once.
`delta` is rowsum(o * dO) minus the LSE cotangent, so gradients through the LSE come for free.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as pltriton

from pallas_kernels.gpu.compressed_fwd import (CompressedTiling, query_tile_specs, row_bounds,
                                               scores, slot_visible)


def _dq_kernel(lo_ref, hi_ref, doc_ref, start_ref, q_ref, k_ref, v_ref, do_ref, lse_ref,
               delta_ref, dq_ref, *, tiling: CompressedTiling):
    rows, kb = tiling.rows, tiling.key_block
    q = q_ref[...].reshape(rows, q_ref.shape[-1])
    do = do_ref[...].reshape(rows, do_ref.shape[-1])
    lse, delta = lse_ref[...][:, None], delta_ref[...][:, None]
    lowest, highest = row_bounds(doc_ref[...], pl.program_id(0) * tiling.qb, tiling.qb,
                                 tiling.gp, tiling.compress_block)

    def step(j, dq):
        first = pl.multiple_of(j * kb, kb)
        k = k_ref[pl.ds(first, kb), :]
        v = v_ref[pl.ds(first, kb), :]
        mask = slot_visible(start_ref[pl.ds(first, kb)], lowest, highest)
        p = jnp.where(mask, jnp.exp(scores(q, k, tiling.scale) - lse), 0.0)
        ds = p * (scores(do, v, 1.0) - delta)
        return dq + jnp.dot(ds.astype(k.dtype), k, preferred_element_type=jnp.float32)

    dq = jax.lax.fori_loop(lo_ref[...], hi_ref[...], step, jnp.zeros(q.shape, jnp.float32))
    dq_ref[...] = (dq * tiling.scale).astype(dq_ref.dtype).reshape(dq_ref.shape)


def _dkv_kernel(lo_ref, hi_ref, doc_ref, start_ref, q_ref, do_ref, lse_ref, delta_ref, k_ref,
                v_ref, dk_ref, dv_ref, *, tiling: CompressedTiling):
    qb, gp = tiling.bwd_qb, tiling.gp
    rows = qb * gp
    k, v = k_ref[...], v_ref[...]
    start = start_ref[...]

    def step(c, carry):
        dk, dv = carry
        first = pl.multiple_of(c * qb, qb)
        q = q_ref[pl.ds(first, qb)].reshape(rows, q_ref.shape[-1])
        do = do_ref[pl.ds(first, qb)].reshape(rows, do_ref.shape[-1])
        lse = lse_ref[pl.ds(first * gp, rows)][:, None]
        delta = delta_ref[pl.ds(first * gp, rows)][:, None]
        lowest, highest = row_bounds(doc_ref[pl.ds(first, qb)], first, qb, gp,
                                     tiling.compress_block)
        mask = slot_visible(start, lowest, highest)
        p = jnp.where(mask, jnp.exp(scores(q, k, tiling.scale) - lse), 0.0)
        ds = p * (scores(do, v, 1.0) - delta)
        t_dot = lambda a, b: jax.lax.dot_general(a, b, (((0,), (0,)), ((), ())),
                                                 preferred_element_type=jnp.float32)
        return dk + t_dot(ds.astype(q.dtype), q), dv + t_dot(p.astype(do.dtype), do)

    init = (jnp.zeros(k.shape, jnp.float32), jnp.zeros(v.shape, jnp.float32))
    dk, dv = jax.lax.fori_loop(lo_ref[...], hi_ref[...], step, init)
    dk_ref[...] = (dk * tiling.scale).astype(dk_ref.dtype)
    dv_ref[...] = dv.astype(dv_ref.dtype)


def _bwd_params(tiling: CompressedTiling):
    return pltriton.CompilerParams(num_warps=tiling.bwd_num_warps,
                                   num_stages=tiling.bwd_num_stages)


def compressed_dq(tiling: CompressedTiling, q5, k, v, do5, lse, delta, start, doc, lo, hi):
    """dQ [B, Tq, H, gp, Dk] on the forward grid (lse: finite stand-in 0 where -inf)."""
    dk, dv = q5.shape[-1], v.shape[-1]
    specs = query_tile_specs(tiling, q5.shape, k.shape[1])
    return pl.pallas_call(
        lambda *refs: _dq_kernel(*refs, tiling=tiling),
        grid=specs["grid"],
        in_specs=[specs["tile"], specs["tile"], specs["doc"], specs["start"], specs["q"](dk),
                  specs["kv"](dk), specs["kv"](dv), specs["q"](dv), specs["rows"],
                  specs["rows"]],
        out_specs=specs["q"](dk),
        out_shape=jax.ShapeDtypeStruct(q5.shape, q5.dtype),
        compiler_params=_bwd_params(tiling),
        interpret=tiling.interpret,
        name="nsa_compressed_dq",
    )(lo, hi, doc, start, q5, k, v, do5, lse, delta)


def compressed_dkv(tiling: CompressedTiling, q5, k, v, do5, lse, delta, start, doc, lo, hi):
    """dK, dV [B, Tcp, H, D]; lo/hi [B, Tcp / bwd_key_block] query-tile ranges per key tile."""
    b, tq, h, gp, dk = q5.shape
    dv, kb, t_kv = v.shape[-1], tiling.bwd_key_block, k.shape[1]
    per_b = lambda c, bh: (bh // h, 0)
    whole_q = lambda dim: pl.BlockSpec((None, tq, None, gp, dim),
                                       lambda c, bh: (bh // h, 0, bh % h, 0, 0))
    key_tile = lambda dim: pl.BlockSpec((None, kb, None, dim), lambda c, bh: (bh // h, c, bh % h,
                                                                              0))
    rows_spec = pl.BlockSpec((None, None, tq * gp), lambda c, bh: (bh // h, bh % h, 0))
    tile = pl.BlockSpec((None, None), lambda c, bh: (bh // h, c))
    return pl.pallas_call(
        lambda *refs: _dkv_kernel(*refs, tiling=tiling),
        grid=(t_kv // kb, b * h),
        in_specs=[tile, tile, pl.BlockSpec((None, tq), per_b),
                  pl.BlockSpec((None, kb), lambda c, bh: (bh // h, c)), whole_q(dk), whole_q(dv),
                  rows_spec, rows_spec, key_tile(dk), key_tile(dv)],
        out_specs=[key_tile(dk), key_tile(dv)],
        out_shape=[jax.ShapeDtypeStruct(k.shape, k.dtype), jax.ShapeDtypeStruct(v.shape, v.dtype)],
        compiler_params=_bwd_params(tiling),
        interpret=tiling.interpret,
        name="nsa_compressed_dkv",
    )(lo, hi, doc, start, q5, do5, lse, delta, k, v)
