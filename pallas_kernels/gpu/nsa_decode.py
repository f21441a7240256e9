"""NSA decoding kernels (Pallas, Triton lowering): one new query per sequence, all G query heads
of a KV head in one program, the context split over programs for occupancy.

Two launches around the top-n, because it needs the compressed softmax normalised over the
whole context:

1. `compressed_partials`, grid (B, Hkv, C / block_c): one tile of compressed tokens per program;
   writes its masked logits (block scoring needs them) and softmax partials (max, sum,
   unnormalised output).
2. `sparse_partials`, grid (B, Hkv, n + W): program j < n attends to selected block indices[j]
   of the full cache, program n + i to the i-th of the W aligned select_block-sized tiles that
   cover the window [t - w + 1, t] in the window ring. Each writes softmax partials.

`merge_partials` folds partials into (output, log-sum-exp); the top-n between the launches is
nsa_decode_select.py (or XLA).
Layouts: q [B, Hkv, Gp, Dk] with Gp a power of two >= 16 (pad with zero rows), caches
[B, slots, Hkv, D] as in nsa_jax.decode.cache, position [B] int32 (the query's position t).
Triton needs power-of-two tiles: Dk, Dv, block_c and select_block.
"""
from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as pltriton

from nsa_jax.config import NSAConfig

# finite "minus infinity": masked logits never make inf - inf or exp(nan) inside a kernel
MASKED = -0.7 * float(jnp.finfo(jnp.float32).max)


def _tile_partials(q, k, v, mask, scale):
    """Softmax partials of q [Gp, Dk] over one key tile k [K, Dk], v [K, Dv] where mask [K]."""
    precision = jax.lax.Precision.HIGHEST if q.dtype == jnp.float32 else None
    s = jax.lax.dot_general(q, k, (((1,), (1,)), ((), ())), precision=precision,
                            preferred_element_type=jnp.float32) * scale
    s = jnp.where(mask[None, :], s, MASKED)
    m = jnp.max(s, axis=1)
    p = jnp.where(mask[None, :], jnp.exp(s - m[:, None]), 0.0)
    acc = jax.lax.dot_general(p.astype(v.dtype), v, (((1,), (0,)), ((), ())),
                              precision=precision, preferred_element_type=jnp.float32)
    return s, m, jnp.sum(p, axis=1), acc


def _store(refs, m, l, acc):
    m_ref, l_ref, acc_ref = refs
    m_ref[...], l_ref[...], acc_ref[...] = m, l, acc


def _store_empty(refs):
    m_ref, l_ref, acc_ref = refs
    _store(refs, jnp.full(m_ref.shape, MASKED, jnp.float32), jnp.zeros(l_ref.shape, jnp.float32),
           jnp.zeros(acc_ref.shape, jnp.float32))


