"""Top-n block selection for one decoding query per sequence (Pallas, Triton lowering): the step
between the two decode kernels of nsa_decode.py, in one launch instead of a chain of XLA ops.

Grid (B, Hkv). A program walks the compressed logits of its KV group (written by
`compressed_partials`) in tiles of `slots` compressed tokens = slots / (l'/d) selection blocks,
normalises them with the compressed branch's LSE, maps them to blocks by overlap, sums the group's
heads and keeps a running top-n: the scoring and merging of the training kernel
(select_kernel.py) with a single query row. The ids come out unsorted; -1 = nothing chosen.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as pltriton

from nsa_jax.config import NSAConfig
from pallas_kernels.gpu.nsa_decode import visible_compressed
from pallas_kernels.gpu.padding import pow2
from pallas_kernels.gpu.select_kernel import (SelectTiling, candidates, chosen_ids,
                                              empty_top_n, merge_top_n, no_spill,
                                              overlap_weights, tile_block_scores)


def _select_kernel(pos_ref, logits_ref, lse_ref, out_ref, *, tiling: SelectTiling, groups: int,
                   cfg: NSAConfig):
    t = pos_ref[...]
    visible = visible_compressed(t, cfg)
    lse = lse_ref[...][:, None]
    row = jax.lax.broadcasted_iota(jnp.int32, (tiling.gp, 1), 0)
    usable = (row < groups) & (lse > -jnp.inf)  # padded heads and empty rows add nothing
    lse = jnp.where(usable, lse, 0.0)
    current = t // tiling.select_block
    weights = overlap_weights(tiling)
    slot = jax.lax.broadcasted_iota(jnp.int32, (1, tiling.slots), 1)
    col = jax.lax.broadcasted_iota(jnp.int32, (1, tiling.blocks), 1)

    def tile(i, carry):
        vals, ids, carried = carry
        first = pl.multiple_of(i * tiling.slots, tiling.slots)
        mask = usable & (first + slot < visible)
        logits = logits_ref[:, pl.ds(first, tiling.slots)]
        p = jnp.where(mask, jnp.exp(jnp.where(mask, logits, 0.0) - lse), 0.0)
        blocks, carried = tile_block_scores(p, weights, carried, tiling)
        block_id = i * tiling.blocks + col
        return (*merge_top_n(vals, ids, candidates(blocks, block_id, current, tiling), block_id),
                carried)

    vals, ids, _ = jax.lax.fori_loop(0, current // tiling.blocks + 1, tile,
                                     (*empty_top_n(tiling), no_spill(tiling)))
    out_ref[...] = chosen_ids(vals, ids)[0]


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
    if gp != pow2(gp) or lse.shape != (b, hkv, gp) or position.shape != (b,):
        raise ValueError(f"logits [B, Hkv, Gp, C] with Gp a power of 2, lse [B, Hkv, Gp], "
                         f"position [B]; got {logits.shape}, {lse.shape}, {position.shape}")
    tiling = SelectTiling.for_config(cfg, qb=1, gp=gp, slots=slots, scale=1.0,
                                     num_warps=num_warps, num_stages=1, interpret=interpret)
    ids = pl.pallas_call(
        lambda *refs: _select_kernel(*refs, tiling=tiling, groups=groups, cfg=cfg),
        grid=(b, hkv),
        in_specs=[pl.BlockSpec((None,), lambda i, h: (i,)),
                  pl.BlockSpec((None, None, gp, c), lambda i, h: (i, h, 0, 0)),
                  pl.BlockSpec((None, None, gp), lambda i, h: (i, h, 0))],
        out_specs=pl.BlockSpec((None, None, tiling.width), lambda i, h: (i, h, 0)),
        out_shape=jax.ShapeDtypeStruct((b, hkv, tiling.width), jnp.int32),
        compiler_params=pltriton.CompilerParams(num_warps=num_warps, num_stages=1),
        interpret=interpret, name="nsa_decode_select",
    )(position, logits.astype(jnp.float32), lse.astype(jnp.float32))
    return ids[..., :cfg.num_selected]

