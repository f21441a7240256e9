"""NSA selected-block attention on GPU: input checks, padding to Triton-friendly tiles, and the
custom_vjp joining the forward, dQ and dK/dV kernels.

Triton tiles must be powers of 2 and dots want >= 16 rows, so the wrapper pads heads per KV group
to gp = next power of 2 (zero queries, dropped on the way out), head dims to powers of 2 (zeros add
nothing to dot products), and tiles qb >= 16 / gp query positions per program. Padding is plain XLA,
so its gradient is automatic; the custom_vjp sees only the padded arrays.
"""
from __future__ import annotations

import functools

import jax
import jax.numpy as jnp

from nsa_jax.config import NSAConfig
from pallas_kernels.gpu.selected_bwd import selected_dkv, selected_dq
from pallas_kernels.gpu.selected_fwd import Tiling, selected_forward
from pallas_kernels.gpu.selected_index import (absolute_block_starts, key_tile_entries,
                                               query_tile_union)

_MIN_ROWS = 16  # smallest dot row count kept on GPU


def _pow2(x: int) -> int:
    return 1 << max(0, (x - 1).bit_length())


def _pad_to(x, sizes):
    """Zero-pad x at the end of each axis up to `sizes` (None = keep)."""
    widths = [(0, 0 if s is None else s - n) for n, s in zip(x.shape, sizes)]
    return jnp.pad(x, widths) if any(w for _, w in widths) else x


@functools.partial(jax.custom_vjp, nondiff_argnums=(0,))
def _selected(tiling, q5, k, v, starts, bits, count):
    return selected_forward(tiling, q5, k, v, starts, bits, count)[0]


def _selected_fwd(tiling, q5, k, v, starts, bits, count):
    o5, lse = selected_forward(tiling, q5, k, v, starts, bits, count)
    return o5, (q5, k, v, starts, bits, count, o5, lse)


def _selected_bwd(tiling, res, do5):
    q5, k, v, starts, bits, count, o5, lse = res
    b, tq, h, gp, _ = q5.shape
    delta = jnp.sum(o5.astype(jnp.float32) * do5.astype(jnp.float32), axis=-1)
    delta = delta.transpose(0, 2, 1, 3).reshape(b, h, tq * gp)
    dq = selected_dq(tiling, q5, k, v, do5, lse, delta, starts, bits, count)
    entries = key_tile_entries(starts, bits, count, tiling.block, tiling.num_key_tiles,
                               tiling.entries_per_step, tiling.aligned)
    dk, dv = selected_dkv(tiling, q5, k, v, do5, lse, delta, entries)
    rows_kv = (None, k.shape[1], None, None)
    return dq, _pad_to(dk, rows_kv), _pad_to(dv, rows_kv), None, None, None


_selected.defvjp(_selected_fwd, _selected_bwd)


def _check_inputs(q, k, v, indices, doc_start):
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
    if not (q.dtype == k.dtype == v.dtype) or q.dtype not in (jnp.bfloat16, jnp.float32):
        raise ValueError(f"q, k, v must share one dtype, bfloat16 or float32; got {q.dtype}, "
                         f"{k.dtype}, {v.dtype}")
    if indices.ndim != 4 or indices.shape[:3] != (b, t, hkv) or indices.dtype != jnp.int32:
        raise ValueError(f"indices must be int32 [B, T, Hkv, n] = [{b}, {t}, {hkv}, n]; got "
                         f"{indices.dtype} {indices.shape}")
    if doc_start is not None and (doc_start.shape != (b, t) or doc_start.dtype != jnp.int32):
        raise ValueError(f"doc_start must be int32 [B, T] = [{b}, {t}]; got {doc_start.dtype} "
                         f"{doc_start.shape}")


