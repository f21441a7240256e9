"""Small NSA configs and fresh random inputs for the op and kernel tests, and the error measure
they share."""
from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from nsa_jax import NSAConfig

# Small hyper-parameters that still exercise overlap (d < l), l' != l and several blocks.
SMALL = NSAConfig(compress_block=8, compress_stride=4, select_block=16, num_selected=4,
                  num_init_blocks=1, num_local_blocks=2, window=24)
PAPER = NSAConfig()


def make_qkv(key, b, t, hq, hkv, dk, dv=None, dtype=jnp.float32):
    kq, kk, kv, kg = jax.random.split(key, 4)
    dv = dv or dk
    q = jax.random.normal(kq, (b, t, hq, dk), dtype)
    k = jax.random.normal(kk, (b, t, hkv, dk), dtype)
    v = jax.random.normal(kv, (b, t, hkv, dv), dtype)
    gates = jax.nn.sigmoid(jax.random.normal(kg, (b, t, hq, 3))).astype(dtype)
    return q, k, v, gates


def random_segments(key, b, t, max_docs=4):
    """[B, T] int32 segment ids with random, unaligned document boundaries."""
    cuts = jax.random.randint(key, (b, max_docs - 1), 1, t)
    return jnp.sum(jnp.arange(t)[None, :, None] >= cuts[:, None, :], axis=-1).astype(jnp.int32)


def rel_err(a, b):
    """max |a - b| / max |b| over finite entries of b (a must be finite where b is)."""
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    finite = np.isfinite(b)
    assert np.array_equal(np.isfinite(a), finite), "non-finite entries differ"
    if not finite.any():
        return 0.0
    return float(np.max(np.abs(a[finite] - b[finite])) / max(np.max(np.abs(b[finite])), 1e-30))
