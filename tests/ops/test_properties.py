"""Properties of NSA that hold for any input: causality, document isolation, the overlap
weights, forced blocks and tie-breaking, bf16 robustness."""
from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from nsa_jax import NSAConfig, ops
from nsa_jax.ops.reference import overlap_weights
from tests.helpers.inputs import PAPER, SMALL, make_qkv, rel_err

IMPLS = ["xla", "reference"]


def _nsa(impl, cfg=SMALL, **kw):
    return jax.jit(lambda q, k, v, g: ops.nsa_attention(q, k, v, g, cfg, implementation=impl,
                                                        return_aux=True, **kw))


@pytest.mark.parametrize("impl", IMPLS)
def test_changing_the_future_never_changes_the_past(key, impl):
    k1, k2 = jax.random.split(key)
    args = make_qkv(k1, 1, 120, 4, 2, 8)
    cut = int(jax.random.randint(k2, (), 1, 119))
    noisy = tuple(x.at[:, cut + 1:].set(jax.random.normal(k2, x[:, cut + 1:].shape)) for x in args)
    f = _nsa(impl)
    (out, aux), (out2, aux2) = f(*args), f(*noisy)
    np.testing.assert_array_equal(out[:, :cut + 1], out2[:, :cut + 1])
    np.testing.assert_array_equal(aux["indices"][:, :cut + 1], aux2["indices"][:, :cut + 1])


@pytest.mark.parametrize("impl", IMPLS)
def test_packed_document_equals_document_alone(key, impl):
    sizes = (37, 50, 29)  # unaligned to l, d and l'
    q, k, v, g = make_qkv(key, 1, sum(sizes), 4, 2, 8)
    seg = jnp.repeat(jnp.array([7, 2, 7]), jnp.array(sizes), total_repeat_length=sum(sizes))[None]
    packed, aux = _nsa(impl, segment_ids=seg)(q, k, v, g)
    start = 0
    for size in sizes:
        part = slice(start, start + size)
        alone, aux_alone = _nsa(impl)(q[:, part], k[:, part], v[:, part], g[:, part])
        assert rel_err(packed[:, part], alone) <= 1e-5
        np.testing.assert_array_equal(aux["indices"][:, part], aux_alone["indices"])
        start += size


@pytest.mark.parametrize("impl", IMPLS)
def test_packed_documents_never_see_each_other(key, impl):
    k1, k2 = jax.random.split(key)
    args = make_qkv(k1, 2, 90, 4, 1, 8)
    seg = jnp.array([[0] * 41 + [1] * 49, [4] * 30 + [5] * 60])
    first_doc = jnp.arange(90)[None, :, None, None] < jnp.array([41, 30])[:, None, None, None]
    noisy = tuple(jnp.where(first_doc, jax.random.normal(k2, x.shape), x) for x in args)
    f = _nsa(impl, segment_ids=seg)
    out, out2 = f(*args)[0], f(*noisy)[0]
    for row, start in enumerate((41, 30)):
        np.testing.assert_array_equal(out[row, start:], out2[row, start:])


def test_overlap_weights_are_1_2_2_2_1_for_the_paper():
    table = np.asarray(overlap_weights(PAPER, 6))  # l=32, d=16, l'=64
    for j in range(1, 6):
        column = np.zeros(table.shape[0], int)
        column[4 * j - 1: 4 * j + 4] = [1, 2, 2, 2, 1]
        column = column[: table.shape[0]]
        np.testing.assert_array_equal(table[:, j], column)