def selected_attention(q, k, v, indices, cfg: NSAConfig, *, doc_start=None, scale=None,
                       interpret=False, queries_per_program=None, entries_per_step=None,
                       num_warps=None, num_stages=None, bwd_num_warps=8, bwd_num_stages=2):
    """Attention of each query over the l'-token blocks its KV group selected.

    q [B, T, Hq, Dk], k [B, T, Hkv, Dk], v [B, T, Hkv, Dv]; indices [B, T, Hkv, n] int32 block ids
    counted from the query's document start (-1 = none; a repeated id counts once); doc_start
    [B, T] int32 = position of the first token of each token's document (None: one document per
    row), e.g. nsa_jax.ops.layout.document_starts(segment_ids, B, T). Block j
    of query t covers keys doc_start[t] + j*l' ... + l' - 1, keys after t masked. A query with no
    visible key gets 0. Returns o [B, T, Hq, Dv] in q's dtype; softmax and sums in float32.

    queries_per_program: query positions per forward/dQ program (power of 2 <= 16; default
    16 / padded group size, at least 1). entries_per_step: query tiles per dK/dV loop step.
    num_warps/num_stages (forward and dQ): default 2/3 for one query per program, else 4/2.
    """
    _check_inputs(q, k, v, indices, doc_start)
    b, t, hq, dk = q.shape
    hkv, dv, block = k.shape[2], v.shape[3], cfg.select_block
    g, gp = hq // hkv, _pow2(hq // hkv)
    qb = queries_per_program or max(1, _MIN_ROWS // gp)
    if qb not in (1, 2, 4, 8, 16):
        raise ValueError(f"queries_per_program must be a power of 2 <= 16, got {qb}")
    # Measured on an H100: one query per program is fastest with 2 warps and 3 stages; a tile of
    # several queries (G < 16, or a shared selection) with 4 and 2 (2 warps spill at 128 rows).
    num_warps = num_warps or (2 if qb == 1 else 4)
    num_stages = num_stages or (3 if qb == 1 else 2)
    dkp, dvp = _pow2(dk), _pow2(dv)
    # dK/dV gathers q and dO rows per step; float32 needs extra staging for its TF32 dots. On an
    # H100, 128 f32 rows of D=128 asked for 355 KiB of the 227 KiB of shared memory, and 128 bf16
    # rows of D=128 ran 3% faster than 256.
    budget = 2**16 if q.dtype.itemsize == 2 else 2**15
    bwd_rows = max(_MIN_ROWS, _pow2(budget // ((dkp + dvp) * q.dtype.itemsize) + 1) // 2)
    per_step = entries_per_step or max(1, bwd_rows // (qb * gp))
    if per_step & (per_step - 1):
        raise ValueError(f"entries_per_step must be a power of 2, got {per_step}")
    aligned = doc_start is None
    tiling = Tiling(block=block, qb=qb, gp=gp,
                    scale=float(dk ** -0.5 if scale is None else scale), num_kv_heads=hkv,
                    num_key_tiles=-(-t // block), aligned=aligned, entries_per_step=per_step,
                    num_warps=num_warps, num_stages=num_stages, bwd_num_warps=bwd_num_warps,
                    bwd_num_stages=bwd_num_stages, interpret=interpret)
    tq = -(-t // qb) * qb
    # An unaligned block may run up to l' - 1 keys past the last aligned tile.
    t_kv = tiling.num_key_tiles * block + (0 if aligned else block)
    q5 = _pad_to(q.reshape(b, t, hkv, g, dk), (None, tq, None, gp, dkp))
    kp = _pad_to(k, (None, t_kv, None, dkp))
    vp = _pad_to(v, (None, t_kv, None, dvp))
    if doc_start is None:
        doc_start = jnp.zeros((b, t), jnp.int32)
    starts = absolute_block_starts(indices, doc_start, block)
    starts = jnp.pad(starts, ((0, 0), (0, tq - t), (0, 0), (0, 0)), constant_values=-1)
    o5 = _selected(tiling, q5, kp, vp, *query_tile_union(starts, qb))
    return o5[:, :t, :, :g, :dv].reshape(b, t, hq, dv)
