"""NSA decoding on Hopper: the compressed pass of pallas_kernels.gpu.triton.decode_attention as a
Mosaic GPU kernel (TMA tile loads, wgmma); the top-n, sparse and combine launches stay the Triton
ones, which read its outputs unchanged. `nsa_decode_attention` has the ops twin's signature.

Grid (S, Hkv, B), one warpgroup per program: split s of (sequence b, KV head h) walks its tiles
of kb compressed slots with a two-slot TMA ring. wgmma needs 64 rows, so the Gp query rows of
the group sit in a 64-row Q tile whose other rows are zeros (the waste is compute, not bytes:
the pass reads K/V once). Per tile, with width = X + kb columns (X = l/d - 1 rounded up to 16:
the slots before the tile whose stride-d chunks reach into its first block, as in
pallas_kernels.gpu.mosaic.block_scores):
- K rows [first - X, first + kb) land in one SMEM tile (two TMAs), V rows [first, first + kb)
  after X zero rows, so S = Q K^T [64, width] and P V need no column slicing (V's tile has the
  32-byte swizzle: P V's K dimension, width, is a multiple of 16 only);
- the softmax partials take the tile's own slots (columns >= X) that are visible;
- the block partials take every visible column: mt = the row maximum, bs = exp(S - mt) @ W with
  W the [width, nb] chunk-overlap matrix, exact as three bfloat16 pieces (split_bf16x3).
Outputs are those of the Triton pass: m, l [B, Hkv, S, Gp], acc [B, Hkv, S, Gp, Dv], mt
[B, Hkv, T_pad, Gp], bs [B, Hkv, T_pad, Gp, nb], float32, tiles past `reach` unwritten.

SMEM (Dk = Dv = 128, kb = 128, X = 16): Q 16 KiB, K and V rings 2 x 2 x 36 KiB, W 9 KiB, block
and softmax staging 41 KiB: 210 KiB of 227.
"""
from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import mosaic_gpu as plgpu

from nsa_jax.config import NSAConfig
from pallas_kernels import MASKED
from pallas_kernels.gpu.mosaic import block_scores, common
from pallas_kernels.gpu.triton import decode_attention as triton

ROWS = 64  # wgmma's M
STAGES = 2
SMEM_BYTES = 227 * 1024
WGMMA = plgpu.Layout.WGMMA
ROW = plgpu.Layout.WGMMA.reduce(1)
DTYPES = (jnp.dtype(jnp.bfloat16), jnp.dtype(jnp.float16))


def smem_bytes(geo: triton.Geometry, dk: int, dv: int, itemsize: int) -> int:
    width = geo.extra + geo.tile
    return ((ROWS * dk + STAGES * width * (dk + dv)) * itemsize + width * geo.blocks * 2
            + 4 * (ROWS * (geo.blocks + dv) + 3 * ROWS))


def supports(q, k, v, k_cmp, v_cmp, gates, position, cfg: NSAConfig, *, k_win=None, v_win=None,
             scale=None, tiling: triton.Tiling | None = None) -> bool:
    """The Triton kernels' shapes, 16-bit caches, head dims that are multiples of 64 (128-byte
    swizzled rows), G <= 64 and the SMEM budget."""
    tiling = _unfused(tiling)
    if not triton.supports(q, k, v, k_cmp, v_cmp, gates, position, cfg, k_win=k_win,
                           v_win=v_win, tiling=tiling):
        return False
    geo = triton.Geometry.of(q, k_cmp, v, cfg, tiling)
    dk, dv = q.shape[-1], v.shape[-1]
    return (jnp.dtype(q.dtype) in DTYPES and dk % 64 == 0 and dv % 64 == 0 and geo.gp <= ROWS
            and smem_bytes(geo, dk, dv, jnp.dtype(q.dtype).itemsize) <= SMEM_BYTES)


def _unfused(tiling):
    """This pass leaves the top-n to its own launch."""
    return dataclasses.replace(tiling or triton.Tiling(), fuse_select=False)


def _masked(x, keep, fill):
    return jnp.where(keep, x, fill)


