"""NSA decoding on GPU (Pallas, Triton lowering): one new query per sequence over a KV cache, the
"pallas" implementation of ops.nsa_decode_attention, with its signature.

At batch 1 a step reads a few MB (64k context, paper shape: 4096 compressed slots, 16 blocks of
64 keys, 512 window keys, 4 KV heads x 128 dims: 11.5 MB), microseconds of HBM time: the step is
bound by launches, by the dependency compressed scores -> top-n -> selected blocks, and by grids
too small for 132 SMs. So the work is split over programs (split-K, flash-decoding) and a step is
four launches (three when the top-n runs inside a single-split compressed pass), no XLA work
around them when G is a power of 2 >= 16 (the paper's 16):

1. `compressed_partials`, grid (B, Hkv, S): split s walks its share of the compressed cache in
   tiles of kb slots (online softmax): softmax partials (m, l, acc) per split, and per tile the
   selection-block partials of the top-n: bs[h, j] = sum over the tile's slots i (and the X slots
   before it, whose stride-d chunks reach into its first block) of overlap(i, j) *
   exp(s[h, i] - mt[h]), with mt the tile's own row maximum. Block scores then need only a
   factor per (tile, head): score[j] = sum_h exp(mt[h] - lse[h]) * bs[h, j] (nsa_spec.md,
   block scores), so no [G, C] logits reach HBM and the scores are exact to float32 rounding.
2. `select_top_n`, grid (B, Hkv): merges the split statistics into the compressed LSE, forms the
   block scores of every tile (forced blocks +inf, blocks after the query's -inf: ops.selection's
   candidate rule), writes them, and takes n rounds of argmax over all of them (largest score,
   then the lowest block id: lax.top_k's order, so the same set as the xla path).
3. `sparse_partials`, grid (B, Hkv, 2H): program j < H attends to `units` selected blocks,
   program H + j to `units` of the W aligned l'-key tiles that cover the window; softmax partials.
4. `combine`, grid (B, Hkv, Dv / dvb): merges each branch's partials and forms the gated sum
   (nsa_jax.branches' order and rounding), a column slice of Dv per program, G rows when G is
   a power of 2 (so a small group costs one XLA pad of q, nothing else).

The splits S and units per sparse program are chosen so that about TARGET_PROGRAMS programs run
(`Tiling` overrides them). Layouts inside: q [B, Hkv, Gp, Dk] with Gp a power of two >= 16 (zero
rows pad small groups), caches [B, slots, Hkv, D] as in nsa_jax.generation.cache, position [B]
int32 (the query's position t). Triton needs power-of-two tiles (`supports` says which shapes
the kernels take).
"""
from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as pltriton

from nsa_jax import layout
from nsa_jax.config import NSAConfig
from pallas_kernels import MASKED
from pallas_kernels.gpu.triton import common, select_blocks

TARGET_PROGRAMS = 264  # two per SM of an H100 / H200 (132 SMs): what the automatic splits aim at
SELECT_CHUNK = 8192  # block-partial elements the top-n kernel loads per step
MAX_BLOCKS = 1 << 14  # selection blocks the top-n kernel ranks in registers (1M tokens at l'=64)


@dataclasses.dataclass(frozen=True)
class Tiling:
    """Launch options; None means chosen from the shapes (`Geometry.of`)."""
    compressed_tile: int = 128  # kb: compressed slots per step (the largest power of 2 <= this
                                # that divides the compressed cache is used)
    compressed_splits: int | None = None  # S: programs per (sequence, KV head), compressed pass
    units: int | None = None  # selected blocks or window tiles per sparse program
    combine_columns: int | None = None  # dvb: Dv columns per combine program
    fuse_select: bool | None = None  # the top-n inside the compressed pass (one split only);
                                     # None: whenever S = 1
    num_warps: int = 4
    num_stages: int = 2
    select_warps: int = 8


def _pow2(x: int) -> int:
    return common.pow2(max(int(x), 1))


def _floor_pow2(x: int) -> int:
    return 1 << (max(int(x), 1).bit_length() - 1)


