"""NSA decoding on GPU (Pallas, Triton lowering): one new query per sequence over a KV cache, all
G query heads of a KV head in one program, the context split over programs for occupancy; the
"pallas" implementation of ops.nsa_decode_attention, with its signature.

Three launches, because the top-n needs the compressed softmax normalised over the whole context:

1. `compressed_partials`, grid (B, Hkv, C / block_c): one tile of compressed tokens per program;
   writes its masked logits (block scoring needs them) and softmax partials (max, sum,
   unnormalised output).
2. `select_top_n`, grid (B, Hkv): walks the compressed logits of its KV group in tiles of whole
   selection blocks, normalises them with the compressed LSE, maps them to blocks by overlap, sums
   the group's heads and keeps a running top-n: the scoring and merging of select_blocks.py with a
   single query row.
3. `sparse_partials`, grid (B, Hkv, n + W): program j < n attends to selected block indices[j]
   of the full cache, program n + i to the i-th of the W aligned select_block-sized tiles that
   cover the window [t - w + 1, t] in the window ring. Each writes softmax partials.

XLA only merges partials (`merge_partials`) and combines the branches. Layouts inside: q
[B, Hkv, Gp, Dk] with Gp a power of two >= 16 (zero rows pad small groups), caches
[B, slots, Hkv, D] as in nsa_jax.generation.cache, position [B] int32 (the query's position t).
Triton needs power-of-two tiles: Dk, Dv, the compressed tile and select_block (`supports` says
which shapes the kernels take).
"""
from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl

from nsa_jax import selection_rule
from nsa_jax.branches import combine_branches
from nsa_jax.config import NSAConfig
from pallas_kernels import MASKED
from pallas_kernels.gpu.triton import common, select_blocks


@dataclasses.dataclass(frozen=True)
class Tiling:
    """Launch options (the compressed tile is derived from the cache: `compressed_tile`)."""
    num_warps: int = 4
    num_stages: int = 2
    top_n_warps: int = 4


def compressed_tile(slots: int) -> int:
    """The largest power-of-two tile (<= 128) that divides the compressed cache (0: none)."""
    return next((c for c in (128, 64, 32, 16) if slots % c == 0), 0)


