"""NSA compressed-token attention on GPU: input checks, padding to Triton-friendly tiles, and the
custom_vjp joining the forward, dQ and dK/dV kernels.

Heads per KV group are padded to gp = next power of 2 (zero queries, dropped on the way out), head
dims to powers of 2, query positions to whole tiles (documents starting at T: they see nothing)
and slots to whole key tiles (start -1: never visible). Padding is plain XLA, so its gradient is
automatic; the custom_vjp sees only the padded arrays.
"""
from __future__ import annotations

import functools

import jax
import jax.numpy as jnp

from nsa_jax.config import NSAConfig
from pallas_kernels.gpu.compressed_bwd import compressed_dkv, compressed_dq
from pallas_kernels.gpu.compressed_fwd import CompressedTiling, compressed_forward
from pallas_kernels.gpu.compressed_index import key_tiles_per_query_tile, query_tiles_per_key_tile
from pallas_kernels.gpu.padding import check_layout, pad_to, pow2

_MIN_ROWS = 16  # smallest dot row count kept on GPU
DTYPES = (jnp.bfloat16, jnp.float16, jnp.float32)


@functools.partial(jax.custom_vjp, nondiff_argnums=(0,))
def _compressed(tiling, q5, k, v, start, doc):
    lo, hi = key_tiles_per_query_tile(start, doc, tiling.qb, tiling.key_block,
                                      tiling.compress_block)
    return compressed_forward(tiling, q5, k, v, start, doc, lo, hi)


def _compressed_fwd(tiling, q5, k, v, start, doc):
    o5, lse = _compressed(tiling, q5, k, v, start, doc)
    return (o5, lse), (q5, k, v, start, doc, o5, lse)


def _compressed_bwd(tiling, res, cotangents):
    q5, k, v, start, doc, o5, lse = res
    do5, dlse = cotangents
    b, tq, h, gp, _ = q5.shape
    delta = jnp.sum(o5.astype(jnp.float32) * do5.astype(jnp.float32), axis=-1)
    delta = delta.transpose(0, 2, 1, 3).reshape(b, h, tq * gp) - dlse
    lse = jnp.where(jnp.isfinite(lse), lse, 0.0)  # such rows see nothing: p is masked to 0
    lo, hi = key_tiles_per_query_tile(start, doc, tiling.qb, tiling.key_block,
                                      tiling.compress_block)
    dq = compressed_dq(tiling, q5, k, v, do5, lse, delta, start, doc, lo, hi)
    lo, hi = query_tiles_per_key_tile(start, doc, tiling.bwd_qb, tiling.bwd_key_block,
                                      tiling.compress_block)
    dk, dv = compressed_dkv(tiling, q5, k, v, do5, lse, delta, start, doc, lo, hi)
    return dq, dk, dv, None, None


_compressed.defvjp(_compressed_fwd, _compressed_bwd)


def _check_inputs(q, k_cmp, v_cmp, start, doc_start):
    if q.ndim != 4 or k_cmp.ndim != 4 or v_cmp.ndim != 4:
        raise ValueError(f"q, k_cmp, v_cmp must be [B, T, H, D]; got shapes {q.shape}, "
                         f"{k_cmp.shape}, {v_cmp.shape}")
    b, t, hq, dk = q.shape
    tc, hkv = k_cmp.shape[1:3]
    if k_cmp.shape != (b, tc, hkv, dk) or v_cmp.shape[:3] != (b, tc, hkv):
        raise ValueError(f"k_cmp must be [B, Tc, Hkv, Dk] and v_cmp [B, Tc, Hkv, Dv] matching q "
                         f"{q.shape}; got k_cmp {k_cmp.shape}, v_cmp {v_cmp.shape}")
    if hq % hkv:
        raise ValueError(f"query heads ({hq}) must be a multiple of KV heads ({hkv})")
    if not (q.dtype == k_cmp.dtype == v_cmp.dtype) or q.dtype not in DTYPES:
        raise ValueError(f"q, k_cmp, v_cmp must share one dtype of {[d.__name__ for d in DTYPES]};"
                         f" got {q.dtype}, {k_cmp.dtype}, {v_cmp.dtype}")
    check_layout(start, doc_start, b, t, tc)


def group_queries(q, num_kv_heads: int, length: int):
    """q [B, T, Hq, D] -> [B, length, Hkv, gp, pow2(D)], zero padded."""
    b, t, hq, d = q.shape
    g = hq // num_kv_heads
    return pad_to(q.reshape(b, t, num_kv_heads, g, d), (None, length, None, pow2(g), pow2(d)))


