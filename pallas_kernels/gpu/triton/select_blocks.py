"""NSA block selection on GPU (Pallas, Triton lowering): the compressed branch's probabilities
(recomputed from its LSE) -> overlap-weighted selection-block scores -> group sum -> top-n with
forced blocks, fused in one kernel, so no [T, Tc] or [T, NB] array ever reaches HBM. The same
scoring and merging serve the decode top-n (decode_attention.py). No gradient: block choice is not
differentiable.

Grid (query tile, batch * KV head); a program holds `qb * gp` rows as in the compressed forward.
For each document present in its tile (almost always one) it walks that document's selection
blocks in tiles of `blocks` blocks. A tile loads the `blocks * r` compressed slots (r = l'/d) whose
first chunk lies in those blocks, recomputes their probabilities from the saved LSE, maps them to
blocks by overlap with one small matmul (weight = stride-d chunks shared; the chunks that run past
the tile are carried into the next tile's first blocks), sums the G heads and merges the tile's
candidates into a running top-n per query. Candidates are ordered by nsa_jax.selection_rule's rank
keys (forced, +inf, finite, -inf/NaN; `tile_rank_keys`), ties to the lower block, the order of
lax.top_k over those keys, so the result is the rule's set. XLA only prepares per-query document
data and sorts the n chosen ids.
"""
from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl

from nsa_jax import layout, selection_rule
from nsa_jax.config import NSAConfig
from nsa_jax.selection_rule import KEY_FORCED, KEY_INVISIBLE, KEY_NON_FINITE_LOW
from pallas_kernels.gpu.triton import common
from pallas_kernels.gpu.triton.compressed_attention import (check_compressed_keys,
                                                            first_slot_of_document,
                                                            group_queries, padded_documents,
                                                            query_positions_per_tile, row_bounds,
                                                            slot_visible)

_EMPTY_ID = 1 << 30  # ids of the initial "nothing chosen yet" entries (key KEY_INVISIBLE)
_HIGH_HALF = -65536  # int32 0xFFFF0000: sign, exponent and the 7 mantissa bits bfloat16 keeps


@dataclasses.dataclass(frozen=True)
class Tiling:
    """Tile options."""
    rows_per_program: int = 128  # query rows (positions x padded group heads) per program
    key_block: int = 64  # compressed slots per step (a power of 2; at least l'/d are loaded)
    num_warps: int = 8
    num_stages: int = 2

    def __post_init__(self):
        common.check_pow2("key_block", self.key_block)


