"""Forward kernel of compressed-token attention (Pallas, Triton lowering), flash style.

Grid (query tile, batch * KV head). A program holds `qb * gp` rows (qb consecutive query positions
times the gp padded heads of one KV group, row r is query r // gp) and walks the compressed-key
tiles from the first slot of its first query's document to the last slot any of its queries can
see (ranges precomputed in XLA by compressed_index). Slot s is visible to query t iff
doc_start[t] <= start[s] <= t - l + 1: the slot lies in t's document and ends at or before t.
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
class CompressedTiling:
    """Static layout shared by the three kernels (hashable: a custom_vjp nondiff argument)."""
    qb: int  # query positions per forward/dQ program
    gp: int  # heads per KV group, padded to a power of 2
    key_block: int  # compressed slots per forward/dQ loop step
    bwd_qb: int  # query positions per dK/dV loop step
    bwd_key_block: int  # compressed slots per dK/dV program
    compress_block: int  # l
    scale: float
    num_kv_heads: int
    num_warps: int
    num_stages: int
    bwd_num_warps: int
    bwd_num_stages: int
    interpret: bool

    @property
    def rows(self) -> int:
        return self.qb * self.gp


def row_bounds(doc, first_query, qb: int, gp: int, compress_block: int):
    """[rows, 1] smallest and largest visible slot start of each row, from the doc_start [qb] of
    qb consecutive queries starting at `first_query`."""
    rows = qb * gp
    lowest = jnp.broadcast_to(doc[:, None], (qb, gp)).reshape(rows, 1)
    pos = first_query + jax.lax.broadcasted_iota(jnp.int32, (rows, 1), 0) // gp
    return lowest, pos - compress_block + 1


def slot_visible(start, lowest, highest):
    """[rows, slots]: padding slots (start -1) fail `start >= lowest` since lowest >= 0."""
    start = start[None, :]
    return (start >= lowest) & (start <= highest)


def scores(q, k, scale: float):
    s = jax.lax.dot_general(q, k, (((1,), (1,)), ((), ())), preferred_element_type=jnp.float32)
    return s * scale


def _fwd_kernel(lo_ref, hi_ref, doc_ref, start_ref, q_ref, k_ref, v_ref, o_ref, lse_ref, *,
                tiling: CompressedTiling):
    rows, kb = tiling.rows, tiling.key_block
    q = q_ref[...].reshape(rows, q_ref.shape[-1])
    lowest, highest = row_bounds(doc_ref[...], pl.program_id(0) * tiling.qb, tiling.qb,
                                 tiling.gp, tiling.compress_block)

    def step(j, carry):
        acc, m, l = carry
        first = pl.multiple_of(j * kb, kb)
        k = k_ref[pl.ds(first, kb), :]
        v = v_ref[pl.ds(first, kb), :]
        mask = slot_visible(start_ref[pl.ds(first, kb)], lowest, highest)
        s = jnp.where(mask, scores(q, k, tiling.scale), NEG)
        m_new = jnp.maximum(m, s.max(axis=1, keepdims=True))
        p = jnp.where(mask, jnp.exp(s - m_new), 0.0)
        alpha = jnp.exp(m - m_new)
        pv = jnp.dot(p.astype(v.dtype), v, preferred_element_type=jnp.float32)
        return acc * alpha + pv, m_new, l * alpha + p.sum(axis=1, keepdims=True)

    init = (jnp.zeros((rows, v_ref.shape[-1]), jnp.float32),
            jnp.full((rows, 1), NEG, jnp.float32), jnp.zeros((rows, 1), jnp.float32))
    acc, m, l = jax.lax.fori_loop(lo_ref[...], hi_ref[...], step, init)
    seen = l > 0
    safe = jnp.where(seen, l, 1.0)
    o_ref[...] = (acc / safe).astype(o_ref.dtype).reshape(o_ref.shape)
    lse_ref[...] = jnp.where(seen, m + jnp.log(safe), -jnp.inf).reshape(rows)


def query_tile_specs(tiling: CompressedTiling, q_shape, num_slots: int):
    """BlockSpecs on the (query tile, batch * KV head) grid; q-like arrays are
    [B, Tq, H, gp, D], k/v [B, Tcp, H, D], per-row arrays [B, H, Tq * gp]."""
    h, qb, gp = tiling.num_kv_heads, tiling.qb, tiling.gp
    return dict(
        tile=pl.BlockSpec((None, None), lambda c, bh: (bh // h, c)),
        doc=pl.BlockSpec((None, qb), lambda c, bh: (bh // h, c)),
        start=pl.BlockSpec((None, num_slots), lambda c, bh: (bh // h, 0)),
        q=lambda dim: pl.BlockSpec((None, qb, None, gp, dim), lambda c, bh: (bh // h, c, bh % h,
                                                                             0, 0)),
        kv=lambda dim: pl.BlockSpec((None, num_slots, None, dim), lambda c, bh: (bh // h, 0,
                                                                                 bh % h, 0)),
        rows=pl.BlockSpec((None, None, qb * gp), lambda c, bh: (bh // h, bh % h, c)),
        grid=(q_shape[1] // qb, q_shape[0] * h),
    )


def compressed_forward(tiling: CompressedTiling, q5, k, v, start, doc, lo, hi):
    """q5 [B, Tq, H, gp, Dk], k/v [B, Tcp, H, D], start [B, Tcp], doc [B, Tq], lo/hi [B, Tq/qb]
    key-tile ranges -> (o5 [B, Tq, H, gp, Dv], lse [B, H, Tq * gp] float32, -inf = nothing seen)."""
    b, tq, h, gp, dk = q5.shape
    dv = v.shape[-1]
    specs = query_tile_specs(tiling, q5.shape, k.shape[1])
    return pl.pallas_call(
        lambda *refs: _fwd_kernel(*refs, tiling=tiling),
        grid=specs["grid"],
        in_specs=[specs["tile"], specs["tile"], specs["doc"], specs["start"], specs["q"](dk),
                  specs["kv"](dk), specs["kv"](dv)],
        out_specs=[specs["q"](dv), specs["rows"]],
        out_shape=[jax.ShapeDtypeStruct((b, tq, h, gp, dv), v.dtype),
                   jax.ShapeDtypeStruct((b, h, tq * gp), jnp.float32)],
        compiler_params=pltriton.CompilerParams(num_warps=tiling.num_warps,
                                                num_stages=tiling.num_stages),
        interpret=tiling.interpret,
        name="nsa_compressed_fwd",
    )(lo, hi, doc, start, q5, k, v)