def padded_documents(doc_start, batch: int, length: int, padded_length: int):
    """doc_start [B, T] (None: one document) padded to [B, padded_length]; padded queries form a
    document starting at T, so they see nothing."""
    if doc_start is None:
        doc_start = jnp.zeros((batch, length), jnp.int32)
    return pad_to(doc_start, (None, padded_length), value=length)


def rows_to_heads(rows, batch: int, length: int, q_heads: int):
    """Per-row values [B, Hkv, Tq * gp] -> [B, T, Hq]."""
    _, hkv, n = rows.shape
    gp = pow2(q_heads // hkv)
    x = rows.reshape(batch, hkv, n // gp, gp).transpose(0, 2, 1, 3)
    return x[:, :length, :, :q_heads // hkv].reshape(batch, length, q_heads)


def tile_sizes(gp: int, rows: int, bwd_rows: int):
    """(qb, bwd_qb): query positions per forward/dQ program and per dK/dV step."""
    return max(1, max(rows, _MIN_ROWS) // gp), max(1, max(bwd_rows, _MIN_ROWS) // gp)


def compressed_attention(q, k_cmp, v_cmp, start, cfg: NSAConfig, *, doc_start=None, scale=None,
                         interpret=False, rows_per_program=128, key_block=64, bwd_rows=64,
                         bwd_key_block=64, num_warps=None, num_stages=2, bwd_num_warps=8,
                         bwd_num_stages=2):
    """Attention of every query over the compressed tokens it may see, with its float32 LSE.

    q [B, T, Hq, Dk], k_cmp [B, Tc, Hkv, Dk], v_cmp [B, Tc, Hkv, Dv]; start [B, Tc] int32 = first
    raw-token position of each compressed slot (-1 = padding slot; valid starts ascending, as
    nsa_jax.ops.layout.compressed_layout gives them); doc_start [B, T] int32 = first position of
    each query's document (None: one document per row). Slot s is visible to query t iff
    doc_start[t] <= start[s] and start[s] + l - 1 <= t. Returns (o [B, T, Hq, Dv] in q's dtype,
    lse [B, T, Hq] float32); a query that sees nothing gets o = 0, lse = -inf, zero gradients.

    rows_per_program / bwd_rows: query rows (positions x padded group heads) per forward/dQ
    program and per dK/dV loop step; key_block / bwd_key_block: slots per step / per dK/dV program.
    All four must be powers of 2. num_warps defaults to 8 for head dims >= 128, else 4.
    """
    _check_inputs(q, k_cmp, v_cmp, start, doc_start)
    for name, value in (("rows_per_program", rows_per_program), ("bwd_rows", bwd_rows),
                        ("key_block", key_block), ("bwd_key_block", bwd_key_block)):
        if value < 1 or value & (value - 1):
            raise ValueError(f"{name} must be a power of 2, got {value}")
    b, t, hq, dk = q.shape
    tc, hkv, dv = k_cmp.shape[1], k_cmp.shape[2], v_cmp.shape[3]
    gp = pow2(hq // hkv)
    qb, bwd_qb = tile_sizes(gp, rows_per_program, bwd_rows)
    dkp, dvp = pow2(dk), pow2(dv)
    tiling = CompressedTiling(
        qb=qb, gp=gp, key_block=key_block, bwd_qb=bwd_qb, bwd_key_block=bwd_key_block,
        compress_block=cfg.compress_block, scale=float(dk ** -0.5 if scale is None else scale),
        num_kv_heads=hkv, num_warps=num_warps or (8 if max(dkp, dvp) >= 128 else 4),
        num_stages=num_stages, bwd_num_warps=bwd_num_warps, bwd_num_stages=bwd_num_stages,
        interpret=interpret)
    step = max(qb, bwd_qb)
    tq = -(-t // step) * step
    slots = max(key_block, bwd_key_block)
    tcp = -(-max(tc, 1) // slots) * slots
    q5 = group_queries(q, hkv, tq)
    kp = pad_to(k_cmp, (None, tcp, None, dkp))
    vp = pad_to(v_cmp, (None, tcp, None, dvp))
    startp = pad_to(start, (None, tcp), value=-1)
    doc = padded_documents(doc_start, b, t, tq)
    o5, lse = _compressed(tiling, q5, kp, vp, startp, doc)
    o = o5[:, :t, :, :hq // hkv, :dv].reshape(b, t, hq, dv)
    return o, rows_to_heads(lse, b, t, hq)
