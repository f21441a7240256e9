"""Every bad input listed in design.md fails with a ValueError naming the argument and what it
needs."""
from __future__ import annotations

import jax.numpy as jnp
import pytest

from nsa_jax import NSAConfig, ops
from tests.helpers.inputs import SMALL

B, T, HQ, HKV, D = 1, 40, 4, 2, 8
Q = jnp.zeros((B, T, HQ, D))
K = jnp.zeros((B, T, HKV, D))
V = jnp.zeros((B, T, HKV, D))
G = jnp.zeros((B, T, HQ, 3))


@pytest.mark.parametrize("kwargs,match", [
    (dict(compress_block=32, compress_stride=12), "compress_stride.*divide compress_block"),
    (dict(compress_block=32, compress_stride=16, select_block=40), "divide select_block"),
    (dict(num_selected=2, num_init_blocks=1, num_local_blocks=2), "num_selected.*forced"),
    (dict(window=0), "window must be an int >= 1"),
    (dict(select_block=2.5), "select_block must be an int"),
    (dict(num_local_blocks=-1), "num_local_blocks must be an int >= 0"),
])
def test_bad_config(kwargs, match):
    with pytest.raises(ValueError, match=match):
        NSAConfig(**kwargs)


@pytest.mark.parametrize("q,k,v,match", [
    (Q[0], K, V, "q must be rank 4"),
    (Q, K.astype(jnp.bfloat16), V, "share one dtype"),
    (jnp.zeros((B, T, 3, D)), K, V, r"multiple of KV heads"),
    (Q, jnp.zeros((B, T, HKV, 16)), V, "k head_dim must equal q head_dim"),
    (Q, K[:, :30], V, r"k must have \[B, length\]"),
    (Q, K, jnp.zeros((B, T, 1, D)), "v must have the 2 KV heads"),
    (Q.astype(jnp.int32), K, V, "q must be a floating-point array"),
])
def test_bad_qkv(q, k, v, match):
    for call in (lambda: ops.window_attention(q, k, v, SMALL),
                 lambda: ops.nsa_attention(q, k, v, G, SMALL)):
        with pytest.raises(ValueError, match=match):
            call()


def test_bad_segment_ids():
    with pytest.raises(ValueError, match=r"segment_ids must have shape \[B, T\]"):
        ops.nsa_attention(Q, K, V, G, SMALL, segment_ids=jnp.zeros((B, T - 1), jnp.int32))
    with pytest.raises(ValueError, match="segment_ids must be an integer array"):
        ops.compress(K, SMALL, segment_ids=jnp.zeros((B, T)))


def test_bad_implementation_scale_and_config():
    with pytest.raises(ValueError, match="implementation must be one of"):
        ops.nsa_attention(Q, K, V, G, SMALL, implementation="triton")
    with pytest.raises(ValueError, match="scale must be a positive finite number"):
        ops.window_attention(Q, K, V, SMALL, scale=-1.0)
    with pytest.raises(ValueError, match="cfg must be an nsa_jax.NSAConfig"):
        ops.compress(K, {"compress_block": 32})


def test_bad_gates_and_branch_kv():
    with pytest.raises(ValueError, match=r"gates must have shape \[B, T, Hq, 3\]"):
        ops.nsa_attention(Q, K, V, G[..., :2], SMALL)
    with pytest.raises(ValueError, match="k_cmp and v_cmp must be given together"):
        ops.nsa_attention(Q, K, V, G, SMALL, k_cmp=ops.compress(K, SMALL))
    with pytest.raises(ValueError, match=r"k_cmp must have \[B, length\] = \(1, 9\)"):
        ops.nsa_attention(Q, K, V, G, SMALL, k_cmp=K[:, :5], v_cmp=V[:, :5])
    with pytest.raises(ValueError, match="k_win head_dim"):
        ops.nsa_attention(Q, K, V, G, SMALL, k_win=jnp.zeros((B, T, HKV, 4)), v_win=V)


def test_bad_indices_scores_and_lse():
    with pytest.raises(ValueError, match="indices must be an integer array"):
        ops.selected_attention(Q, K, V, jnp.zeros((B, T, HKV, 4)), SMALL)
    with pytest.raises(ValueError, match=r"indices must have shape \[B, T, Hkv, n\]"):
        ops.selected_attention(Q, K, V, jnp.zeros((B, T, 1, 4), jnp.int32), SMALL)
    with pytest.raises(ValueError, match=r"scores must have shape .*ceil\(T / select_block\)"):
        ops.select_blocks(jnp.zeros((B, T, HKV, 2)), SMALL)
    k_cmp = ops.compress(K, SMALL)
    with pytest.raises(ValueError, match=r"lse must have shape \[B, T, Hq\]"):
        ops.block_scores(Q, k_cmp, jnp.zeros((B, T)), SMALL)
    with pytest.raises(ValueError, match="x must be a non-empty rank-4 array"):
        ops.compression_blocks(K[0], SMALL)