def _tile_math(s, col, first, visible, extra, carry, v_tile, w_smem, staging, interpret):
    """One tile: the softmax carry (acc, m, l) updated with its own visible slots; (mt, bs)."""
    acc, m, l = carry
    slot = first - extra + col
    seen = (slot >= 0) & (slot < visible)
    own = seen & (col >= extra)
    s_own = _masked(s, own, MASKED)
    m_new = jnp.maximum(m, s_own.max(axis=1))
    p = _masked(jnp.exp(s_own - lax.broadcast_in_dim(m_new, s.shape, [0])), own, 0.0)
    alpha = jnp.exp(m - m_new)
    acc = acc * lax.broadcast_in_dim(alpha, acc.shape, [0])
    acc = common.mma(acc, p.astype(v_tile.dtype), v_tile, interpret=interpret,
                     staging=staging[0])
    l = l * alpha + p.sum(axis=1)
    mt = _masked(s, seen, MASKED).max(axis=1)
    e = _masked(jnp.exp(s - lax.broadcast_in_dim(mt, s.shape, [0])), seen, 0.0)
    bs = plgpu.layout_cast(jnp.zeros((ROWS, w_smem.shape[1]), jnp.float32), WGMMA)
    for piece in block_scores.split_bf16x3(e):
        bs = common.mma(bs, piece, w_smem, interpret=interpret, staging=staging[1])
    return (acc, m_new, l), mt, bs


def _compressed_call(q, k_cmp, v_cmp, position, w, zeros, cfg: NSAConfig,
                     geo: triton.Geometry, scale: float, interpret: bool):
    b, hkv, gp, dk = q.shape
    c, dv = k_cmp.shape[1], v_cmp.shape[-1]
    kb, x, tps = geo.tile, geo.extra, geo.tiles_per_split
    width, nb, dtype = x + kb, geo.blocks, q.dtype

    def body(pos_ref, q_ref, k_ref, v_ref, w_ref, zeros_ref, m_ref, l_ref, acc_ref, mt_ref,
             bs_ref, smem, bars):
        q_smem, k_ring, v_ring, w_smem, bs_smem, acc_smem, stats_smem, staging = smem
        q_bar, w_bar, k_bar, p_bar, v_bar = bars
        split, hi, bi = lax.axis_index("splits"), lax.axis_index("heads"), lax.axis_index("batch")
        t = pos_ref[bi]
        visible = cfg.num_visible_compressed(t)
        first_tile = split * tps
        live = jnp.clip(triton.reach(visible, geo) - first_tile, 0, tps)

        def load(j, slot):
            first = pl.multiple_of((first_tile + j) * kb, kb)
            plgpu.copy_gmem_to_smem(k_ref.at[bi, pl.ds(first, kb), hi],
                                    k_ring.at[slot, pl.ds(x, kb)], k_bar.at[slot])
            plgpu.copy_gmem_to_smem(v_ref.at[bi, pl.ds(first, kb), hi],
                                    v_ring.at[slot, pl.ds(x, kb)], v_bar.at[slot])
            if x:
                prev = pl.multiple_of(jnp.maximum(first - x, 0), 16)  # tile 0: masked below
                plgpu.copy_gmem_to_smem(k_ref.at[bi, pl.ds(prev, x), hi],
                                        k_ring.at[slot, pl.ds(0, x)], p_bar.at[slot])

        q_smem[...] = plgpu.layout_cast(jnp.zeros((ROWS, dk), dtype), WGMMA)
        plgpu.commit_smem()
        plgpu.copy_gmem_to_smem(q_ref.at[bi, hi], q_smem.at[pl.ds(0, gp)], q_bar)
        plgpu.copy_gmem_to_smem(w_ref, w_smem, w_bar)
        for slot in range(STAGES):
            if x:  # V rows of the X columns before a tile: zeros (their p is 0; no NaN)
                plgpu.copy_gmem_to_smem(zeros_ref, v_ring.at[slot, pl.ds(0, x)], v_bar.at[slot])
                plgpu.barrier_wait(v_bar.at[slot])
            pl.when(slot < live)(functools.partial(load, slot, slot))
        plgpu.barrier_wait(q_bar)
        plgpu.barrier_wait(w_bar)
        col = plgpu.broadcasted_iota(jnp.int32, (ROWS, width), 1, layout=WGMMA)

        def tile(j, carry):
            slot = lax.rem(j, STAGES)
            first = (first_tile + j) * kb
            plgpu.barrier_wait(k_bar.at[slot])
            if x:
                plgpu.barrier_wait(p_bar.at[slot])
            s = common.matmul(q_smem, k_ring.at[slot].transpose((1, 0)), (ROWS, width)) * scale
            plgpu.barrier_wait(v_bar.at[slot])
            carry, mt, bs = _tile_math(s, col, first, visible, x, carry, v_ring.at[slot], w_smem,
                                       staging, interpret)
            pl.when(j + STAGES < live)(functools.partial(load, j + STAGES, slot))
            plgpu.wait_smem_to_gmem(0, wait_read_only=True)  # the last tile's stores left SMEM
            bs_smem[...] = bs
            stats_smem.at[0][...] = mt
            plgpu.commit_smem()
            i = first_tile + j
            plgpu.copy_smem_to_gmem(bs_smem.at[pl.ds(0, gp)], bs_ref.at[bi, hi, i])
            plgpu.copy_smem_to_gmem(stats_smem.at[0, pl.ds(0, gp)], mt_ref.at[bi, hi, i])
            return carry

        empty = (plgpu.layout_cast(jnp.zeros((ROWS, dv), jnp.float32), WGMMA),
                 plgpu.layout_cast(jnp.full((ROWS,), MASKED, jnp.float32), ROW),
                 plgpu.layout_cast(jnp.zeros((ROWS,), jnp.float32), ROW))
        acc, m, l = lax.fori_loop(0, live, tile, empty)
        plgpu.wait_smem_to_gmem(0, wait_read_only=True)
        acc_smem[...] = acc
        stats_smem.at[1][...] = m
        stats_smem.at[2][...] = l
        plgpu.commit_smem()
        plgpu.copy_smem_to_gmem(acc_smem.at[pl.ds(0, gp)], acc_ref.at[bi, hi, split])
        plgpu.copy_smem_to_gmem(stats_smem.at[1, pl.ds(0, gp)], m_ref.at[bi, hi, split])
        plgpu.copy_smem_to_gmem(stats_smem.at[2, pl.ds(0, gp)], l_ref.at[bi, hi, split])
        plgpu.wait_smem_to_gmem(0)

    def entry(*refs):
        smem = (common.tiled_smem((ROWS, dk), dtype),
                common.tiled_smem((STAGES, width, dk), dtype),
                common.narrow_smem((STAGES, width, dv), dtype),  # P V: K = width, 16s only
                common.narrow_smem((width, nb), jnp.bfloat16),
                plgpu.SMEM((ROWS, nb), jnp.float32),
                plgpu.SMEM((ROWS, dv), jnp.float32),
                plgpu.SMEM((3, ROWS), jnp.float32),
                # interpret mode stages register wgmma operands (p, and W's bfloat16 pieces)
                (common.narrow_smem((ROWS, width), dtype),
                 common.narrow_smem((ROWS, width), jnp.bfloat16)) if interpret else (None, None))
        ring = lambda: plgpu.Barrier(num_barriers=STAGES)
        bars = (plgpu.Barrier(), plgpu.Barrier(), ring(), ring(), ring())
        pl.run_scoped(functools.partial(body, *refs), smem, bars)

    f32 = lambda *shape: jax.ShapeDtypeStruct(shape, jnp.float32)
    s, tp = geo.splits, geo.padded_tiles
    out_type = (f32(b, hkv, s, gp), f32(b, hkv, s, gp), f32(b, hkv, s, gp, dv),
                f32(b, hkv, tp, gp), f32(b, hkv, tp, gp, nb))
    return plgpu.kernel(
        entry, out_type=out_type, grid=(s, hkv, b), grid_names=("splits", "heads", "batch"),
        compiler_params=plgpu.CompilerParams(approx_math=True),
        interpret=common.interpret_params() if interpret else None,
    )(position, q, k_cmp, v_cmp, w, zeros)