@pytest.mark.parametrize("impl", IMPLS)
def test_block_scores_follow_overlap_weights(impl):
    # q = 0: every visible compressed token gets probability 1 / (number visible).
    t, g = 512, 2
    q = jnp.zeros((1, t, g, 16))
    k_cmp = jax.random.normal(jax.random.PRNGKey(0), (1, PAPER.num_compressed(t), 1, 16))
    _, lse = ops.compressed_attention(q, k_cmp, k_cmp, PAPER, implementation=impl)
    scores = np.asarray(ops.block_scores(q, k_cmp, lse, PAPER, implementation=impl))[0, :, 0]
    weights = np.asarray(overlap_weights(PAPER, PAPER.num_blocks(t)))
    for query in (30, 31, 47, 300, 511):
        visible = max((query - 31) // 16 + 1, 0)  # token i visible iff 16 i + 31 <= query
        expect = g * weights[:visible].sum(0) / max(visible, 1)  # an empty row scores 0
        np.testing.assert_allclose(scores[query], expect, rtol=1e-6)


@pytest.mark.parametrize("impl", IMPLS)
def test_forced_blocks_and_lower_index_tie_break(impl):
    cfg = NSAConfig(select_block=64, num_selected=5, num_init_blocks=1, num_local_blocks=2)
    t = 64 * 12
    scores = np.zeros((1, t, 1, 12), np.float32)
    query = 64 * 9 + 5  # in block 9: forced {0, 8, 9}
    scores[0, query, 0, [3, 5, 7]] = [0.5, 0.9, 0.5]  # 5, then a tie 3 / 7 -> 3
    scores[0, query, 0, 10:] = 100.0  # future blocks never win
    idx = np.asarray(ops.select_blocks(jnp.asarray(scores), cfg, implementation=impl))
    assert idx[0, query, 0].tolist() == [0, 3, 5, 8, 9]
    assert idx[0, query + 64, 0].tolist() == [0, 1, 2, 9, 10]  # all-zero scores: lowest indices
    # Forced blocks are not evicted by huge scores when n equals the forced count.
    tight = NSAConfig(select_block=64, num_selected=3, num_init_blocks=1, num_local_blocks=2)
    scores[0, query, 0, 4] = 1e30
    idx = np.asarray(ops.select_blocks(jnp.asarray(scores), tight, implementation=impl))
    assert idx[0, query, 0].tolist() == [0, 8, 9]
    # Early queries: fewer valid blocks than n -> -1 padding at the end.
    assert idx[0, 70, 0].tolist() == [0, 1, -1]


@pytest.mark.parametrize("impl", IMPLS)
def test_short_sequences(key, impl):
    # T < l (no compressed token at all), T < l' (one partial block), T = 1.
    for t in (1, 5, 15):
        q, k, v, g = make_qkv(key, 1, t, 2, 1, 8)
        out, aux = _nsa(impl)(q, k, v, g)
        assert out.shape == (1, t, 2, 8) and np.all(np.isfinite(out))
        assert np.all(np.asarray(aux["indices"])[..., 0] == 0)


def test_bfloat16_is_finite_and_close_to_float32(key):
    q, k, v, g = make_qkv(key, 1, 200, 4, 2, 16, dtype=jnp.bfloat16)
    out, aux = _nsa("xla")(q, k, v, g)
    assert out.dtype == jnp.bfloat16 and np.all(np.isfinite(np.asarray(out, np.float32)))
    f32 = tuple(x.astype(jnp.float32) for x in (q, k, v, g))
    want, want_aux = _nsa("reference")(*f32)
    got_idx, want_idx = np.asarray(aux["indices"]), np.asarray(want_aux["indices"])
    # bf16 rounding may flip a near-tie between blocks, never a clear winner: where the chosen
    # sets differ, the bf16 choice must score (in float32) as well as the float32 choice.
    k_cmp = ops.compress(f32[1], SMALL)
    scores = np.asarray(ops.block_scores(f32[0], k_cmp, want_aux["lse_cmp"], SMALL))
    def chosen_score(idx):
        picked = np.take_along_axis(scores, np.maximum(idx, 0), axis=-1)
        return np.where(idx >= 0, picked, 0.0).sum(-1)
    same = np.all(np.sort(got_idx, -1) == np.sort(want_idx, -1), axis=-1)  # [B, T, Hkv]
    assert same.mean() >= 0.98, f"bf16 changed the selection of {1 - same.mean():.1%} of rows"
    np.testing.assert_allclose(chosen_score(got_idx), chosen_score(want_idx), atol=2e-2)
    rows = np.repeat(same, q.shape[2] // k.shape[2], axis=-1)[..., None]  # [B, T, Hq, 1]
    out32 = np.where(rows, np.asarray(out, np.float32), 0.0)
    assert rel_err(out32, np.where(rows, np.asarray(want), 0.0)) <= 1e-2
