"""The Triton selection kernels' top-n (pallas_kernels.gpu.triton.select_blocks, shared by the
decode kernel) against nsa_jax.selection_rule, in interpret mode on CPU (issue 20 item 1).

The kernels rank blocks tile by tile, so they cannot call rank_keys on a whole row:
`tile_rank_keys` must equal it tile by tile, and the running top-n built on it must pick what
select_top_n picks, non-finite scores and ties included. The issue-16 replays check the fused
kernel's scores end to end: its selection is a valid top-n of the float64 scores.
"""
import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.experimental import pallas as pl

from nsa_jax import NSAConfig, ops, selection_rule
from pallas_kernels.gpu.triton import select_blocks as kernel
from tests.helpers.selection import ISSUE_CASES, ISSUE_CFG, injected_scores, issue_scores

CFG = ISSUE_CFG


def plan(cfg, qb, slots, interpret=True):
    return kernel.Plan.for_config(cfg, qb=qb, gp=1, slots=slots, scale=1.0, num_warps=4,
                                  num_stages=1, interpret=interpret)


def test_tile_rank_keys_equal_rank_keys_tile_by_tile():
    rng = np.random.default_rng(0)
    rows, num_blocks = 64, 48
    scores = jnp.asarray(injected_scores(rng, (rows, num_blocks)))
    local = jnp.asarray(rng.integers(0, num_blocks * CFG.select_block, rows), jnp.int32)
    want = selection_rule.rank_keys(scores, local, CFG)
    p = plan(CFG, qb=rows, slots=16)  # 8 blocks a tile
    current = (local // CFG.select_block)[:, None]
    got = [kernel.tile_rank_keys(scores[:, i:i + p.blocks], i + jnp.arange(p.blocks)[None],
                                 current, p) for i in range(0, num_blocks, p.blocks)]
    np.testing.assert_array_equal(jnp.concatenate(got, axis=1), want)


def _top_n_kernel(scores_ref, pos_ref, out_ref, *, plan):
    """The fused kernel's tile loop with the scores given instead of computed."""
    current = pos_ref[...] // plan.select_block
    col = jax.lax.broadcasted_iota(jnp.int32, (1, plan.blocks), 1)

    def tile(i, carry):
        block_id = i * plan.blocks + col
        cand = kernel.tile_rank_keys(scores_ref[:, pl.ds(i * plan.blocks, plan.blocks)],
                                     block_id, current[:, None], plan)
        return kernel.merge_top_n(*carry, cand, block_id)

    tiles = scores_ref.shape[1] // plan.blocks
    out_ref[...] = kernel.chosen_ids(*jax.lax.fori_loop(0, tiles, tile, kernel.empty_top_n(plan)))


def kernel_top_n(scores, local, cfg, qb=16, slots=16):
    """The Triton kernels' running top-n of scores [R, NB] (R a multiple of qb), interpret mode."""
    p = plan(cfg, qb, slots)
    rows, nb = scores.shape
    width = -(-nb // p.blocks) * p.blocks
    scores = jnp.pad(scores, ((0, 0), (0, width - nb)))  # columns past NB are invisible
    chosen = pl.pallas_call(
        functools.partial(_top_n_kernel, plan=p), grid=(rows // qb,),
        in_specs=[pl.BlockSpec((qb, width), lambda i: (i, 0)), pl.BlockSpec((qb,), lambda i: (i,))],
        out_specs=pl.BlockSpec((qb, p.width), lambda i: (i, 0)),
        out_shape=jax.ShapeDtypeStruct((rows, p.width), jnp.int32), interpret=True,
    )(scores, local)
    return selection_rule.sorted_block_ids(chosen[:, :cfg.num_selected])


@pytest.mark.parametrize("slots", [8, 32])  # 2 or 8 blocks a tile: merges across many tiles
def test_kernel_top_n_follows_the_rule_on_non_finite_scores(slots):
    rng = np.random.default_rng(slots)
    rows, num_blocks = 64, 21
    scores = jnp.asarray(injected_scores(rng, (rows, num_blocks)))
    local = jnp.asarray(rng.integers(0, num_blocks * CFG.select_block, rows), jnp.int32)
    got = kernel_top_n(scores, local, CFG, slots=slots)
    np.testing.assert_array_equal(got, selection_rule.select_top_n(scores, local, CFG))


def test_kernel_top_n_issue_cases():
    for name, (t, values, want) in ISSUE_CASES.items():
        scores = jnp.broadcast_to(issue_scores(values)[0, t, 0], (16, 10))
        got = kernel_top_n(scores, jnp.full((16,), t, jnp.int32), CFG)
        assert np.asarray(got)[0].tolist() == want, name


# --- issue 16's replays: the fused kernel's selection is a top-n of the float64 scores ----------

F32_ROUNDING = 1e-6  # score gap (relative to the row's largest score) float32 may not resolve


def float64_scores(q, k_cmp, lse, cfg, scale):
    """The oracle's block scores of q, k_cmp (as given, widened) and the float32 lse, in float64."""
    with jax.enable_x64(True):
        wide = lambda x: jnp.asarray(np.asarray(x, np.float64))
        return np.asarray(ops.block_scores(wide(q), wide(k_cmp), wide(lse), cfg, scale=scale,
                                           implementation="reference"))


def assert_valid_top_n(chosen, scores, cfg, tolerance=F32_ROUNDING):
    """chosen [B, T, H, n] (one document per row) is a top-n of float64 scores [B, T, H, NB]
    under the rule: the forced blocks, then free blocks no lower than any free block left out,
    up to `tolerance` times the row's largest score."""
    chosen = np.asarray(chosen)
    b, t, h, nb = scores.shape
    local = np.broadcast_to(np.arange(t)[None, :, None], (b, t, h))
    visible, forced = map(np.asarray, selection_rule.block_classes(nb, local, cfg))
    picked = (chosen[..., None] == np.arange(nb)).any(-2)
    assert (picked.sum(-1) == np.minimum(visible.sum(-1), cfg.num_selected)).all()
    assert not (picked & ~visible).any() and not (forced & ~picked).any()
    free = visible & ~forced
    lowest_in = np.where(free & picked, scores, np.inf).min(-1)
    highest_out = np.where(free & ~picked, scores, -np.inf).max(-1)
    gap = (highest_out - lowest_in) / np.maximum(scores.max(-1), 1e-30)
    bad = np.argwhere(gap > tolerance)
    assert bad.size == 0, f"{len(bad)} rows chose a lower block, e.g. (b, t, h) {bad[:3].tolist()}"


@pytest.mark.parametrize("hyper,t", [((16, 4, 8, 5), 100), ((8, 4, 8, 6), 128)])
def test_issue16_replays_are_valid_top_n(hyper, t, key):
    """Hq=4, Hkv=2, D=16, float32: before the bit-mask split, 1-3 rows of each chose a block
    scored up to 2e-3 lower than one left out (CPU interpret mode)."""
    l, d, lp, n = hyper
    cfg = NSAConfig(compress_block=l, compress_stride=d, select_block=lp, num_selected=n,
                    num_init_blocks=1, num_local_blocks=2)
    kq, kk = jax.random.split(key)
    q = jax.random.normal(kq, (1, t, 4, 16), jnp.float32)
    k = jax.random.normal(kk, (1, t, 2, 16), jnp.float32)
    k_cmp = ops.compress(k, cfg, implementation="reference")
    scale = 0.25
    _, lse = ops.compressed_attention(q, k_cmp, k_cmp, cfg, scale=scale,
                                      implementation="reference")
    chosen = kernel.select_blocks(q, k_cmp, lse, cfg, scale=scale, interpret=True)
    assert_valid_top_n(chosen, float64_scores(q, k_cmp, lse, cfg, scale), cfg)