def visible_compressed(t, cfg: NSAConfig):
    """Compressed tokens a query at position t sees: those with i*d + l - 1 <= t."""
    l, d = cfg.compress_block, cfg.compress_stride
    return jnp.where(t >= l - 1, (jnp.maximum(t - l + 1, 0)) // d + 1, 0)


def _compressed_kernel(pos_ref, q_ref, k_ref, v_ref, logits_ref, *partial_refs, scale, block_c,
                       cfg: NSAConfig):
    t = pos_ref[...]
    visible = visible_compressed(t, cfg)
    first = pl.program_id(2) * block_c
    live = first < visible

    @pl.when(live)
    def _():
        mask = first + jnp.arange(block_c) < visible
        s, *partials = _tile_partials(q_ref[...], k_ref[...], v_ref[...], mask, scale)
        logits_ref[...] = jnp.where(mask[None, :], s, -jnp.inf)
        _store(partial_refs, *partials)

    @pl.when(jnp.logical_not(live))
    def _():
        logits_ref[...] = jnp.full(logits_ref.shape, -jnp.inf, jnp.float32)
        _store_empty(partial_refs)


def compressed_partials(q, k_cmp, v_cmp, position, cfg: NSAConfig, *, scale: float,
                        block_c: int = 128, num_warps: int = 4, num_stages: int = 2,
                        interpret: bool = False):
    """-> logits [B, Hkv, Gp, C] float32 (-inf where invisible) and partials m, l [B, Hkv, NC,
    Gp], acc [B, Hkv, NC, Gp, Dv] over NC = C / block_c tiles of compressed tokens."""
    b, hkv, gp, dk = q.shape
    c, dv = k_cmp.shape[1], v_cmp.shape[-1]
    block_c = min(block_c, c)
    if c % block_c:
        raise ValueError(f"compressed slots ({c}) must be a multiple of block_c={block_c}")
    tiles = c // block_c
    kernel = functools.partial(_compressed_kernel, scale=scale, block_c=block_c, cfg=cfg)
    return pl.pallas_call(
        kernel, grid=(b, hkv, tiles),
        in_specs=[pl.BlockSpec((None,), lambda i, h, j: (i,)),
                  pl.BlockSpec((None, None, gp, dk), lambda i, h, j: (i, h, 0, 0)),
                  pl.BlockSpec((None, block_c, None, dk), lambda i, h, j: (i, j, h, 0)),
                  pl.BlockSpec((None, block_c, None, dv), lambda i, h, j: (i, j, h, 0))],
        out_specs=[pl.BlockSpec((None, None, gp, block_c), lambda i, h, j: (i, h, 0, j)),
                   pl.BlockSpec((None, None, None, gp), lambda i, h, j: (i, h, j, 0)),
                   pl.BlockSpec((None, None, None, gp), lambda i, h, j: (i, h, j, 0)),
                   pl.BlockSpec((None, None, None, gp, dv), lambda i, h, j: (i, h, j, 0, 0))],
        out_shape=[jax.ShapeDtypeStruct((b, hkv, gp, c), jnp.float32),
                   jax.ShapeDtypeStruct((b, hkv, tiles, gp), jnp.float32),
                   jax.ShapeDtypeStruct((b, hkv, tiles, gp), jnp.float32),
                   jax.ShapeDtypeStruct((b, hkv, tiles, gp, dv), jnp.float32)],
        compiler_params=pltriton.CompilerParams(num_warps=num_warps, num_stages=num_stages),
        interpret=interpret, name="nsa_decode_compressed",
    )(position, q, k_cmp, v_cmp)


def window_tiles(cfg: NSAConfig) -> int:
    """Aligned select_block tiles that can overlap a window of w keys."""
    return -(-(cfg.window - 1) // cfg.select_block) + 1


def _sparse_kernel(pos_ref, idx_ref, q_ref, k_ref, v_ref, kw_ref, vw_ref, *partial_refs, scale,
                   cfg: NSAConfig):
    t = pos_ref[...]
    j = pl.program_id(2)
    n, block = cfg.num_selected, cfg.select_block
    offsets = jnp.arange(block)
    q = q_ref[...]
    is_selected = j < n
    chosen = idx_ref[jnp.minimum(j, n - 1)]
    tile = t // block - (window_tiles(cfg) - 1) + (j - n)  # window tile, counted in positions
    live_selected = is_selected & (chosen >= 0)
    live_window = jnp.logical_not(is_selected) & (tile >= 0)

    def attend(k_buf, v_buf, first_key, slot, lowest):
        slot = pl.multiple_of(slot, block)
        key = first_key + offsets
        mask = (key <= t) & (key >= lowest)
        _, *partials = _tile_partials(q, k_buf[pl.ds(slot, block), :],
                                      v_buf[pl.ds(slot, block), :], mask, scale)
        _store(partial_refs, *partials)

    @pl.when(live_selected)
    def _():
        start = jnp.maximum(chosen, 0) * block
        attend(k_ref, v_ref, start, start, 0)

    @pl.when(live_window)
    def _():
        start = jnp.maximum(tile, 0) * block
        attend(kw_ref, vw_ref, start, start % kw_ref.shape[0], t - cfg.window + 1)

    @pl.when(jnp.logical_not(live_selected | live_window))
    def _():
        _store_empty(partial_refs)


def sparse_partials(q, k, v, k_win, v_win, indices, position, cfg: NSAConfig, *, scale: float,
                    num_warps: int = 4, num_stages: int = 2, interpret: bool = False):
    """-> partials m, l [B, Hkv, n + W, Gp], acc [B, Hkv, n + W, Gp, Dv]: the first n for the
    selected blocks `indices` [B, Hkv, n] (-1 = unused), the last W for the window tiles."""
    b, hkv, gp, dk = q.shape
    s, r, dv = k.shape[1], k_win.shape[1], v.shape[-1]
    n, block = cfg.num_selected, cfg.select_block
    if s % block or r % block:
        raise ValueError(f"cache slots ({s}) and window ring slots ({r}) must be multiples of "
                         f"select_block={block}")
    programs = n + window_tiles(cfg)
    kernel = functools.partial(_sparse_kernel, scale=scale, cfg=cfg)
    whole = lambda slots, dim: pl.BlockSpec((None, slots, None, dim), lambda i, h, j: (i, 0, h, 0))
    return pl.pallas_call(
        kernel, grid=(b, hkv, programs),
        in_specs=[pl.BlockSpec((None,), lambda i, h, j: (i,)),
                  pl.BlockSpec((None, None, n), lambda i, h, j: (i, h, 0)),
                  pl.BlockSpec((None, None, gp, dk), lambda i, h, j: (i, h, 0, 0)),
                  whole(s, dk), whole(s, dv), whole(r, dk), whole(r, dv)],
        out_specs=[pl.BlockSpec((None, None, None, gp), lambda i, h, j: (i, h, j, 0)),
                   pl.BlockSpec((None, None, None, gp), lambda i, h, j: (i, h, j, 0)),
                   pl.BlockSpec((None, None, None, gp, dv), lambda i, h, j: (i, h, j, 0, 0))],
        out_shape=[jax.ShapeDtypeStruct((b, hkv, programs, gp), jnp.float32),
                   jax.ShapeDtypeStruct((b, hkv, programs, gp), jnp.float32),
                   jax.ShapeDtypeStruct((b, hkv, programs, gp, dv), jnp.float32)],
        compiler_params=pltriton.CompilerParams(num_warps=num_warps, num_stages=num_stages),
        interpret=interpret, name="nsa_decode_sparse",
    )(position, indices, q, k, v, k_win, v_win)


def merge_partials(m, l, acc):
    """Partials over axis 2 (m, l [B, H, P, G], acc [B, H, P, G, D]) -> (o [B, H, G, D] float32,
    lse [B, H, G] float32); rows that saw no key give o = 0 and lse = -inf."""
    top = jnp.max(m, axis=2, keepdims=True)
    weight = jnp.exp(m - top)  # 0 for empty partials unless every partial is empty (then l = 0)
    total = jnp.sum(l * weight, axis=2)
    out = jnp.sum(acc * weight[..., None], axis=2)
    nonempty = total > 0
    out = out / jnp.where(nonempty, total, 1.0)[..., None]
    return out, jnp.where(nonempty, top[:, :, 0] + jnp.log(jnp.where(nonempty, total, 1.0)),
                          -jnp.inf)