def compressed_partials(q, k_cmp, v_cmp, position, cfg: NSAConfig, geo: triton.Geometry, *,
                        scale: float, interpret: bool = False, **_):
    """The Triton `compressed_partials` contract (q [B, Hkv, Gp, Dk] 16-bit, Dk and Dv multiples
    of 64) on Mosaic GPU; launch options of the Triton kernel are ignored."""
    w = block_scores.Geometry.of(cfg, geo.tile).overlap_matrix()
    zeros = jnp.zeros((max(geo.extra, 16), v_cmp.shape[-1]), q.dtype)
    return _compressed_call(q, k_cmp, v_cmp, position, w, zeros, cfg, geo, scale, interpret)


def nsa_decode_attention(q, k, v, k_cmp, v_cmp, gates, position, cfg: NSAConfig, *, k_win=None,
                         v_win=None, scale=None, interpret=False,
                         tiling: triton.Tiling | None = None):
    """ops.nsa_decode_attention's semantics and arguments (pallas_kernels.gpu.triton.
    decode_attention.nsa_decode_attention) with the compressed pass on Mosaic GPU. Shapes must
    pass `supports` (ValueError otherwise)."""
    if not supports(q, k, v, k_cmp, v_cmp, gates, position, cfg, k_win=k_win, v_win=v_win,
                    tiling=tiling):
        raise ValueError(f"the Mosaic decode pass needs the Triton kernels' shapes, 16-bit "
                         f"caches, head dims that are multiples of 64 and G <= 64; got q "
                         f"{q.shape} {q.dtype}, k_cmp {k_cmp.shape}, v {v.shape}")
    return triton.nsa_decode_attention(q, k, v, k_cmp, v_cmp, gates, position, cfg, k_win=k_win,
                                       v_win=v_win, scale=scale, interpret=interpret,
                                       tiling=_unfused(tiling), compressed=compressed_partials)
