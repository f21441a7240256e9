"""Forward kernel of selected-block attention (Pallas, Triton lowering).

Grid (query tile, batch * KV head). A program holds the `qb * gp` rows (qb consecutive query
positions times the gp padded heads of one KV group) and walks the union of the blocks those queries
selected, with an online softmax. Rows are ordered (query, head): row r is query r // gp.
"""
from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as pltriton

# Finite, so that a row with nothing visible stays at exp(..) = 0 rather than NaN.
NEG = -1e30


@dataclasses.dataclass(frozen=True)
class Tiling:
    """Static layout shared by the three kernels (hashable: a custom_vjp nondiff argument)."""
    block: int  # l'
    qb: int  # query positions per forward/dQ program
    gp: int  # heads per KV group, padded to a power of 2
    scale: float
    num_kv_heads: int
    num_key_tiles: int  # ceil(T / l')
    aligned: bool  # every block starts at a multiple of l' (no packed documents)
    entries_per_step: int  # dK/dV: query tiles gathered per loop step
    num_warps: int
    num_stages: int
    bwd_num_warps: int
    bwd_num_stages: int
    interpret: bool

    @property
    def rows(self) -> int:
        return self.qb * self.gp


def visible(kpos, start, bits, query_in_tile, query_pos, block: int):
    """Which (row, key) pairs count: the row's query selected the block starting at `start`, the
    key lies in that block and is not in the query's future."""
    chosen = (jnp.right_shift(bits, query_in_tile) & 1) == 1
    return chosen & (kpos >= start) & (kpos < start + block) & (kpos <= query_pos)


def scores(q, k, scale: float):
    s = jax.lax.dot_general(q, k, (((1,), (1,)), ((), ())), preferred_element_type=jnp.float32)
    return s * scale


def row_coords(tiling: Tiling):
    """(query index inside the tile, absolute query position) of each row, as [rows, 1]."""
    r = jax.lax.broadcasted_iota(jnp.int32, (tiling.rows, 1), 0) // tiling.gp
    return r, pl.program_id(0) * tiling.qb + r


def _fwd_kernel(starts_ref, bits_ref, count_ref, q_ref, k_ref, v_ref, o_ref, lse_ref, *,
                tiling: Tiling):
    rows, block = tiling.rows, tiling.block
    q = q_ref[...].reshape(rows, q_ref.shape[-1])
    query_in_tile, query_pos = row_coords(tiling)
    kpos0 = jax.lax.broadcasted_iota(jnp.int32, (1, block), 1)

    def step(i, carry):
        acc, m, l = carry
        start = starts_ref[i]
        k = k_ref[pl.ds(start, block), :]
        v = v_ref[pl.ds(start, block), :]
        mask = visible(kpos0 + start, start, bits_ref[i], query_in_tile, query_pos, block)
        s = jnp.where(mask, scores(q, k, tiling.scale), NEG)
        m_new = jnp.maximum(m, s.max(axis=1, keepdims=True))
        p = jnp.where(mask, jnp.exp(s - m_new), 0.0)
        alpha = jnp.exp(m - m_new)
        pv = jnp.dot(p.astype(v.dtype), v, preferred_element_type=jnp.float32)
        return acc * alpha + pv, m_new, l * alpha + p.sum(axis=1, keepdims=True)

    init = (jnp.zeros((rows, v_ref.shape[-1]), jnp.float32),
            jnp.full((rows, 1), NEG, jnp.float32), jnp.zeros((rows, 1), jnp.float32))
    acc, m, l = jax.lax.fori_loop(0, count_ref[...], step, init)
    seen = l > 0
    o = acc / jnp.where(seen, l, 1.0)
    o_ref[...] = o.astype(o_ref.dtype).reshape(o_ref.shape)
    # A row that saw nothing keeps lse 0: its recomputed probabilities are masked to 0 anyway.
    lse_ref[...] = jnp.where(seen, m + jnp.log(jnp.where(seen, l, 1.0)), 0.0).reshape(rows)


def query_tile_specs(tiling: Tiling, q_shape):
    """BlockSpecs of the (starts, bits, count, q, k, v) inputs and the row-shaped outputs on the
    (query tile, batch * KV head) grid; q-like arrays are [B, Tq, H, gp, D]."""
    h, qb, gp = tiling.num_kv_heads, tiling.qb, tiling.gp
    tile_idx = lambda c, bh: (bh // h, bh % h, c, 0)
    q_idx = lambda c, bh: (bh // h, c, bh % h, 0, 0)
    whole_kv = lambda c, bh: (bh // h, 0, bh % h, 0)
    return dict(
        union=lambda length: pl.BlockSpec((None, None, None, length), tile_idx),
        count=pl.BlockSpec((None, None, None), lambda c, bh: (bh // h, bh % h, c)),
        q=lambda dim: pl.BlockSpec((None, qb, None, gp, dim), q_idx),
        kv=lambda t_kv, dim: pl.BlockSpec((None, t_kv, None, dim), whole_kv),
        rows=pl.BlockSpec((None, None, qb * gp), lambda c, bh: (bh // h, bh % h, c)),
        grid=(q_shape[1] // qb, q_shape[0] * h),
    )


def selected_forward(tiling: Tiling, q5, k, v, starts, bits, count):
    """q5 [B, Tq, H, gp, Dk], k/v [B, Tkv, H, D] -> (o5 [B, Tq, H, gp, Dv], lse [B, H, Tq * gp])."""
    b, tq, h, gp, dk = q5.shape
    dv, t_kv = v.shape[-1], k.shape[1]
    specs = query_tile_specs(tiling, q5.shape)
    return pl.pallas_call(
        lambda *refs: _fwd_kernel(*refs, tiling=tiling),
        grid=specs["grid"],
        in_specs=[specs["union"](starts.shape[-1]), specs["union"](starts.shape[-1]),
                  specs["count"], specs["q"](dk), specs["kv"](t_kv, dk), specs["kv"](t_kv, dv)],
        out_specs=[specs["q"](dv), specs["rows"]],
        out_shape=[jax.ShapeDtypeStruct((b, tq, h, gp, dv), v.dtype),
                   jax.ShapeDtypeStruct((b, h, tq * gp), jnp.float32)],
        compiler_params=pltriton.CompilerParams(num_warps=tiling.num_warps,
                                                num_stages=tiling.num_stages),
        interpret=tiling.interpret,
        name="nsa_selected_fwd",
    )(starts, bits, count, q5, k, v)
