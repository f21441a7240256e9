"""Fused block scoring and top-n selection (Pallas, Triton lowering): no [T, Tc] or [T, NB] array
ever reaches HBM.

Grid (query tile, batch * KV head); a program holds `qb * gp` rows as in the compressed forward.
For each document present in its tile (almost always one) it walks that document's selection
blocks in tiles of `blocks` blocks. A tile loads the `blocks * r` compressed slots (r = l'/d) whose
first chunk lies in those blocks, recomputes their probabilities from the saved LSE, maps them to
blocks by overlap with one small matmul (weight = stride-d chunks shared; the chunks that run past
the tile are carried into the next tile's first blocks), sums the G heads and merges the tile's
candidates into a running top-n per query. Candidates are ordered by (score desc, block asc), the
order of lax.top_k, so the result is the oracle's set.
"""
from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as pltriton

from nsa_jax.config import NSAConfig
from pallas_kernels.gpu.compressed_fwd import NEG, row_bounds, scores, slot_visible
from pallas_kernels.gpu.padding import pow2

_EMPTY_ID = 1 << 30  # ids of the initial "nothing chosen yet" entries (score -inf)


@dataclasses.dataclass(frozen=True)
class SelectTiling:
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
                   num_warps: int, num_stages: int, interpret: bool) -> "SelectTiling":
        """The tiling of `slots` compressed slots per step (a power of 2 >= l'/d): as many whole
        selection blocks per step as fit, the rest derived from the NSA config."""
        ratio = cfg.select_block // cfg.compress_stride
        chunks = cfg.compress_block // cfg.compress_stride
        return cls(qb=qb, gp=gp, slots=slots, blocks=1 << ((slots // ratio).bit_length() - 1),
                   ratio=ratio, chunks=chunks, spill=-(-(chunks - 1) // ratio),
                   select_block=cfg.select_block, compress_block=cfg.compress_block,
                   num_selected=cfg.num_selected, width=pow2(cfg.num_selected),
                   num_init_blocks=cfg.num_init_blocks, num_local_blocks=cfg.num_local_blocks,
                   scale=scale, num_warps=num_warps, num_stages=num_stages, interpret=interpret)

    @property
    def rows(self) -> int:
        return self.qb * self.gp


def overlap(slot, block, tiling: SelectTiling):
    """Chunks shared by local slot `slot` (chunks [slot, slot + l/d)) and local block `block`
    (chunks [block * r, (block + 1) * r)); slots past the tile's own blocks count nothing."""
    r = tiling.ratio
    shared = (jnp.minimum(slot + tiling.chunks, (block + 1) * r) - jnp.maximum(slot, block * r))
    return jnp.where(slot < tiling.blocks * r, jnp.maximum(shared, 0), 0).astype(jnp.float32)


def split_dot(p, weights):
    """p [rows, slots] float32 @ small-integer weights in three bfloat16 pieces: float32 accuracy
    on bf16 tensor cores (the weights are exact in bf16)."""
    hi = p.astype(jnp.bfloat16)
    rest = p - hi.astype(jnp.float32)
    mid = rest.astype(jnp.bfloat16)
    lo = (rest - mid.astype(jnp.float32)).astype(jnp.bfloat16)
    dot = lambda a: jnp.dot(a, weights, preferred_element_type=jnp.float32)
    return dot(lo) + dot(mid) + dot(hi)


def head_sum(x, tiling: SelectTiling):
    """[rows, ...] -> [qb, ...]: sum over the gp heads of each query."""
    return x.reshape(tiling.qb, tiling.gp, *x.shape[1:]).sum(axis=1)


def overlap_weights(tiling: SelectTiling):
    """(weights [slots, blocks] bfloat16 of a tile's slots on its own blocks, [spill] weights
    [1, slots] on the next tile's first blocks)."""
    kb, nb = tiling.slots, tiling.blocks
    slot_iota = jax.lax.broadcasted_iota(jnp.int32, (kb, nb), 0)
    own = overlap(slot_iota, jax.lax.broadcasted_iota(jnp.int32, (kb, nb), 1), tiling)
    slot_row = jax.lax.broadcasted_iota(jnp.int32, (1, kb), 1)
    return own.astype(jnp.bfloat16), [overlap(slot_row, nb + c, tiling)
                                      for c in range(tiling.spill)]


def tile_block_scores(p, weights, carried, tiling: SelectTiling):
    """Probabilities p [rows, slots] of one tile's compressed slots -> (scores [qb, blocks] of
    its selection blocks, group heads summed, with the `carried` spill of the previous tile
    added; the spill onto the next tile's first blocks, one [qb] per spill block)."""
    own, spill_w = weights
    blocks = head_sum(split_dot(p, own), tiling)
    col = jax.lax.broadcasted_iota(jnp.int32, (1, tiling.blocks), 1)
    for c, spilled in enumerate(carried):
        blocks = blocks + jnp.where(col == c, spilled[:, None], 0.0)
    return blocks, tuple(head_sum((p * w).sum(axis=1), tiling) for w in spill_w)


def _worst(vals, ids):
    """[qb, 1] each: the entry a better candidate replaces (lowest score, then highest id)."""
    low = vals.min(axis=1, keepdims=True)
    return low, jnp.where(vals == low, ids, -_EMPTY_ID).max(axis=1, keepdims=True)


def _beats(value, ident, low, low_id):
    return (value > -jnp.inf) & ((value > low) | ((value == low) & (ident < low_id)))


def merge_top_n(vals, ids, cand, cand_ids):
    """Running top-n (vals/ids [qb, width]) updated with one tile's candidates [qb, blocks]: insert
    each row's best remaining candidate while some row still has one that beats its worst."""
    low, low_id = _worst(vals, ids)
    rounds = _beats(cand, cand_ids, low, low_id).astype(jnp.int32).sum(axis=1).max()

    def insert(_, carry):
        vals, ids, cand = carry
        best = cand.max(axis=1, keepdims=True)
        best_id = jnp.where(cand == best, cand_ids, _EMPTY_ID).min(axis=1, keepdims=True)
        low, low_id = _worst(vals, ids)
        slot = _beats(best, best_id, low, low_id) & (ids == low_id)
        return (jnp.where(slot, best, vals), jnp.where(slot, best_id, ids),
                jnp.where(cand_ids == best_id, -jnp.inf, cand))

    vals, ids, _ = jax.lax.fori_loop(0, rounds, insert, (vals, ids, cand))
    return vals, ids


def no_spill(tiling: SelectTiling):
    return tuple(jnp.zeros((tiling.qb,), jnp.float32) for _ in range(tiling.spill))


def candidates(scores, block_id, current, tiling: SelectTiling):
    """Block scores -> top-n candidates for queries in block `current`: the first
    num_init_blocks and the num_local_blocks ending at `current` forced (+inf), later blocks
    excluded (-inf)."""
    forced = (block_id < tiling.num_init_blocks) | (block_id > current - tiling.num_local_blocks)
    return jnp.where(block_id <= current, jnp.where(forced, jnp.inf, scores), -jnp.inf)


def empty_top_n(tiling: SelectTiling):
    """(vals, ids) [qb, width] holding nothing yet. Columns >= n are locked at (+inf, negative
    id): never the worst entry, never replaced."""
    wcol = jax.lax.broadcasted_iota(jnp.int32, (tiling.qb, tiling.width), 1)
    real = wcol < tiling.num_selected
    return jnp.where(real, -jnp.inf, jnp.inf), jnp.where(real, _EMPTY_ID + wcol, -2 - wcol)


def chosen_ids(vals, ids):
    """The running top-n -> block ids, -1 where nothing was chosen (columns >= n: junk)."""
    return jnp.where(vals > -jnp.inf, ids, -1)


def _select_kernel(leaders_ref, num_docs_ref, doc_ref, offset_ref, start_ref, q_ref, k_ref,
                   lse_ref, out_ref, *, tiling: SelectTiling):
    qb, rows, nb, kb = tiling.qb, tiling.rows, tiling.blocks, tiling.slots
    q = q_ref[...].reshape(rows, q_ref.shape[-1])
    lse = lse_ref[...][:, None]
    usable = lse > NEG  # -inf: the row sees nothing (or is a padded head)
    lse = jnp.where(usable, lse, 0.0)
    doc_q = doc_ref[...]
    first_query = pl.program_id(0) * qb
    lowest, highest = row_bounds(doc_q, first_query, qb, tiling.gp, tiling.compress_block)
    current = ((first_query + jax.lax.broadcasted_iota(jnp.int32, (qb,), 0) - doc_q)
               // tiling.select_block)
    weights = overlap_weights(tiling)
    col = jax.lax.broadcasted_iota(jnp.int32, (1, nb), 1)

    def tile_scores(first_slot, carried):
        k = k_ref[pl.ds(first_slot, kb), :]
        mask = slot_visible(start_ref[pl.ds(first_slot, kb)], lowest, highest) & usable
        p = jnp.where(mask, jnp.exp(scores(q, k, tiling.scale) - lse), 0.0)
        return tile_block_scores(p, weights, carried, tiling)

    def document(u, state):
        leader = leaders_ref[u]
        in_doc = doc_q == doc_ref[leader]
        last_tile = jnp.where(in_doc, current, 0).max() // nb

        def tile(i, carry):
            vals, ids, carried = carry
            first_block = i * nb
            blocks, carried = tile_scores(offset_ref[leader] + first_block * tiling.ratio,
                                          carried)
            block_id = first_block + col
            cand = candidates(blocks, block_id, current[:, None], tiling)
            cand = jnp.where(in_doc[:, None], cand, -jnp.inf)
            return (*merge_top_n(vals, ids, cand, block_id), carried)

        return jax.lax.fori_loop(0, last_tile + 1, tile, (*state, no_spill(tiling)))[:2]

    vals, ids = jax.lax.fori_loop(0, num_docs_ref[...], document, empty_top_n(tiling))
    out_ref[...] = chosen_ids(vals, ids)


def select_forward(tiling: SelectTiling, leaders, num_docs, doc, offset, start, q5, k, lse):
    """leaders [B, Tq/qb, qb], num_docs [B, Tq/qb], doc/offset [B, Tq], start [B, Ts],
    q5 [B, Tq, H, gp, Dk], k [B, Ts, H, Dk], lse [B, H, Tq * gp] -> [B, Tq, H, width] int32
    (chosen block ids per query, unsorted; -1 = none; columns >= n hold junk)."""
    b, tq, h, gp, dk = q5.shape
    qb, slots = tiling.qb, k.shape[1]
    tile = lambda c, bh: (bh // h, c)
    return pl.pallas_call(
        lambda *refs: _select_kernel(*refs, tiling=tiling),
        grid=(tq // qb, b * h),
        in_specs=[pl.BlockSpec((None, None, qb), lambda c, bh: (bh // h, c, 0)),
                  pl.BlockSpec((None, None), tile), pl.BlockSpec((None, qb), tile),
                  pl.BlockSpec((None, qb), tile),
                  pl.BlockSpec((None, slots), lambda c, bh: (bh // h, 0)),
                  pl.BlockSpec((None, qb, None, gp, dk), lambda c, bh: (bh // h, c, bh % h, 0,
                                                                        0)),
                  pl.BlockSpec((None, slots, None, dk), lambda c, bh: (bh // h, 0, bh % h, 0)),
                  pl.BlockSpec((None, None, qb * gp), lambda c, bh: (bh // h, bh % h, c))],
        out_specs=pl.BlockSpec((None, qb, None, tiling.width), lambda c, bh: (bh // h, c,
                                                                              bh % h, 0)),
        out_shape=jax.ShapeDtypeStruct((b, tq, h, tiling.width), jnp.int32),
        compiler_params=pltriton.CompilerParams(num_warps=tiling.num_warps,
                                                num_stages=tiling.num_stages),
        interpret=tiling.interpret,
        name="nsa_select_topn",
    )(leaders, num_docs, doc, offset, start, q5, k, lse)
