"""Layers: RoPE, documents, compressors, the compressed-key RoPE convention, gates, dense baselines,
per-branch K/V routing, config validation."""
import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from nsa_jax import ops
from nsa_jax.config import ModelConfig, NSAConfig
from nsa_jax.layers import (DenseAttention, LinearCompressor, MeanCompressor, MLPCompressor,
                            NSAAttention, apply_rope, document_positions,
                            same_document_mask)
from nsa_jax.layers.projections import split_heads
from tests.helpers.models import TINY_NSA, tiny_model_config

PACKED_SEGMENTS = jnp.array([[4] * 9 + [7] * 13 + [4] * 2, [1] * 24])  # 9 + 13 + 2 | one document


def _normal(key, shape):
    return jax.random.normal(jax.random.key(key), shape, jnp.float32)


def test_rope_scores_depend_on_offset_only():
    q, k = _normal(0, (1, 1, 1, 16)), _normal(1, (1, 1, 1, 16))
    score = lambda pq, pk: jnp.sum(apply_rope(q, jnp.array([[pq]]), 1e4)
                                   * apply_rope(k, jnp.array([[pk]]), 1e4))
    np.testing.assert_allclose(score(9, 4), score(105, 100), rtol=1e-4)
    assert abs(score(9, 4) - score(9, 5)) > 1e-3


def test_documents_are_runs_of_equal_ids():
    seg = jnp.array([[5, 5, 7, 7, 7, 5]])
    np.testing.assert_array_equal(document_positions(seg, 1, 6), [[0, 1, 0, 1, 2, 0]])
    doc = np.array([0, 0, 1, 1, 1, 2])
    np.testing.assert_array_equal(same_document_mask(seg)[0, 0], doc[:, None] == doc[None, :])
    np.testing.assert_array_equal(document_positions(None, 2, 3), [[0, 1, 2]] * 2)


