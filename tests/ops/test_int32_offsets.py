"""Block ids and offsets that overflow int32 (issue 20 item 2), on CPU with small arrays: huge
synthetic ids and positions go through every implementation of selected_attention (reference,
xla, the Triton kernels and the TPU kernels in interpret mode) and through the index helpers the
kernels build their tables with. An id past the query's own block counts as -1 everywhere."""
import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.experimental.pallas import tpu as pltpu

from nsa_jax import NSAConfig, layout, ops
from pallas_kernels.gpu.triton import compressed_attention as triton_compressed
from pallas_kernels.gpu.triton import selected_attention as triton_selected
from pallas_kernels.tpu import selected as tpu_selected
from tests.helpers.inputs import make_qkv, random_segments, rel_err

CFG = NSAConfig(compress_block=16, compress_stride=8, select_block=16, num_selected=2,
                num_init_blocks=1, num_local_blocks=1, window=16)
HUGE = (2**27, 2**27 + 1, 2**28 + 3, 2**30, 2**31 - 1, -(2**31), -5)


def triton_kernels(q, k, v, indices, cfg, **kw):
    return triton_selected.selected_attention(q, k, v, indices, cfg, interpret=True, **kw)


def tpu_kernels(q, k, v, indices, cfg, **kw):
    return tpu_selected.selected_attention(q, k, v, indices, cfg, interpret=pltpu.InterpretParams(),
                                           **kw)


def ops_implementation(name):
    return functools.partial(ops.selected_attention, implementation=name)


IMPLEMENTATIONS = {"reference": ops_implementation("reference"), "xla": ops_implementation("xla"),
                   "triton": triton_kernels, "tpu": tpu_kernels}


@pytest.mark.parametrize("name", sorted(IMPLEMENTATIONS))
def test_issue_case_block_2_to_the_27(name):
    """T=4, D=4, one head, indices [0, 2**27], l'=16: 2**27 * 16 wraps to -2**31 in int32; the
    answer is attention over block 0 alone (keys 0..t)."""
    q, k, v, _ = make_qkv(jax.random.PRNGKey(0), 1, 4, 1, 1, 4)
    indices = jnp.broadcast_to(jnp.array([0, 2**27], jnp.int32), (1, 4, 1, 2))
    got = IMPLEMENTATIONS[name](q, k, v, indices, CFG)
    logits = jnp.einsum("td,sd->ts", q[0, :, 0], k[0, :, 0]) / 2.0
    causal = jnp.tril(jnp.ones((4, 4), bool))
    want = jax.nn.softmax(jnp.where(causal, logits, -jnp.inf), axis=-1) @ v[0, :, 0]
    np.testing.assert_allclose(got[0, :, 0], want, rtol=1e-5, atol=1e-6)


