"""The dispatch table's "hopper" cells: with implementation="pallas" on a Hopper GPU the ops run
the Mosaic GPU kernels through their ops-signature entry points. Here each cell's target is chosen
as on Hopper and run in Mosaic GPU interpret mode on CPU (race detection on), against the oracle:
this checks the wiring (layouts, ranges, query chunks, the top-n) that the kernel tests do not."""
from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from nsa_jax import layout, ops
from nsa_jax.ops import dispatch
from pallas_kernels.gpu.mosaic import common
from tests.helpers.inputs import SMALL, random_segments, rel_err


def _hopper(op, *args, **kwargs):
    """(target, output) of op's "pallas" cell on Hopper, run in interpret mode."""
    target = dispatch.choose(op, "pallas", args, kwargs, on="hopper")
    *arrays, cfg = args
    fn = jax.jit(lambda *a: dispatch.load(target)(*a, cfg, **kwargs, interpret=True))
    with common.abstract_hopper():
        out = fn(*arrays)
    assert not common.races_found()
    return target, out


def _inputs(key, packed, t=150, hq=4, hkv=2, d=64):
    keys = jax.random.split(key, 4)
    q, k, v = (jax.random.normal(keys[i], (1, t, h, d), jnp.bfloat16)
               for i, h in enumerate((hq, hkv, hkv)))
    segments = random_segments(keys[3], 1, t) if packed else None
    return q, k, v, segments


@pytest.mark.parametrize("packed", [False, True])
def test_compressed_and_window_cells_run_the_range_kernels(key, packed):
    q, k, v, segments = _inputs(key, packed)
    common_kw = dict(segment_ids=segments, scale=q.shape[-1] ** -0.5)
    k_cmp = ops.compress(k, SMALL, segment_ids=segments)
    v_cmp = ops.compress(v, SMALL, segment_ids=segments)
    target, (o, lse) = _hopper("compressed_attention", q, k_cmp, v_cmp, SMALL, **common_kw)
    assert target.startswith("pallas_kernels.gpu.mosaic.range_attention")
    o_ref, lse_ref = ops.compressed_attention(q, k_cmp, v_cmp, SMALL, segment_ids=segments,
                                              implementation="reference")
    assert rel_err(o, o_ref) < 3e-2 and rel_err(lse, lse_ref) < 1e-5
    # Unpacked rows go to cuDNN on Hopper; packed ones to the Mosaic window.
    if packed:
        target, o = _hopper("window_attention", q, k, v, SMALL, **common_kw)
        assert target.startswith("pallas_kernels.gpu.mosaic.range_attention")
        o_ref = ops.window_attention(q, k, v, SMALL, segment_ids=segments,
                                     implementation="reference")
        assert rel_err(o, o_ref) < 3e-2


def test_select_cell_runs_block_scores_and_the_top_n(key):
    q, k, _, segments = _inputs(key, packed=True, t=200)
    k_cmp = ops.compress(k, SMALL, segment_ids=segments)
    v_cmp = ops.compress(k, SMALL, segment_ids=segments)
    _, lse = ops.compressed_attention(q, k_cmp, v_cmp, SMALL, segment_ids=segments,
                                      implementation="reference")
    kw = dict(segment_ids=segments, scale=q.shape[-1] ** -0.5)
    target, ids = _hopper("select", q, k_cmp, lse, SMALL, **kw)
    assert target.startswith("pallas_kernels.gpu.mosaic.block_scores")
    scores = ops.block_scores(q, k_cmp, lse, SMALL, segment_ids=segments,
                              implementation="reference")
    want = ops.select_blocks(scores, SMALL, segment_ids=segments, implementation="reference")
    same = np.all(np.asarray(ids) == np.asarray(want), axis=-1)
    # bf16 inputs: a near-tie may flip, never a clearly worse block.
    assert same.mean() > 0.98
    s = np.asarray(scores)
    for b, t, h in zip(*np.nonzero(~same)):
        got, exp = (set(x[b, t, h][x[b, t, h] >= 0].tolist()) for x in (np.asarray(ids), want))
        assert abs(s[b, t, h, sorted(got - exp)].sum() - s[b, t, h, sorted(exp - got)].sum()) \
            <= 1e-5 * s[b, t, h].max()


@pytest.mark.parametrize("packed", [False, True])
def test_selected_cell_runs_the_mosaic_kernels(key, packed):
    """Indices from the real selection path (the oracle's top-n), G = 2, float16 (which the Triton
    kernel does not take): the Hopper cell picks the Mosaic kernels and matches the oracle."""
    q, k, v, segments = _inputs(key, packed, t=96)
    q, k, v = (x.astype(jnp.float16) for x in (q, k, v))
    k_cmp = ops.compress(k, SMALL, segment_ids=segments)
    v_cmp = ops.compress(v, SMALL, segment_ids=segments)
    _, lse = ops.compressed_attention(q, k_cmp, v_cmp, SMALL, segment_ids=segments,
                                      implementation="reference")
    scores = ops.block_scores(q, k_cmp, lse, SMALL, segment_ids=segments,
                              implementation="reference")
    indices = ops.select_blocks(scores, SMALL, segment_ids=segments, implementation="reference")
    kw = dict(segment_ids=segments, scale=q.shape[-1] ** -0.5)
    target, o = _hopper("selected_attention", q, k, v, indices, SMALL, **kw)
    assert target.startswith("pallas_kernels.gpu.mosaic.selected_attention")
    o_ref = ops.selected_attention(q, k, v, indices, SMALL, segment_ids=segments,
                                   implementation="reference")
    assert rel_err(o, o_ref) < 5e-3