@dataclasses.dataclass(frozen=True)
class Plan:
    """Static layout of the select kernel (hashable), derived from the Tiling and the config."""
    qb: int  # query positions per program
    gp: int  # heads per KV group, padded to a power of 2
    slots: int  # compressed slots loaded per step (power of 2 >= blocks * ratio)
    blocks: int  # selection blocks scored per step
    ratio: int  # r = l' / d: chunks per selection block
    chunks: int  # l / d: chunks per compressed token
    spill: int  # blocks past a tile that its slots reach
    select_block: int  # l'
    compress_block: int  # l
    num_selected: int  # n
    width: int  # n padded to a power of 2
    num_init_blocks: int
    num_local_blocks: int
    scale: float
    num_warps: int
    num_stages: int
    interpret: bool

    @classmethod
    def for_config(cls, cfg: NSAConfig, *, qb: int, gp: int, slots: int, scale: float,
                   num_warps: int, num_stages: int, interpret: bool) -> Plan:
        """The tiling of `slots` compressed slots per step (a power of 2 >= l'/d): as many whole
        selection blocks per step as fit, the rest derived from the NSA config."""
        ratio = cfg.select_block // cfg.compress_stride
        chunks = cfg.compress_block // cfg.compress_stride
        return cls(qb=qb, gp=gp, slots=slots, blocks=1 << ((slots // ratio).bit_length() - 1),
                   ratio=ratio, chunks=chunks, spill=-(-(chunks - 1) // ratio),
                   select_block=cfg.select_block, compress_block=cfg.compress_block,
                   num_selected=cfg.num_selected, width=common.pow2(cfg.num_selected),
                   num_init_blocks=cfg.num_init_blocks, num_local_blocks=cfg.num_local_blocks,
                   scale=scale, num_warps=num_warps, num_stages=num_stages, interpret=interpret)

    @property
    def rows(self) -> int:
        return self.qb * self.gp


def overlap(slot, block, plan: Plan):
    """Chunks shared by local slot `slot` (chunks [slot, slot + l/d)) and local block `block`
    (chunks [block * r, (block + 1) * r)); slots past the tile's own blocks count nothing."""
    r = plan.ratio
    shared = (jnp.minimum(slot + plan.chunks, (block + 1) * r) - jnp.maximum(slot, block * r))
    return jnp.where(slot < plan.blocks * r, jnp.maximum(shared, 0), 0).astype(jnp.float32)


def _high_bf16_bits(x):
    """x float32 with its low 16 mantissa bits cleared: exactly a bfloat16 value. A bit mask, not
    an astype round trip, which XLA may fold away (excess precision) and so lose the rest."""
    bits = jax.lax.bitcast_convert_type(x, jnp.int32) & _HIGH_HALF
    return jax.lax.bitcast_convert_type(bits, jnp.float32)


def split_dot(p, weights):
    """p [rows, slots] float32 @ small-integer weights in three bfloat16 pieces hi + mid + lo == p
    exactly (8 significant bits each; the float32 subtractions are exact): float32 accuracy on
    bf16 tensor cores (the weights are exact in bf16)."""
    hi = _high_bf16_bits(p)
    rest = p - hi
    mid = _high_bf16_bits(rest)
    pieces = (hi, mid, rest - mid)
    dot = lambda a: jnp.dot(a.astype(jnp.bfloat16), weights, preferred_element_type=jnp.float32)
    return dot(pieces[2]) + dot(pieces[1]) + dot(pieces[0])


def head_sum(x, plan: Plan):
    """[rows, ...] -> [qb, ...]: sum over the gp heads of each query."""
    return x.reshape(plan.qb, plan.gp, *x.shape[1:]).sum(axis=1)


def overlap_weights(plan: Plan):
    """(weights [slots, blocks] bfloat16 of a tile's slots on its own blocks, [spill] weights
    [1, slots] on the next tile's first blocks)."""
    kb, nb = plan.slots, plan.blocks
    slot_iota = jax.lax.broadcasted_iota(jnp.int32, (kb, nb), 0)
    own = overlap(slot_iota, jax.lax.broadcasted_iota(jnp.int32, (kb, nb), 1), plan)
    slot_row = jax.lax.broadcasted_iota(jnp.int32, (1, kb), 1)
    return own.astype(jnp.bfloat16), [overlap(slot_row, nb + c, plan)
                                      for c in range(plan.spill)]


def tile_block_scores(p, weights, carried, plan: Plan):
    """Probabilities p [rows, slots] of one tile's compressed slots -> (scores [qb, blocks] of
    its selection blocks, group heads summed, with the `carried` spill of the previous tile
    added; the spill onto the next tile's first blocks, one [qb] per spill block)."""
    own, spill_w = weights
    blocks = head_sum(split_dot(p, own), plan)
    col = jax.lax.broadcasted_iota(jnp.int32, (1, plan.blocks), 1)
    for c, spilled in enumerate(carried):
        blocks = blocks + jnp.where(col == c, spilled[:, None], 0.0)
    return blocks, tuple(head_sum((p * w).sum(axis=1), plan) for w in spill_w)


def _worst(keys, ids):
    """[qb, 1] each: the entry a better candidate replaces (lowest key, then highest id)."""
    low = keys.min(axis=1, keepdims=True)
    return low, jnp.where(keys == low, ids, -_EMPTY_ID).max(axis=1, keepdims=True)


def _beats(key, ident, low, low_id):
    return (key > KEY_INVISIBLE) & ((key > low) | ((key == low) & (ident < low_id)))


def merge_top_n(keys, ids, cand, cand_ids):
    """Running top-n (rank keys and ids [qb, width]) updated with one tile's candidates (keys
    [qb, blocks], ids [1, blocks]): insert each row's best remaining candidate while some row
    still has one that beats its worst."""
    low, low_id = _worst(keys, ids)
    rounds = _beats(cand, cand_ids, low, low_id).astype(jnp.int32).sum(axis=1).max()

    def insert(_, carry):
        keys, ids, cand = carry
        best = cand.max(axis=1, keepdims=True)
        best_id = jnp.where(cand == best, cand_ids, _EMPTY_ID).min(axis=1, keepdims=True)
        low, low_id = _worst(keys, ids)
        slot = _beats(best, best_id, low, low_id) & (ids == low_id)
        return (jnp.where(slot, best, keys), jnp.where(slot, best_id, ids),
                jnp.where(cand_ids == best_id, KEY_INVISIBLE, cand))

    keys, ids, _ = jax.lax.fori_loop(0, rounds, insert, (keys, ids, cand))
    return keys, ids


def no_spill(plan: Plan):
    return tuple(jnp.zeros((plan.qb,), jnp.float32) for _ in range(plan.spill))


def tile_rank_keys(scores, block_id, current, plan: Plan):
    """nsa_jax.selection_rule.rank_keys for a tile of blocks: scores [qb, blocks] of the blocks
    `block_id` [1, blocks] for queries whose own block is `current` ([qb, 1] or a scalar) ->
    int32 keys. rank_keys numbers its columns from block 0; a tile starts anywhere, so the
    forced and visible classes are taken from block_id here and the score order from the rule."""
    visible = block_id <= current
    forced = visible & ((block_id < plan.num_init_blocks)
                        | (block_id > current - plan.num_local_blocks))
    ranked = jnp.where(jnp.isnan(scores) | (scores == -jnp.inf), KEY_NON_FINITE_LOW,
                       selection_rule.ordered_bits(scores))
    return jnp.where(forced, KEY_FORCED, jnp.where(visible, ranked, KEY_INVISIBLE))


def empty_top_n(plan: Plan):
    """(keys, ids) [qb, width] holding nothing yet. Columns >= n are locked at (KEY_FORCED,
    negative id): never the worst entry, never replaced."""
    wcol = jax.lax.broadcasted_iota(jnp.int32, (plan.qb, plan.width), 1)
    real = wcol < plan.num_selected
    return (jnp.where(real, KEY_INVISIBLE, KEY_FORCED),
            jnp.where(real, _EMPTY_ID + wcol, -2 - wcol))


def chosen_ids(keys, ids):
    """The running top-n -> block ids, -1 where nothing was chosen (columns >= n: junk)."""
    return jnp.where(keys > KEY_INVISIBLE, ids, -1)


def _select_kernel(leaders_ref, num_docs_ref, doc_ref, offset_ref, start_ref, q_ref, k_ref,
                   lse_ref, out_ref, *, plan: Plan):
    qb, rows, nb, kb = plan.qb, plan.rows, plan.blocks, plan.slots
    q = q_ref[...].reshape(rows, q_ref.shape[-1])
    lse = lse_ref[...][:, None]
    # -inf: the row sees nothing (or is a padded head); inf or NaN: broken inputs, which add
    # nothing, as in ops.block_scores.
    usable = jnp.isfinite(lse)
    lse = jnp.where(usable, lse, 0.0)
    doc_q = doc_ref[...]
    first_query = pl.program_id(0) * qb
    lowest, highest = row_bounds(doc_q, first_query, qb, plan.gp, plan.compress_block)
    current = ((first_query + jax.lax.broadcasted_iota(jnp.int32, (qb,), 0) - doc_q)
               // plan.select_block)
    weights = overlap_weights(plan)
    col = jax.lax.broadcasted_iota(jnp.int32, (1, nb), 1)

    def tile_scores(first_slot, carried):
        k = k_ref[pl.ds(first_slot, kb), :]
        mask = slot_visible(start_ref[pl.ds(first_slot, kb)], lowest, highest) & usable
        p = jnp.where(mask, jnp.exp(common.scores(q, k, plan.scale) - lse), 0.0)
        return tile_block_scores(p, weights, carried, plan)

    def document(u, state):
        leader = leaders_ref[u]
        in_doc = doc_q == doc_ref[leader]
        last_tile = jnp.where(in_doc, current, 0).max() // nb

        def tile(i, carry):
            keys, ids, carried = carry
            first_block = i * nb
            blocks, carried = tile_scores(offset_ref[leader] + first_block * plan.ratio,
                                          carried)
            block_id = first_block + col
            cand = tile_rank_keys(blocks, block_id, current[:, None], plan)
            cand = jnp.where(in_doc[:, None], cand, KEY_INVISIBLE)
            return (*merge_top_n(keys, ids, cand, block_id), carried)

        return jax.lax.fori_loop(0, last_tile + 1, tile, (*state, no_spill(plan)))[:2]

    keys, ids = jax.lax.fori_loop(0, num_docs_ref[...], document, empty_top_n(plan))
    out_ref[...] = chosen_ids(keys, ids)


def _select_call(plan: Plan, leaders, num_docs, doc, offset, start, q5, k, lse):
    """leaders [B, Tq/qb, qb], num_docs [B, Tq/qb], doc/offset [B, Tq], start [B, Ts],
    q5 [B, Tq, H, gp, Dk], k [B, Ts, H, Dk], lse [B, H, Tq * gp] -> [B, Tq, H, width] int32
    (chosen block ids per query, unsorted; -1 = none; columns >= n hold junk)."""
    b, tq, h, gp, dk = q5.shape
    qb, slots = plan.qb, k.shape[1]
    tile = lambda c, bh: (bh // h, c)
    return pl.pallas_call(
        functools.partial(_select_kernel, plan=plan),
        grid=(tq // qb, b * h),
        in_specs=[pl.BlockSpec((None, None, qb), lambda c, bh: (bh // h, c, 0)),
                  pl.BlockSpec((None, None), tile), pl.BlockSpec((None, qb), tile),
                  pl.BlockSpec((None, qb), tile),
                  pl.BlockSpec((None, slots), lambda c, bh: (bh // h, 0)),
                  pl.BlockSpec((None, qb, None, gp, dk), lambda c, bh: (bh // h, c, bh % h, 0,
                                                                        0)),
                  pl.BlockSpec((None, slots, None, dk), lambda c, bh: (bh // h, 0, bh % h, 0)),
                  pl.BlockSpec((None, None, qb * gp), lambda c, bh: (bh // h, bh % h, c))],
        out_specs=pl.BlockSpec((None, qb, None, plan.width), lambda c, bh: (bh // h, c,
                                                                              bh % h, 0)),
        out_shape=jax.ShapeDtypeStruct((b, tq, h, plan.width), jnp.int32),
        compiler_params=common.compiler_params(plan.num_warps, plan.num_stages),
        interpret=plan.interpret,
        name="nsa_select_topn",
    )(leaders, num_docs, doc, offset, start, q5, k, lse)


def _document_leaders(doc, qb: int):
    """Per query tile: the in-tile offsets of the first query of each document present (leading
    entries of [B, Tq/qb, qb]) and how many there are [B, Tq/qb]."""
    b, tq = doc.shape
    tiles = doc.reshape(b, tq // qb, qb)
    first = jnp.arange(qb) == 0
    leads = first | (tiles != jnp.concatenate([tiles[..., :1], tiles[..., :-1]], axis=-1))
    order = jnp.argsort(~leads, axis=-1, stable=True).astype(jnp.int32)
    return order, leads.sum(axis=-1, dtype=jnp.int32)


def select_blocks(q, k_cmp, lse, cfg: NSAConfig, *, segment_ids=None, scale=None,
                  interpret=False, tiling: Tiling | None = None):
    """Top-n selection blocks per query and KV head, [B, T, Hkv, n] int32: the fused
    ops.select_blocks(ops.block_scores(q, k_cmp, lse, ...)) of nsa_jax.ops ("select"; nsa_spec.md
    §2.2-2.3): block ids counted from the query's document start, blocks after the query's own
    excluded, the first num_init_blocks and the num_local_blocks ending at the query's block
    forced, the rest ranked by nsa_jax.selection_rule (non-finite scores included), ties to the
    lower id, ascending, -1 padding last. No gradient.

    q [B, T, Hq, Dk], k_cmp [B, Tc, Hkv, Dk] (one dtype of common.DTYPES, slots laid out as
    nsa_jax.layout says), lse [B, T, Hq] (the compressed branch's, -inf for rows that see
    nothing), segment_ids [B, T] int or None; scale defaults to 1/sqrt(Dk). Raises ValueError for
    shapes or dtypes the kernel does not take.
    """
    check_compressed_keys(q, k_cmp, cfg, segment_ids, "q, k_cmp")
    common.check_dtypes("q, k_cmp", (q, k_cmp))
    b, t, hq, dk = q.shape
    if lse.shape != (b, t, hq):
        raise ValueError(f"lse must be [B, T, Hq] = [{b}, {t}, {hq}]; got {lse.shape}")
    tiling = tiling or Tiling()
    q, k_cmp, lse = (jax.lax.stop_gradient(x) for x in (q, k_cmp, lse))
    tc, hkv = k_cmp.shape[1:3]
    g, gp = hq // hkv, common.pow2(hq // hkv)
    qb = query_positions_per_tile(gp, tiling.rows_per_program)
    ratio = cfg.select_block // cfg.compress_stride
    plan = Plan.for_config(
        cfg, qb=qb, gp=gp, slots=max(tiling.key_block, common.pow2(ratio)),
        scale=float(dk ** -0.5 if scale is None else scale), num_warps=tiling.num_warps,
        num_stages=tiling.num_stages, interpret=interpret)
    blocks, slots = plan.blocks, plan.slots
    tq = -(-t // qb) * qb
    doc = padded_documents(segment_ids, b, t, tq)
    start = layout.compressed_layout(segment_ids, b, t, cfg).start
    offset = first_slot_of_document(start, doc)
    # A document's tiles read up to this many slots past its first one.
    reach = -(-cfg.num_blocks(t) // blocks) * blocks * ratio + slots
    kp = common.pad_to(k_cmp, (None, tc + reach, None, common.pow2(dk)))
    startp = common.pad_to(start, (None, tc + reach), value=-1)
    rows = common.pad_to(lse.astype(jnp.float32).reshape(b, t, hkv, g), (None, tq, None, gp),
                         value=-jnp.inf)
    rows = rows.transpose(0, 2, 1, 3).reshape(b, hkv, tq * gp)
    chosen = _select_call(plan, *_document_leaders(doc, qb), doc, offset, startp,
                          group_queries(q, hkv, tq), kp, rows)
    return selection_rule.sorted_block_ids(chosen[:, :t, :, :cfg.num_selected])
