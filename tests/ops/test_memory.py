"""The xla implementation's memory grows with T (keys per query are bounded), never with T^2:
checked on the compiled program's own memory analysis at T=16,384 with Hq=16, no run needed.
(`experiments/xla_long_context.py` runs it and reports time and peak memory.)"""
from __future__ import annotations

import jax
import jax.numpy as jnp

from nsa_jax import ops
from tests.helpers.inputs import PAPER


def _temp_bytes(t, grad):
    shapes = [(1, t, 16, 64), (1, t, 1, 64), (1, t, 1, 64), (1, t, 16, 3)]
    args = [jax.ShapeDtypeStruct(s, jnp.float32) for s in shapes]
    f = lambda q, k, v, g: jnp.sum(ops.nsa_attention(q, k, v, g, PAPER, implementation="xla"))
    f = jax.grad(f, (0, 1, 2, 3)) if grad else f
    return jax.jit(f).lower(*args).compile().memory_analysis().temp_size_in_bytes


def test_xla_memory_is_linear_in_length():
    for grad in (False, True):
        small, large = _temp_bytes(8192, grad), _temp_bytes(16384, grad)
        dense_scores = 16384 * 16384 * 16 * 4  # one float32 [T, T] score matrix per head
        assert large < dense_scores / 16, (grad, large)
        assert large < 2.5 * small, (grad, small, large)  # doubling T at most ~doubles memory
