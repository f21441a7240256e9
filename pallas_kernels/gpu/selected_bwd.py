"""Backward kernels of selected-block attention (Pallas, Triton lowering), without atomics.

* dQ: the forward grid and block walk; probabilities recomputed from the saved LSE.
* dK/dV: grid (key tile of l' keys, batch * KV head). A program walks the CSR list of query tiles
  whose selected blocks overlap its key tile (selected_index.key_tile_entries), gathering
  `entries_per_step` of them per step, and writes its dK/dV tile once: deterministic sums.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as pltriton

from pallas_kernels.gpu.selected_fwd import Tiling, query_tile_specs, row_coords, scores, visible


def _dq_kernel(starts_ref, bits_ref, count_ref, q_ref, k_ref, v_ref, do_ref, lse_ref, delta_ref,
               dq_ref, *, tiling: Tiling):
    rows, block = tiling.rows, tiling.block
    q = q_ref[...].reshape(rows, q_ref.shape[-1])
    do = do_ref[...].reshape(rows, do_ref.shape[-1])
    lse, delta = lse_ref[...][:, None], delta_ref[...][:, None]
    query_in_tile, query_pos = row_coords(tiling)
    kpos0 = jax.lax.broadcasted_iota(jnp.int32, (1, block), 1)

    def step(i, dq):
        start = starts_ref[i]
        k = k_ref[pl.ds(start, block), :]
        v = v_ref[pl.ds(start, block), :]
        mask = visible(kpos0 + start, start, bits_ref[i], query_in_tile, query_pos, block)
        p = jnp.where(mask, jnp.exp(scores(q, k, tiling.scale) - lse), 0.0)
        ds = p * (scores(do, v, 1.0) - delta)
        return dq + jnp.dot(ds.astype(k.dtype), k, preferred_element_type=jnp.float32)

    dq = jax.lax.fori_loop(0, count_ref[...], step, jnp.zeros(q.shape, jnp.float32))
    dq_ref[...] = (dq * tiling.scale).astype(dq_ref.dtype).reshape(dq_ref.shape)


def _dkv_kernel(tile_ref, start_ref, bits_ref, offsets_ref, q_ref, do_ref, lse_ref, delta_ref,
                k_ref, v_ref, dk_ref, dv_ref, *, tiling: Tiling):
    qb, gp, block = tiling.qb, tiling.gp, tiling.block
    per_step = tiling.entries_per_step
    rows = per_step * qb * gp
    kt = pl.program_id(0)
    begin, end = offsets_ref[kt], offsets_ref[kt + 1]
    k, v = k_ref[...], v_ref[...]
    kpos = kt * block + jax.lax.broadcasted_iota(jnp.int32, (1, block), 1)
    row = jax.lax.broadcasted_iota(jnp.int32, (rows,), 0)
    query_in_tile = (row // gp) % qb
    tok = jax.lax.broadcasted_iota(jnp.int32, (per_step * qb,), 0)

    def step(i, carry):
        dk, dv = carry
        first = begin + i * per_step
        entry = first + row // (qb * gp)
        bits = jnp.where(entry < end, bits_ref[entry], 0)
        query_pos = tile_ref[entry] * qb + query_in_tile
        mask = visible(kpos, start_ref[entry][:, None], bits[:, None], query_in_tile[:, None],
                       query_pos[:, None], block)
        tokens = tile_ref[first + tok // qb] * qb + tok % qb
        q = q_ref[tokens].reshape(rows, q_ref.shape[-1])
        do = do_ref[tokens].reshape(rows, do_ref.shape[-1])
        row_id = query_pos * gp + row % gp
        p = jnp.where(mask, jnp.exp(scores(q, k, tiling.scale) - lse_ref[row_id][:, None]), 0.0)
        ds = p * (scores(do, v, 1.0) - delta_ref[row_id][:, None])
        t_dot = lambda a, b: jax.lax.dot_general(a, b, (((0,), (0,)), ((), ())),
                                                 preferred_element_type=jnp.float32)
        return dk + t_dot(ds.astype(q.dtype), q), dv + t_dot(p.astype(do.dtype), do)

    init = (jnp.zeros(k.shape, jnp.float32), jnp.zeros(v.shape, jnp.float32))
    dk, dv = jax.lax.fori_loop(0, pl.cdiv(end - begin, per_step), step, init)
    dk_ref[...] = (dk * tiling.scale).astype(dk_ref.dtype)
    dv_ref[...] = dv.astype(dv_ref.dtype)


def _bwd_params(tiling: Tiling):
    return pltriton.CompilerParams(num_warps=tiling.bwd_num_warps,
                                   num_stages=tiling.bwd_num_stages)


def selected_dq(tiling: Tiling, q5, k, v, do5, lse, delta, starts, bits, count):
    """dQ [B, Tq, H, gp, Dk] on the forward grid."""
    dk, dv, t_kv = q5.shape[-1], v.shape[-1], k.shape[1]
    specs = query_tile_specs(tiling, q5.shape)
    union = specs["union"](starts.shape[-1])
    return pl.pallas_call(
        lambda *refs: _dq_kernel(*refs, tiling=tiling),
        grid=specs["grid"],
        in_specs=[union, union, specs["count"], specs["q"](dk), specs["kv"](t_kv, dk),
                  specs["kv"](t_kv, dv), specs["q"](dv), specs["rows"], specs["rows"]],
        out_specs=specs["q"](dk),
        out_shape=jax.ShapeDtypeStruct(q5.shape, q5.dtype),
        compiler_params=_bwd_params(tiling),
        interpret=tiling.interpret,
        name="nsa_selected_dq",
    )(starts, bits, count, q5, k, v, do5, lse, delta)


def selected_dkv(tiling: Tiling, q5, k, v, do5, lse, delta, entries):
    """dK, dV [B, num_key_tiles * l', H, D] from the key-tile entry lists."""
    b, tq, h, gp, dk = q5.shape
    dv, block = v.shape[-1], tiling.block
    t_out = tiling.num_key_tiles * block
    per_bh = lambda c, bh: (bh // h, bh % h, 0)
    whole_q = lambda dim: pl.BlockSpec((None, tq, None, gp, dim),
                                       lambda c, bh: (bh // h, 0, bh % h, 0, 0))
    key_tile = lambda dim: pl.BlockSpec((None, block, None, dim),
                                        lambda c, bh: (bh // h, c, bh % h, 0))
    entry_spec = pl.BlockSpec((None, None, entries[0].shape[-1]), per_bh)
    rows_spec = pl.BlockSpec((None, None, tq * gp), per_bh)
    return pl.pallas_call(
        lambda *refs: _dkv_kernel(*refs, tiling=tiling),
        grid=(tiling.num_key_tiles, b * h),
        in_specs=[entry_spec] * 3 + [pl.BlockSpec((None, None, tiling.num_key_tiles + 1), per_bh),
                                     whole_q(dk), whole_q(dv), rows_spec, rows_spec,
                                     key_tile(dk), key_tile(dv)],
        out_specs=[key_tile(dk), key_tile(dv)],
        out_shape=[jax.ShapeDtypeStruct((b, t_out, h, dk), k.dtype),
                   jax.ShapeDtypeStruct((b, t_out, h, dv), v.dtype)],
        compiler_params=_bwd_params(tiling),
        interpret=tiling.interpret,
        name="nsa_selected_dkv",
    )(*entries, q5, do5, lse, delta, k, v)