@pytest.mark.parametrize("segment_ids", [None, PACKED_SEGMENTS])
def test_linear_compressor_starts_as_mean_pooling(segment_ids):
    cfg = tiny_model_config()
    x = _normal(2, (2, 24, cfg.num_kv_heads, 8))
    linear, position = LinearCompressor(cfg, 8, rngs=nnx.Rngs(0))(x, segment_ids=segment_ids)
    mean, mean_position = MeanCompressor(cfg, 8, rngs=nnx.Rngs(0))(x, segment_ids=segment_ids)
    np.testing.assert_allclose(linear, ops.compress(x, cfg.nsa, segment_ids=segment_ids),
                               rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(linear, mean, rtol=1e-5, atol=1e-6)
    np.testing.assert_array_equal(position, mean_position)


@pytest.mark.parametrize("compressor", [LinearCompressor, MLPCompressor])
def test_learned_compressor_zeroes_padding_slots(compressor):
    cfg = tiny_model_config()
    phi = compressor(cfg, 8, rngs=nnx.Rngs(0))
    x_cmp, position = phi(_normal(3, (2, 24, cfg.num_kv_heads, 8)), segment_ids=PACKED_SEGMENTS)
    assert x_cmp.shape == (2, 24 // cfg.nsa.compress_stride, cfg.num_kv_heads, 8)
    pad = np.asarray(position) < 0
    assert pad.any() and (~pad).any()
    assert np.all(np.asarray(x_cmp)[pad] == 0)
    assert np.all(np.abs(np.asarray(x_cmp)[~pad]).sum(-1) > 0)


def test_mlp_compressor_uses_intra_block_position():
    """Permuting the tokens inside a window changes the MLP's output, unlike mean pooling."""
    cfg = tiny_model_config(nsa=dataclasses.replace(TINY_NSA, compress_stride=4))  # disjoint windows
    phi = MLPCompressor(cfg, 8, rngs=nnx.Rngs(1))
    x = _normal(4, (1, 8, cfg.num_kv_heads, 8))
    swapped = x[:, jnp.array([1, 0, 2, 3, 4, 5, 6, 7])]
    assert np.abs(phi(x)[0] - phi(swapped)[0]).max() > 1e-4


@pytest.mark.parametrize("compressor", ["mean", "linear"])
def test_compressed_keys_are_rotated_at_window_start(compressor):
    """The documented convention: phi over pre-RoPE keys, then RoPE at document-relative i*d."""
    cfg = tiny_model_config(compressor=compressor, v_head_dim=6)
    attn = NSAAttention(cfg, rngs=nnx.Rngs(0))
    k, v = _normal(5, (2, 24, 2, 8)), _normal(6, (2, 24, 2, 6))
    k_cmp, v_cmp = attn.compress(k, v, segment_ids=PACKED_SEGMENTS)
    l, d = cfg.nsa.compress_block, cfg.nsa.compress_stride
    expected_k, expected_v = np.zeros(k_cmp.shape, np.float32), np.zeros(v_cmp.shape, np.float32)
    for b, docs in enumerate([[(0, 9), (9, 13), (22, 2)], [(0, 24)]]):
        slot = 0
        for start, length in docs:
            for i in range((length - l) // d + 1 if length >= l else 0):
                window = slice(start + i * d, start + i * d + l)
                pooled = k[b:b + 1, window].mean(axis=1, keepdims=True)
                expected_k[b, slot] = apply_rope(pooled, jnp.array([[i * d]]), cfg.rope_theta)[0, 0]
                expected_v[b, slot] = v[b, window].mean(axis=0)
                slot += 1
    np.testing.assert_allclose(k_cmp, expected_k, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(v_cmp, expected_v, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("biases", [None, (0.0, 0.0, 0.0), (1.5, -3.0, 0.25)])
def test_gates_start_at_sigmoid_of_the_configured_bias(biases):
    """None: the default, (-2, -2, 2), which starts the window branch dominant."""
    cfg = tiny_model_config(2, **({} if biases is None else {"gate_bias_init": biases}))
    gates = NSAAttention(cfg, rngs=nnx.Rngs(0)).gates(_normal(7, (2, 5, cfg.d_model)))
    assert gates.shape == (2, 5, cfg.num_heads, 3)
    expected = jax.nn.sigmoid(jnp.array((-2.0, -2.0, 2.0) if biases is None else biases))
    np.testing.assert_allclose(gates, jnp.broadcast_to(expected, gates.shape), rtol=1e-6)


@pytest.mark.parametrize("group_size", [1, 2])
@pytest.mark.parametrize("window", [None, 5])
@pytest.mark.parametrize("segment_ids", [None, PACKED_SEGMENTS])
def test_dense_attention_matches_window_op(group_size, window, segment_ids):
    """DenseAttention (jax.nn.dot_product_attention) against ops.window_attention on the same
    rotated q, k, v: a window of T keys is full causal attention."""
    cfg = tiny_model_config(group_size)
    attn = DenseAttention(cfg, window=window, rngs=nnx.Rngs(0))
    x = _normal(8, (2, 24, cfg.d_model))
    positions = document_positions(segment_ids, 2, 24)
    q = apply_rope(split_heads(attn.q(x), cfg.num_heads), positions, cfg.rope_theta)
    k, v = attn.kv(x)
    op_cfg = dataclasses.replace(cfg.nsa, window=window or 24)
    o = ops.window_attention(q, apply_rope(k, positions, cfg.rope_theta), v, op_cfg,
                             segment_ids=segment_ids, implementation="reference")
    y, aux = attn(x, segment_ids=segment_ids)
    np.testing.assert_allclose(y, attn.out(o.reshape(2, 24, -1)), rtol=1e-5, atol=1e-5)
    assert aux == {}


# K/V projections (cmp, slc, win) each branch may depend on: selection reads the compressed keys
# to choose its blocks, and nothing else crosses branches.
BRANCH_INPUTS = {0: {0}, 1: {0, 1}, 2: {2}}


@pytest.mark.parametrize("branch", [0, 1, 2])
def test_separate_branch_kv_feed_only_their_branch(branch):
    """With one gate open, perturbing another branch's K/V projection leaves the output alone."""
    cfg = tiny_model_config(2, separate_branch_kv=True)
    attn = NSAAttention(cfg, rngs=nnx.Rngs(0))
    attn.gate.bias[...] = jnp.tile(jnp.where(jnp.arange(3) == branch, 1e4, -1e4), cfg.num_heads)
    x = _normal(9, (1, 24, cfg.d_model))
    forward = nnx.jit(lambda attn, x: attn(x)[0])
    base = forward(attn, x)
    for i, kv in enumerate((attn.kv_cmp, attn.kv, attn.kv_win)):
        kv.k.kernel[...] = kv.k.kernel[...] + 0.5
        changed = np.abs(forward(attn, x) - base).max()
        kv.k.kernel[...] = kv.k.kernel[...] - 0.5
        if i == branch:
            assert changed > 1e-3, (i, changed)
        elif i not in BRANCH_INPUTS[branch]:
            assert changed < 1e-5, (i, changed)


@pytest.mark.parametrize("kwargs", [
    dict(num_heads=3, num_kv_heads=2), dict(head_dim=7), dict(attention="sparse"),
    dict(compressor="conv"), dict(dtype="float64"), dict(param_dtype="int8"),
    dict(implementation="triton"), dict(d_model=0), dict(num_layers=2.0), dict(rope_theta=-1.0),
    dict(nsa={"window": 4}), dict(remat="yes"), dict(attention="full", v_head_dim=4),
    dict(vocab_size=True),
])
def test_bad_config_raises(kwargs):
    with pytest.raises(ValueError):
        ModelConfig(**kwargs)


def test_dense_attention_rejects_bad_window():
    with pytest.raises(ValueError, match="window"):
        DenseAttention(tiny_model_config(), window=0, rngs=nnx.Rngs(0))