def supports(q, k, v, k_cmp, v_cmp, gates, position, cfg: NSAConfig, *, k_win=None, v_win=None,
             scale=None) -> bool:
    """Whether the kernels take these shapes (the ops twin's arguments): power-of-two head dims
    and select_block >= 16, a compressed cache in whole tiles of whole selection blocks that
    covers every block, caches of whole selection blocks."""
    k_win = k if k_win is None else k_win
    dk, dv, lp, c = q.shape[-1], v.shape[-1], cfg.select_block, k_cmp.shape[1]
    tile = compressed_tile(c)
    return (all(common.is_pow2(x) and x >= 16 for x in (dk, dv, lp))
            and tile > 0 and tile % (lp // cfg.compress_stride) == 0  # top-n: whole blocks a tile
            and c * cfg.compress_stride >= k.shape[1]  # the top-n reads whole blocks' slots
            and k.shape[1] % lp == 0 and k_win.shape[1] % lp == 0)


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


def _compressed_kernel(pos_ref, q_ref, k_ref, v_ref, logits_ref, *partial_refs, scale, block_c,
                       cfg: NSAConfig):
    t = pos_ref[...]
    visible = cfg.num_visible_compressed(t)
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
        compiler_params=common.compiler_params(num_warps, num_stages),
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
        compiler_params=common.compiler_params(num_warps, num_stages),
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


def _top_n_kernel(pos_ref, logits_ref, lse_ref, out_ref, *, plan: select_blocks.Plan,
                  groups: int, cfg: NSAConfig):
    t = pos_ref[...]
    visible = cfg.num_visible_compressed(t)
    lse = lse_ref[...][:, None]
    row = jax.lax.broadcasted_iota(jnp.int32, (plan.gp, 1), 0)
    # Padded heads, rows that see nothing and rows with a non-finite LSE (inf or NaN in the
    # cache) add nothing, as in ops.decode_attention.
    usable = (row < groups) & jnp.isfinite(lse)
    lse = jnp.where(usable, lse, 0.0)
    current = t // plan.select_block
    weights = select_blocks.overlap_weights(plan)
    slot = jax.lax.broadcasted_iota(jnp.int32, (1, plan.slots), 1)
    col = jax.lax.broadcasted_iota(jnp.int32, (1, plan.blocks), 1)

    def tile(i, carry):
        keys, ids, carried = carry
        first = pl.multiple_of(i * plan.slots, plan.slots)
        mask = usable & (first + slot < visible)
        logits = logits_ref[:, pl.ds(first, plan.slots)]
        p = jnp.where(mask, jnp.exp(jnp.where(mask, logits, 0.0) - lse), 0.0)
        blocks, carried = select_blocks.tile_block_scores(p, weights, carried, plan)
        block_id = i * plan.blocks + col
        cand = select_blocks.tile_rank_keys(blocks, block_id, current, plan)
        return (*select_blocks.merge_top_n(keys, ids, cand, block_id), carried)

    init = (*select_blocks.empty_top_n(plan), select_blocks.no_spill(plan))
    keys, ids, _ = jax.lax.fori_loop(0, current // plan.blocks + 1, tile, init)
    out_ref[...] = select_blocks.chosen_ids(keys, ids)[0]


def select_top_n(logits, lse, position, cfg: NSAConfig, *, groups: int, slots: int,
                 num_warps: int = 4, interpret: bool = False):
    """logits [B, Hkv, Gp, C] float32 (the compressed branch's scaled scores; anything where
    invisible), lse [B, Hkv, Gp] (its log-sum-exp, -inf for rows that see nothing), position [B]
    int32 -> [B, Hkv, n] int32 selected block ids, unsorted, -1 = none. Rows >= `groups` are
    padding. The cache holds a single document per sequence. `slots`: compressed tokens per step,
    a power of 2 made of whole selection blocks (a multiple of l'/d) that divides C; C must cover
    every selection block (C >= S / d)."""
    b, hkv, gp, c = logits.shape
    ratio = cfg.select_block // cfg.compress_stride
    if slots < ratio or slots % ratio or slots & (slots - 1) or c % slots:
        raise ValueError(f"slots must be a power of 2, a multiple of select_block / "
                         f"compress_stride = {ratio} and divide the {c} compressed slots; got "
                         f"{slots}")
    if not common.is_pow2(gp) or lse.shape != (b, hkv, gp) or position.shape != (b,):
        raise ValueError(f"logits [B, Hkv, Gp, C] with Gp a power of 2, lse [B, Hkv, Gp], "
                         f"position [B]; got {logits.shape}, {lse.shape}, {position.shape}")
    plan = select_blocks.Plan.for_config(cfg, qb=1, gp=gp, slots=slots, scale=1.0,
                                         num_warps=num_warps, num_stages=1, interpret=interpret)
    ids = pl.pallas_call(
        functools.partial(_top_n_kernel, plan=plan, groups=groups, cfg=cfg),
        grid=(b, hkv),
        in_specs=[pl.BlockSpec((None,), lambda i, h: (i,)),
                  pl.BlockSpec((None, None, gp, c), lambda i, h: (i, h, 0, 0)),
                  pl.BlockSpec((None, None, gp), lambda i, h: (i, h, 0))],
        out_specs=pl.BlockSpec((None, None, plan.width), lambda i, h: (i, h, 0)),
        out_shape=jax.ShapeDtypeStruct((b, hkv, plan.width), jnp.int32),
        compiler_params=common.compiler_params(num_warps, 1),
        interpret=interpret, name="nsa_decode_select",
    )(position, logits.astype(jnp.float32), lse.astype(jnp.float32))
    return ids[..., :cfg.num_selected]


def nsa_decode_attention(q, k, v, k_cmp, v_cmp, gates, position, cfg: NSAConfig, *, k_win=None,
                         v_win=None, scale=None, interpret=False, tiling: Tiling | None = None,
                         top_n=None):
    """NSA for one new query per sequence: the semantics and arguments of
    ops.nsa_decode_attention (q [B, Hq, Dk], caches as nsa_jax.generation.cache lays them out,
    gates [B, Hq, 3], position [B] int) -> (out [B, Hq, Dv], {"indices": [B, Hkv, n],
    "lse_cmp": [B, Hq]}). Shapes must pass `supports` (ValueError otherwise). `top_n`: None runs
    the top-n kernel; a function (logits [B, Hkv, G, C], lse [B, Hkv, G], position) -> sorted
    indices [B, Hkv, n] runs that between the kernels instead (the benchmark's comparison).
    """
    if not supports(q, k, v, k_cmp, v_cmp, gates, position, cfg, k_win=k_win, v_win=v_win):
        raise ValueError(f"the decode kernels need power-of-two head dims and select_block >= 16 "
                         f"and caches of whole selection blocks; got q {q.shape}, k {k.shape}, "
                         f"k_cmp {k_cmp.shape}, select_block {cfg.select_block}")
    tiling = tiling or Tiling()
    k_win, v_win = (k, v) if k_win is None else (k_win, v_win)
    b, hq, dk = q.shape
    hkv = k.shape[2]
    g = hq // hkv
    rows = max(common.MIN_ROWS, common.pow2(g))
    q_g = common.pad_to(q.reshape(b, hkv, g, dk), (None, None, rows, None))
    launch = dict(scale=float(dk ** -0.5 if scale is None else scale), interpret=interpret,
                  num_warps=tiling.num_warps, num_stages=tiling.num_stages)
    position = position.astype(jnp.int32)
    tile = compressed_tile(k_cmp.shape[1])
    logits, *partials = compressed_partials(q_g, k_cmp, v_cmp, position, cfg, block_c=tile,
                                            **launch)
    o_cmp, lse = merge_partials(*partials)
    if top_n is None:
        chosen = select_top_n(logits, lse, position, cfg, groups=g, slots=tile,
                              num_warps=tiling.top_n_warps, interpret=interpret)
        indices = selection_rule.sorted_block_ids(chosen)
    else:
        chosen = indices = top_n(logits[:, :, :g], lse[:, :, :g], position)
    o_cmp, lse = o_cmp[:, :, :g], lse[:, :, :g]
    m, l, acc = sparse_partials(q_g, k, v, k_win, v_win, chosen, position, cfg, **launch)
    n = cfg.num_selected
    o_slc = merge_partials(m[:, :, :n], l[:, :, :n], acc[:, :, :n])[0][:, :, :g]
    o_win = merge_partials(m[:, :, n:], l[:, :, n:], acc[:, :, n:])[0][:, :, :g]
    outputs = tuple(o.reshape(b, hq, -1).astype(q.dtype) for o in (o_cmp, o_slc, o_win))
    return (combine_branches(gates, outputs, q.dtype),
            {"indices": indices, "lse_cmp": lse.reshape(b, hq)})
