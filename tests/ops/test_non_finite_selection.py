"""Selection with non-finite block scores (issue 20 item 1): every implementation of
ops.select_blocks picks what nsa_jax.selection_rule.select_top_n picks, and the fused and decoding
selections agree with each other on inputs that hold inf or NaN.

The rule: forced blocks always, +inf above every finite score, -inf and NaN below every finite
score but still selectable, ties to the lower block id."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from nsa_jax import NSAConfig, layout, ops, selection_rule
from nsa_jax.ops import reference, selection
from tests.helpers.inputs import random_segments
from tests.helpers.selection import ISSUE_CASES, ISSUE_CFG, injected_scores, issue_scores

CFG = ISSUE_CFG
IMPLEMENTATIONS = ("reference", "xla", "pallas", None)


@pytest.mark.parametrize("implementation", IMPLEMENTATIONS)
@pytest.mark.parametrize("case", sorted(ISSUE_CASES))
def test_issue_cases(case, implementation):
    t, values, want = ISSUE_CASES[case]
    scores = issue_scores(values)
    got = ops.select_blocks(scores, CFG, implementation=implementation)
    assert np.asarray(got)[0, t, 0].tolist() == want
    np.testing.assert_array_equal(got, selection_rule.select_top_n(
        scores, jnp.arange(80)[None, :, None], CFG))


@pytest.mark.parametrize("packed", [False, True])
def test_random_non_finite_scores_follow_the_rule(key, packed):
    b, t, hkv = 2, 203, 3
    rng = np.random.default_rng(int(key[-1]))
    scores = jnp.asarray(injected_scores(rng, (b, t, hkv, CFG.num_blocks(t))))
    seg = random_segments(key, b, t) if packed else None
    local = layout.document_positions(seg, b, t)
    want = selection_rule.select_top_n(scores, local[..., None], CFG)
    for implementation in IMPLEMENTATIONS:
        got = ops.select_blocks(scores, CFG, segment_ids=seg, implementation=implementation)
        np.testing.assert_array_equal(got, want, err_msg=str(implementation))


def test_one_rule_everywhere():
    """No implementation keeps a top-n of its own: the helpers that did are gone."""
    for name in ("candidate_scores", "finalize_indices", "pad_blocks_to", "top_n"):
        assert not hasattr(selection, name), name
    assert not hasattr(layout, "sorted_block_ids")
    assert not hasattr(reference, "candidate_scores")


def _broken_inputs(key, t, hq, hkv, d):
    """q, k_cmp with one query row of +inf, one of NaN and one compressed key of NaN."""
    kq, kk = jax.random.split(key)
    q = jax.random.normal(kq, (1, t, hq, d))
    k_cmp = jax.random.normal(kk, (1, CFG.num_compressed(t), hkv, d))
    q = q.at[0, t - 1].set(jnp.inf).at[0, t // 2].set(jnp.nan)
    return q, k_cmp.at[0, 3, 0].set(jnp.nan)


def test_fused_select_agrees_on_non_finite_inputs(key):
    t, hq, hkv, d = 80, 4, 2, 16
    q, k_cmp = _broken_inputs(key, t, hq, hkv, d)
    _, lse = ops.compressed_attention(q, k_cmp, k_cmp, CFG, implementation="reference")
    results = {impl: selection.select(q, k_cmp, lse, CFG, scale=0.25, implementation=impl)
               for impl in ("reference", "xla", "pallas")}
    scores = ops.block_scores(q, k_cmp, lse, CFG, scale=0.25, implementation="reference")
    want = selection_rule.select_top_n(scores, jnp.arange(t)[None, :, None], CFG)
    for impl, got in results.items():
        np.testing.assert_array_equal(got, want, err_msg=impl)


def test_decode_selection_agrees_on_non_finite_caches(key):
    """Decoding's top-n (reference, xla, the Triton kernel in interpret mode) on caches holding
    NaN and inf: one rule, one answer."""
    s, hq, hkv, d = 128, 4, 2, 16
    cfg = NSAConfig(compress_block=16, compress_stride=8, select_block=16, num_selected=5,
                    num_init_blocks=1, num_local_blocks=2, window=32)
    keys = jax.random.split(key, 4)
    q = jax.random.normal(keys[0], (3, hq, d)).at[1].set(jnp.nan)
    k, v = (jax.random.normal(kk, (3, s, hkv, d)) for kk in keys[1:3])
    k_cmp = jax.random.normal(keys[3], (3, 16, hkv, d)).at[2, 1].set(jnp.inf)
    gates = jnp.full((3, hq, 3), 0.5)
    position = jnp.array([127, 100, 90], jnp.int32)
    indices = {impl: ops.nsa_decode_attention(q, k, v, k_cmp, k_cmp, gates, position, cfg,
                                              implementation=impl, return_aux=True)[1]["indices"]
               for impl in ("reference", "xla", "pallas")}
    for impl, got in indices.items():
        np.testing.assert_array_equal(got, indices["reference"], err_msg=impl)