def window_tiles(cfg: NSAConfig) -> int:
    """Aligned select_block tiles that can overlap a window of w keys."""
    return -(-(cfg.window - 1) // cfg.select_block) + 1


def compressed_tile(slots: int, largest: int = 128) -> int:
    """The largest power-of-two tile (16 <= tile <= largest) that divides the compressed cache (0:
    none)."""
    return next((c for c in (128, 64, 32, 16) if c <= largest and slots % c == 0), 0)


@dataclasses.dataclass(frozen=True)
class Geometry:
    """Static layout of one call (hashable): tiles, splits and program counts."""
    groups: int  # G = Hq / Hkv
    gp: int  # G padded to a power of 2 >= 16 (rows of every matmul)
    tile: int  # kb
    tiles: int  # T = C / kb
    padded_tiles: int  # T rounded up to a power of 2 (the top-n ranks T_pad * nb blocks)
    tiles_per_split: int
    splits: int  # S, a power of 2 (splits past the tiles write empty partials)
    extra: int  # X: slots before a tile whose chunks reach into its first block (multiple of 16)
    select_tiles: int  # tiles per step of the top-n kernel
    units: int
    half: int  # H: programs per branch of the sparse kernel (a power of 2)
    columns: int  # dvb
    fused: bool  # the compressed pass (S = 1) also ranks the blocks: three launches, not four
    plan: select_blocks.Plan  # the tile's overlap weights and forced-block rule

    @classmethod
    def of(cls, q, k_cmp, v, cfg: NSAConfig, tiling: Tiling) -> Geometry:
        b, hq, _ = q.shape
        hkv, c, dv = k_cmp.shape[2], k_cmp.shape[1], v.shape[-1]
        heads = b * hkv
        kb = compressed_tile(c, tiling.compressed_tile)
        padded = _pow2(c // kb) if kb else 1
        target = tiling.compressed_splits or _pow2(-(-TARGET_PROGRAMS // heads))
        per_split = max(1, padded // _pow2(target))
        gp = max(common.MIN_ROWS, _pow2(hq // hkv))
        ratio = cfg.select_block // cfg.compress_stride
        plan = select_blocks.Plan.for_config(cfg, qb=1, gp=gp, slots=max(kb, ratio), scale=1.0,
                                             num_warps=tiling.num_warps, num_stages=1,
                                             interpret=False)
        units = tiling.units or cls._auto_units(heads, cfg)
        half = max(_pow2(-(-cfg.num_selected // units)), _pow2(-(-window_tiles(cfg) // units)))
        splits = padded // per_split
        columns = tiling.combine_columns or min(
            dv, max(8, _floor_pow2(SELECT_CHUNK // (max(splits, half) * gp))))
        return cls(groups=hq // hkv, gp=gp, tile=kb, tiles=c // kb if kb else 0,
                   padded_tiles=padded, tiles_per_split=per_split, splits=splits,
                   extra=-(-(cfg.compress_block // cfg.compress_stride - 1) // 16) * 16,
                   select_tiles=min(padded, _floor_pow2(SELECT_CHUNK // (gp * plan.blocks))),
                   units=units, half=half, columns=columns, plan=plan,
                   fused=splits == 1 if tiling.fuse_select is None else tiling.fuse_select)

    @staticmethod
    def _auto_units(heads: int, cfg: NSAConfig) -> int:
        """Fewest units per program that still leave about 2 x TARGET_PROGRAMS programs."""
        units = 1
        while heads * (cfg.num_selected + window_tiles(cfg)) > 2 * TARGET_PROGRAMS * units:
            units *= 2
        return units

    @property
    def blocks(self) -> int:
        """Selection blocks of one tile (nb = kb / (l'/d))."""
        return self.plan.blocks

    def problem(self, cfg: NSAConfig, k_cmp, v) -> str | None:
        """Why the kernels cannot take this call ('' or None: they can)."""
        checks = (
            (self.tile > 0, f"a compressed cache of whole tiles of 16..128 slots (got "
                            f"{k_cmp.shape[1]} slots)"),
            (self.tile % self.plan.ratio == 0 and self.blocks >= 16,
             f"compressed tiles of >= 16 whole selection blocks (tile {self.tile}, l'/d = "
             f"{self.plan.ratio})"),
            (self.extra <= self.tile, f"l/d - 1 <= the compressed tile ({self.tile})"),
            (self.padded_tiles * self.blocks <= MAX_BLOCKS,
             f"at most {MAX_BLOCKS} selection blocks in the compressed cache"),
            (v.shape[-1] % self.columns == 0, f"Dv a multiple of {self.columns}"),
            (self.splits == 1 or not self.fused, "one compressed split to fuse the top-n"),
        )
        return next((why for ok, why in checks if not ok), None)


def supports(q, k, v, k_cmp, v_cmp, gates, position, cfg: NSAConfig, *, k_win=None, v_win=None,
             scale=None, tiling: Tiling | None = None) -> bool:
    """Whether the kernels take these shapes (the ops twin's arguments): power-of-two head dims
    and select_block >= 16, caches of whole selection blocks, a compressed cache of whole tiles
    of >= 16 selection blocks that covers every block (C * d >= S)."""
    k_win = k if k_win is None else k_win
    dk, dv, lp = q.shape[-1], v.shape[-1], cfg.select_block
    if not (all(common.is_pow2(x) and x >= 16 for x in (dk, dv, lp))
            and k.shape[1] % lp == 0 and k_win.shape[1] % lp == 0
            and k_cmp.shape[1] * cfg.compress_stride >= k.shape[1]):
        return False
    return not Geometry.of(q, k_cmp, v, cfg, tiling or Tiling()).problem(cfg, k_cmp, v)


# --- shared by the kernels ------------------------------------------------------------------------

def _logits(q, k, scale):
    return common.scores(q, k, scale, common.dot_precision(q.dtype))


def _store_softmax(refs, acc, m, l):
    m_ref, l_ref, acc_ref = refs
    m_ref[...] = m.reshape(m_ref.shape)
    l_ref[...] = l.reshape(l_ref.shape)
    acc_ref[...] = acc


def merge_stats(m, l):
    """Softmax partials over axis 0 (m, l [P, rows]) -> (weights [P, rows] of each partial, total
    [rows], lse [rows] float32: -inf for rows that saw no key)."""
    top = jnp.max(m, axis=0)
    weight = jnp.exp(m - top[None, :])  # 0 for empty partials unless all are empty (then l = 0)
    total = jnp.sum(l * weight, axis=0)
    seen = total > 0
    return weight, total, jnp.where(seen, top + jnp.log(jnp.where(seen, total, 1.0)), -jnp.inf)


def merge(m, l, acc):
    """Partials m, l [P, rows], acc [P, rows, D] -> o [rows, D] float32 (0 where nothing seen)."""
    weight, total, _ = merge_stats(m, l)
    out = jnp.sum(acc * weight[:, :, None], axis=0)
    return out / jnp.where(total > 0, total, 1.0)[:, None]


# --- 1. compressed partials -----------------------------------------------------------------------

def _overlap_weights(geo: Geometry):
    """(own [kb, nb], prev [X, nb]) bfloat16: stride-d chunks shared by a tile's slots, and by the
    X slots before it, with the tile's blocks (small integers, exact in bfloat16)."""
    nb = geo.blocks

    def weights(rows, offset):
        slot = jax.lax.broadcasted_iota(jnp.int32, (rows, nb), 0) + offset
        block = jax.lax.broadcasted_iota(jnp.int32, (rows, nb), 1)
        return select_blocks.overlap(slot, block, geo.plan).astype(jnp.bfloat16)

    return weights(geo.tile, 0), (weights(geo.extra, -geo.extra) if geo.extra else None)


def _block_partials(q, s, own, k_ref, first, visible, weights, geo: Geometry, scale):
    """One tile's (mt [Gp], bs [Gp, nb]): block sums of exp(s - mt) by chunk overlap."""
    w_own, w_prev = weights
    mt = s.max(axis=1)
    if geo.extra:
        prev = first - geo.extra + jax.lax.broadcasted_iota(jnp.int32, (geo.extra,), 0)
        seen = (prev >= 0) & (prev < visible)
        start = pl.multiple_of(jnp.maximum(first - geo.extra, 0), 16)
        s_prev = jnp.where(seen[None, :], _logits(q, k_ref[pl.ds(start, geo.extra), :], scale),
                           MASKED)
        mt = jnp.maximum(mt, s_prev.max(axis=1))
    p = jnp.where(own[None, :], jnp.exp(s - mt[:, None]), 0.0)
    bs = select_blocks.split_dot(p, w_own)
    if geo.extra:
        bs += select_blocks.split_dot(jnp.where(seen[None, :], jnp.exp(s_prev - mt[:, None]), 0.0),
                                      w_prev)
    return mt, bs


def _compressed_kernel(pos_ref, q_ref, k_ref, v_ref, m_ref, l_ref, acc_ref, mt_ref, bs_ref,
                       *select_refs, geo: Geometry, cfg: NSAConfig, scale: float,
                       interpret: bool):
    t = pos_ref[...]
    visible = cfg.num_visible_compressed(t)
    q = q_ref[...]
    kb, first_tile = geo.tile, pl.program_id(2) * geo.tiles_per_split
    weights = _overlap_weights(geo)
    live = jnp.clip(reach(visible, geo) - first_tile, 0, geo.tiles_per_split)
    precision = common.dot_precision(q.dtype)

    def tile(j, carry):
        i = first_tile + j
        first = pl.multiple_of(i * kb, kb)
        own = first + jax.lax.broadcasted_iota(jnp.int32, (kb,), 0) < visible
        s = jnp.where(own[None, :], _logits(q, k_ref[pl.ds(first, kb), :], scale), MASKED)
        mt_ref[i], bs_ref[i] = _block_partials(q, s, own, k_ref, first, visible, weights, geo,
                                               scale)
        return common.softmax_update(carry, s, own[None, :], v_ref[pl.ds(first, kb), :],
                                     precision)

    carry = jax.lax.fori_loop(0, live, tile, common.empty_softmax(geo.gp, v_ref.shape[-1]))
    _store_softmax((m_ref, l_ref, acc_ref), *carry)
    if geo.fused:  # the whole cache was this program's: its softmax state gives the LSE
        if not interpret:  # mt and bs, written by every thread, visible to every thread
            pltriton.debug_barrier()
        _, m, l = carry
        lse = merge_stats(m.reshape(1, geo.gp), l.reshape(1, geo.gp))[2]
        _select(t, lse, mt_ref, bs_ref, *select_refs, geo=geo, cfg=cfg, interpret=interpret)


def reach(visible, geo: Geometry):
    """Tiles [0, reach) hold a visible compressed token in their slots or in the X before them:
    the only tiles with block partials (the rest of mt and bs is never written)."""
    return jnp.minimum(geo.tiles, (visible + geo.extra + geo.tile - 1) // geo.tile)


def compressed_partials(q, k_cmp, v_cmp, position, cfg: NSAConfig, geo: Geometry, *,
                        scale: float, num_warps: int = 4, num_stages: int = 2,
                        interpret: bool = False):
    """q [B, Hkv, Gp, Dk] -> split partials m, l [B, Hkv, S, Gp], acc [B, Hkv, S, Gp, Dv] and
    block partials mt [B, Hkv, T_pad, Gp], bs [B, Hkv, T_pad, Gp, nb] (float32; tiles past
    `reach` are not written); with geo.fused, also `select_top_n`'s three outputs."""
    b, hkv, gp, dk = q.shape
    c, dv = k_cmp.shape[1], v_cmp.shape[-1]
    s, tp, nb = geo.splits, geo.padded_tiles, geo.blocks
    f32 = lambda *shape: jax.ShapeDtypeStruct(shape, jnp.float32)
    per_split = lambda *block: pl.BlockSpec((None, None, None, *block),
                                            lambda i, h, j: (i, h, j) + (0,) * len(block))
    per_head = lambda *block: pl.BlockSpec((None, None, *block),
                                           lambda i, h, j: (i, h) + (0,) * len(block))
    selection = _selection_outputs(b, hkv, geo, cfg, per_head) if geo.fused else ([], [])
    return pl.pallas_call(
        functools.partial(_compressed_kernel, geo=geo, cfg=cfg, scale=scale,
                          interpret=interpret),
        grid=(b, hkv, s),
        in_specs=[pl.BlockSpec((None,), lambda i, h, j: (i,)), per_head(gp, dk),
                  pl.BlockSpec((None, c, None, dk), lambda i, h, j: (i, 0, h, 0)),
                  pl.BlockSpec((None, c, None, dv), lambda i, h, j: (i, 0, h, 0))],
        out_specs=[per_split(gp), per_split(gp), per_split(gp, dv), per_head(tp, gp),
                   per_head(tp, gp, nb), *selection[0]],
        out_shape=[f32(b, hkv, s, gp), f32(b, hkv, s, gp), f32(b, hkv, s, gp, dv),
                   f32(b, hkv, tp, gp), f32(b, hkv, tp, gp, nb), *selection[1]],
        compiler_params=common.compiler_params(num_warps, num_stages),
        interpret=interpret, name="nsa_decode_compressed",
    )(position, q, k_cmp, v_cmp)


# --- 2. LSE and top-n -----------------------------------------------------------------------------

def _select_kernel(pos_ref, m_ref, l_ref, mt_ref, bs_ref, *out_refs, geo: Geometry,
                   cfg: NSAConfig, interpret: bool):
    _select(pos_ref[...], merge_stats(m_ref[...], l_ref[...])[2], mt_ref, bs_ref, *out_refs,
            geo=geo, cfg=cfg, interpret=interpret)


def _select(t, lse, mt_ref, bs_ref, lse_ref, scores_ref, ids_ref, *, geo: Geometry,
            cfg: NSAConfig, interpret: bool):
    """The compressed LSE [Gp] and the block partials -> the block scores and the top-n."""
    lse_ref[...] = lse
    usable = (jax.lax.broadcasted_iota(jnp.int32, (geo.gp,), 0) < geo.groups) & (lse > -jnp.inf)
    lse = jnp.where(usable, lse, 0.0)
    current = t // cfg.select_block
    tc, nb = geo.select_tiles, geo.blocks
    written = reach(cfg.num_visible_compressed(t), geo)

    def chunk(c, _):
        first = pl.multiple_of(c * tc, tc)
        tile = first + jax.lax.broadcasted_iota(jnp.int32, (tc,), 0)
        use = (tile < written)[:, None] & usable[None, :]  # [tc, Gp]; unwritten tiles score 0
        factor = jnp.where(use, jnp.exp(mt_ref[pl.ds(first, tc), :] - lse[None, :]), 0.0)
        score = jnp.sum(jnp.where(use[:, :, None], bs_ref[pl.ds(first, tc), :, :]
                                  * factor[:, :, None], 0.0), axis=1)  # [tc, nb]
        block = ((first + jax.lax.broadcasted_iota(jnp.int32, (tc, nb), 0)) * nb
                 + jax.lax.broadcasted_iota(jnp.int32, (tc, nb), 1))
        scores_ref[pl.ds(first, tc), :] = select_blocks.candidates(score, block, current,
                                                                   geo.plan)

    jax.lax.fori_loop(0, geo.padded_tiles // tc, chunk, None)
    if not interpret:  # the writes above by every thread, visible to the reads below
        pltriton.debug_barrier()
    keys = scores_ref[...].reshape(geo.padded_tiles * nb)
    col = jax.lax.broadcasted_iota(jnp.int32, keys.shape, 0)
    slot = jax.lax.broadcasted_iota(jnp.int32, ids_ref.shape, 0)

    def take(i, carry):  # the best key left, the lowest block id among equals (lax.top_k's order)
        keys, ids = carry
        best = jnp.argmax(keys).astype(jnp.int32)
        return jnp.where(col == best, -jnp.inf, keys), jnp.where(slot == i, best, ids)

    _, ids = jax.lax.fori_loop(0, cfg.num_selected, take, (keys, jnp.zeros_like(slot)))
    ids_ref[...] = jnp.where(slot < jnp.minimum(cfg.num_selected, current + 1), ids, -1)


def select_top_n(m, l, mt, bs, position, cfg: NSAConfig, geo: Geometry, *, num_warps: int = 8,
                 interpret: bool = False):
    """Partials of `compressed_partials` -> (lse [B, Hkv, Gp] float32, -inf where nothing is
    visible; block scores [B, Hkv, T_pad, nb] float32 as ops.selection's candidates, forced
    blocks +inf, later ones -inf; chosen block ids [B, Hkv, pow2(n)] int32, unsorted, -1 =
    none, columns >= n junk). Rows >= G are padding."""
    b, hkv, s, gp = m.shape
    tp, nb = geo.padded_tiles, geo.blocks
    head = lambda *block: pl.BlockSpec((None, None, *block),
                                       lambda i, h: (i, h) + (0,) * len(block))
    out_specs, out_shape = _selection_outputs(b, hkv, geo, cfg, head)
    return pl.pallas_call(
        functools.partial(_select_kernel, geo=geo, cfg=cfg, interpret=interpret),
        grid=(b, hkv),
        in_specs=[pl.BlockSpec((None,), lambda i, h: (i,)), head(s, gp), head(s, gp),
                  head(tp, gp), head(tp, gp, nb)],
        out_specs=out_specs, out_shape=out_shape,
        compiler_params=common.compiler_params(num_warps, 1),
        interpret=interpret, name="nsa_decode_select",
    )(position, m, l, mt, bs)


def _selection_outputs(b, hkv, geo: Geometry, cfg: NSAConfig, head):
    """(specs, shapes) of the selection's outputs: lse, block scores, chosen ids."""
    shapes = [jax.ShapeDtypeStruct((b, hkv, geo.gp), jnp.float32),
              jax.ShapeDtypeStruct((b, hkv, geo.padded_tiles, geo.blocks), jnp.float32),
              jax.ShapeDtypeStruct((b, hkv, common.pow2(cfg.num_selected)), jnp.int32)]
    return [head(*x.shape[2:]) for x in shapes], shapes


# --- 3. selected blocks and window ----------------------------------------------------------------

def _sparse_kernel(pos_ref, ids_ref, q_ref, k_ref, v_ref, kw_ref, vw_ref, *out_refs,
                   geo: Geometry, cfg: NSAConfig, scale: float):
    t = pos_ref[...]
    j = pl.program_id(2)
    q = q_ref[...]
    lp, n, wt = cfg.select_block, cfg.num_selected, window_tiles(cfg)
    offsets = jax.lax.broadcasted_iota(jnp.int32, (lp,), 0)
    precision = common.dot_precision(q.dtype)

    def selected(e):  # (first key, its slot, live, lowest key) of unit e
        chosen = ids_ref[jnp.minimum(e, n - 1)]
        start = jnp.maximum(chosen, 0) * lp
        return start, start, (e < n) & (chosen >= 0), 0

    def window(e):
        tile = t // lp - (wt - 1) + e
        start = jnp.maximum(tile, 0) * lp
        return start, start % kw_ref.shape[0], (e < wt) & (tile >= 0), t - cfg.window + 1

    def attend(unit_keys, k_buf, v_buf, base):
        def unit(e, carry):
            start, slot, live, lowest = unit_keys(base + e)
            key = start + offsets
            mask = (live & (key <= t) & (key >= lowest))[None, :]
            slot = pl.multiple_of(slot, lp)
            s = _logits(q, k_buf[pl.ds(slot, lp), :], scale)
            return common.softmax_update(carry, s, mask, v_buf[pl.ds(slot, lp), :], precision)

        carry = jax.lax.fori_loop(0, geo.units, unit,
                                  common.empty_softmax(geo.gp, v_buf.shape[-1]))
        _store_softmax(out_refs, *carry)

    pl.when(j < geo.half)(lambda: attend(selected, k_ref, v_ref, j * geo.units))
    pl.when(j >= geo.half)(lambda: attend(window, kw_ref, vw_ref, (j - geo.half) * geo.units))


def sparse_partials(q, k, v, k_win, v_win, ids, position, cfg: NSAConfig, geo: Geometry, *,
                    scale: float, num_warps: int = 4, num_stages: int = 2,
                    interpret: bool = False):
    """-> partials m, l [B, Hkv, 2H, Gp], acc [B, Hkv, 2H, Gp, Dv]: the first H over the selected
    blocks `ids` [B, Hkv, >= n] (-1 = none), `units` each, the last H over the window's tiles."""
    b, hkv, gp, dk = q.shape
    s, r, dv = k.shape[1], k_win.shape[1], v.shape[-1]
    lp = cfg.select_block
    if s % lp or r % lp:
        raise ValueError(f"cache slots ({s}) and window ring slots ({r}) must be multiples of "
                         f"select_block={lp}")
    programs = 2 * geo.half
    whole = lambda slots, dim: pl.BlockSpec((None, slots, None, dim), lambda i, h, j: (i, 0, h, 0))
    part = lambda *block: pl.BlockSpec((None, None, None, *block),
                                       lambda i, h, j: (i, h, j) + (0,) * len(block))
    f32 = lambda *shape: jax.ShapeDtypeStruct(shape, jnp.float32)
    return pl.pallas_call(
        functools.partial(_sparse_kernel, geo=geo, cfg=cfg, scale=scale),
        grid=(b, hkv, programs),
        in_specs=[pl.BlockSpec((None,), lambda i, h, j: (i,)),
                  pl.BlockSpec((None, None, ids.shape[-1]), lambda i, h, j: (i, h, 0)),
                  pl.BlockSpec((None, None, gp, dk), lambda i, h, j: (i, h, 0, 0)),
                  whole(s, dk), whole(s, dv), whole(r, dk), whole(r, dv)],
        out_specs=[part(gp), part(gp), part(gp, dv)],
        out_shape=[f32(b, hkv, programs, gp), f32(b, hkv, programs, gp),
                   f32(b, hkv, programs, gp, dv)],
        compiler_params=common.compiler_params(num_warps, num_stages),
        interpret=interpret, name="nsa_decode_sparse",
    )(position, ids, q, k, v, k_win, v_win)


# --- 4. merge and gated sum -----------------------------------------------------------------------

def _combine_kernel(gates_ref, *refs, dtype):
    *branches, out_ref = refs
    total = 0.0
    for i in range(3):  # nsa_jax.branches order: cmp, slc, win
        m_ref, l_ref, acc_ref = branches[3 * i:3 * i + 3]
        o = merge(m_ref[...], l_ref[...], acc_ref[...]).astype(dtype).astype(jnp.float32)
        total = total + gates_ref[:, i].astype(jnp.float32)[:, None] * o
    out_ref[...] = total.astype(out_ref.dtype)


def combine(gates, cmp_partials, sparse, geo: Geometry, dtype, *, num_warps: int = 4,
            interpret: bool = False):
    """gates [B, Hkv, R, 3], the compressed split partials and the sparse partials -> out
    [B, Hkv, R, Dv] in `dtype` for the first R rows (R: G when it is a power of 2, so no XLA
    slice follows; else Gp): each branch merged and rounded to dtype, then gated and summed in
    float32 (nsa_jax.branches.combine_branches)."""
    m, _, acc = cmp_partials
    b, hkv, s, _, dv = acc.shape
    rows = gates.shape[2]
    cols, h = geo.columns, geo.half
    stats = lambda n, at: pl.BlockSpec((None, None, n, rows), lambda i, k, c: (i, k, at, 0))
    values = lambda n, at: pl.BlockSpec((None, None, n, rows, cols),
                                        lambda i, k, c: (i, k, at, 0, c))
    branch_specs = [stats(s, 0), stats(s, 0), values(s, 0)]
    for at in (0, 1):  # the sparse partials: selected half, window half
        branch_specs += [stats(h, at), stats(h, at), values(h, at)]
    return pl.pallas_call(
        functools.partial(_combine_kernel, dtype=dtype),
        grid=(b, hkv, dv // cols),
        in_specs=[pl.BlockSpec((None, None, rows, 3), lambda i, k, c: (i, k, 0, 0)),
                  *branch_specs],
        out_specs=pl.BlockSpec((None, None, rows, cols), lambda i, k, c: (i, k, 0, c)),
        out_shape=jax.ShapeDtypeStruct((b, hkv, rows, dv), dtype),
        compiler_params=common.compiler_params(num_warps, 1),
        interpret=interpret, name="nsa_decode_combine",
    )(gates, *cmp_partials, *sparse, *sparse)


# --- entry point ----------------------------------------------------------------------------------

def nsa_decode_attention(q, k, v, k_cmp, v_cmp, gates, position, cfg: NSAConfig, *, k_win=None,
                         v_win=None, scale=None, interpret=False, tiling: Tiling | None = None,
                         compressed=None):
    """NSA for one new query per sequence: the semantics and arguments of
    ops.nsa_decode_attention (q [B, Hq, Dk], caches as nsa_jax.generation.cache lays them out,
    gates [B, Hq, 3], position [B] int) -> (out [B, Hq, Dv], {"indices": [B, Hkv, n] sorted,
    "lse_cmp": [B, Hq] float32}). Shapes must pass `supports` (ValueError otherwise).
    `compressed`: the compressed pass, `compressed_partials` or one with its contract
    (pallas_kernels.gpu.mosaic.decode_attention's)."""
    tiling = tiling or Tiling()
    if not supports(q, k, v, k_cmp, v_cmp, gates, position, cfg, k_win=k_win, v_win=v_win,
                    tiling=tiling):
        geo = Geometry.of(q, k_cmp, v, cfg, tiling)
        raise ValueError(f"the decode kernels need power-of-two head dims and select_block >= 16, "
                         f"caches of whole selection blocks and "
                         f"{geo.problem(cfg, k_cmp, v) or 'a compressed cache covering them'}; "
                         f"got q {q.shape}, k {k.shape}, k_cmp {k_cmp.shape}, {cfg}")
    k_win, v_win = (k, v) if k_win is None else (k_win, v_win)
    b, hq, dk = q.shape
    hkv, dv = k.shape[2], v.shape[-1]
    geo = Geometry.of(q, k_cmp, v, cfg, tiling)
    g, gp = geo.groups, geo.gp
    grouped = lambda x, rows: common.pad_to(x.reshape(b, hkv, g, x.shape[-1]),
                                            (None, None, rows, None))
    q_g = grouped(q, gp)
    launch = dict(scale=float(dk ** -0.5 if scale is None else scale), interpret=interpret,
                  num_warps=tiling.num_warps, num_stages=tiling.num_stages)
    position = position.astype(jnp.int32)
    cmp_partials = (compressed or compressed_partials)(q_g, k_cmp, v_cmp, position, cfg, geo,
                                                      **launch)
    if geo.fused:
        lse, _, ids = cmp_partials[5:]
    else:
        lse, _, ids = select_top_n(*cmp_partials[:2], *cmp_partials[3:5], position, cfg, geo,
                                   num_warps=tiling.select_warps, interpret=interpret)
    sparse = sparse_partials(q_g, k, v, k_win, v_win, ids, position, cfg, geo, **launch)
    out = combine(grouped(gates, g if common.is_pow2(g) else gp), cmp_partials[:3], sparse,
                  geo, q.dtype, num_warps=tiling.num_warps, interpret=interpret)
    n = cfg.num_selected
    return (out[:, :, :g].reshape(b, hq, dv),
            {"indices": layout.sorted_block_ids(ids[..., :n]),
             "lse_cmp": lse[:, :, :g].reshape(b, hq)})