def _past_own_block_to_minus_one(indices, segment_ids, t, cfg):
    local = layout.document_positions(segment_ids, indices.shape[0], t)
    own = (local // cfg.select_block)[:, :, None, None]
    return jnp.where((indices >= 0) & (indices <= own), indices, -1)


@pytest.mark.parametrize("name", sorted(IMPLEMENTATIONS))
def test_huge_ids_count_as_unused(name, key):
    """Random ids with huge, negative and just-out-of-range ones mixed in, packed documents:
    output and gradients equal the oracle's on the same ids with those replaced by -1."""
    b, t, hq, hkv, d = 2, 37, 4, 2, 8
    cfg = NSAConfig(compress_block=8, compress_stride=4, select_block=8, num_selected=5,
                    num_init_blocks=1, num_local_blocks=2, window=16)
    k1, k2, k3, k4, k5 = jax.random.split(key, 5)
    q, k, v, _ = make_qkv(k1, b, t, hq, hkv, d)
    seg = random_segments(k2, b, t)
    ids = jax.random.randint(k3, (b, t, hkv, cfg.num_selected), -1, cfg.num_blocks(t) + 2)
    huge = jnp.asarray(HUGE, jnp.int32)[jax.random.randint(k4, ids.shape, 0, len(HUGE))]
    ids = jnp.where(jax.random.bernoulli(k5, 0.4, ids.shape), huge, ids).astype(jnp.int32)
    cotangent = jax.random.normal(k1, (b, t, hq, d))

    def value_and_grads(fn, indices):
        out, vjp = jax.vjp(lambda *x: fn(*x, indices, cfg, segment_ids=seg, scale=0.5), q, k, v)
        return out, vjp(cotangent)

    got = jax.jit(functools.partial(value_and_grads, IMPLEMENTATIONS[name]))(ids)
    want = jax.jit(functools.partial(value_and_grads, IMPLEMENTATIONS["reference"]))(
        _past_own_block_to_minus_one(ids, seg, t, cfg))
    for x, y in zip(jax.tree.leaves(got), jax.tree.leaves(want)):
        assert rel_err(x, y) < 1e-5


def test_block_starts_never_overflow():
    """Positions near 2**31 and ids up to 2**31 - 1: starts are exact (checked in int64)."""
    pos = jnp.array([2**31 - 2, 2**31 - 2, 2**30 + 5, 40], jnp.int32)[:, None]
    doc = jnp.array([2**31 - 100, 0, 2**30, 0], jnp.int32)[:, None]
    ids = jnp.array([[0, 6, 7, 2**27, 2**31 - 1, -1]] * 4, jnp.int32)
    got = np.asarray(layout.selected_block_starts(ids, pos[:, 0], doc[:, 0], 16))
    p, s, j = (np.asarray(x, np.int64) for x in (pos, doc, ids))
    start = s + j * 16
    want = np.where((j >= 0) & (start <= p), start, -1)
    np.testing.assert_array_equal(got, want)
    assert (got <= p).all()


def test_query_tile_union_at_starts_near_2_to_the_30():
    """The Triton backward's per-tile union of (block start, query) pairs: starts * 16 would
    overflow int32 here."""
    rng = np.random.default_rng(0)
    qb, n = 16, 3
    base = 2**30 + rng.integers(0, 64, (1, 2 * qb, 1, n)) * 16
    starts = np.where(rng.random(base.shape) < 0.2, -1, base).astype(np.int32)
    union, bits, count = (np.asarray(x) for x in
                          triton_selected.query_tile_union(jnp.asarray(starts), qb))
    for tile in range(2):
        rows = starts[0, tile * qb:(tile + 1) * qb, 0]
        want = {s: sum(1 << r for r in range(qb) if s in rows[r]) for s in set(rows.ravel())
                if s >= 0}
        c = count[0, 0, tile]
        assert union[0, 0, tile, :c].tolist() == sorted(want)
        assert bits[0, 0, tile, :c].tolist() == [want[s] for s in sorted(want)]


@pytest.mark.parametrize("make_rows", [
    lambda q, k: triton_compressed.group_queries(q, k.shape[2], q.shape[1]),
    lambda q, k: triton_selected.selected_attention(q, k, k, jnp.zeros(q.shape[:2] + (1, 2),
                                                                       jnp.int32), CFG),
    lambda q, k: tpu_selected.selected_attention(q, k, k, jnp.zeros(q.shape[:2] + (1, 2),
                                                                    jnp.int32), CFG),
])
def test_kernels_reject_more_rows_than_int32_indexes(make_rows):
    """T * (heads per KV group) query rows >= 2**31: a ValueError at trace time, not a wrapped
    row index (shapes only: nothing is allocated)."""
    t = 2**27
    q = jax.ShapeDtypeStruct((1, t, 16, 16), jnp.bfloat16)
    k = jax.ShapeDtypeStruct((1, t, 1, 16), jnp.bfloat16)
    with pytest.raises(ValueError, match=r"2\*\*31"):
        jax.eval_shape(make_rows, q, k)
