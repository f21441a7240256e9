"""Gradients of the xla implementation against autodiff of the dense oracle, finite-difference
checks, and the empty-row guarantee (exact zeros, never NaN)."""
from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.test_util import check_grads

from nsa_jax import ops
from tests.helpers.inputs import SMALL, make_qkv, random_segments, rel_err

TOL = 1e-5


def _loss(impl, cfg, seg, ct):
    def loss(q, k, v, k_cmp, v_cmp, gates):
        out = ops.nsa_attention(q, k, v, gates, cfg, k_cmp=k_cmp, v_cmp=v_cmp, segment_ids=seg,
                                implementation=impl)
        return jnp.sum(out * ct)
    return loss


@pytest.mark.parametrize("b,t,hq,hkv,dk,dv,packed", [
    (1, 70, 4, 2, 8, 8, False),
    (2, 45, 3, 1, 8, 16, True),
    (1, 90, 16, 1, 8, 8, True),
])
def test_gradients_match_reference(key, b, t, hq, hkv, dk, dv, packed):
    k1, k2, k3, k4 = jax.random.split(key, 4)
    q, k, v, gates = make_qkv(k1, b, t, hq, hkv, dk, dv)
    seg = random_segments(k2, b, t) if packed else None
    # Learned compressors hand in their own compressed K/V: differentiate w.r.t. them directly.
    k_cmp = ops.compress(k, SMALL, segment_ids=seg) + 0.1 * jax.random.normal(k3, ())
    v_cmp = ops.compress(v, SMALL, segment_ids=seg)
    ct = jax.random.normal(k4, (b, t, hq, dv))
    args = (q, k, v, k_cmp, v_cmp, gates)
    argnums = tuple(range(6))
    got = jax.jit(jax.grad(_loss("xla", SMALL, seg, ct), argnums))(*args)
    want = jax.jit(jax.grad(_loss("reference", SMALL, seg, ct), argnums))(*args)
    for name, g, w in zip(("q", "k", "v", "k_cmp", "v_cmp", "gates"), got, want):
        assert rel_err(g, w) <= TOL, name


def test_gradients_through_default_compression_match_reference(key):
    k1, k2 = jax.random.split(key)
    q, k, v, gates = make_qkv(k1, 1, 80, 4, 2, 8)
    ct = jax.random.normal(k2, q.shape)

    def grads(impl):
        f = lambda q, k, v, g: jnp.sum(ops.nsa_attention(q, k, v, g, SMALL, implementation=impl) * ct)
        return jax.jit(jax.grad(f, (0, 1, 2, 3)))(q, k, v, gates)

    for g, w in zip(grads("xla"), grads("reference")):
        assert rel_err(g, w) <= TOL


def test_check_grads_xla_float64(key):
    with jax.enable_x64(True):
        q, k, v, gates = (x.astype(jnp.float64) for x in make_qkv(key, 1, 40, 2, 1, 4))
        seg = jnp.array([[0] * 17 + [1] * 23])
        k_cmp = ops.compress(k, SMALL, segment_ids=seg)
        v_cmp = ops.compress(v, SMALL, segment_ids=seg)
        f = lambda *a: ops.nsa_attention(a[0], a[1], a[2], a[5], SMALL, k_cmp=a[3], v_cmp=a[4],
                                         segment_ids=seg, implementation="xla")
        check_grads(f, (q, k, v, k_cmp, v_cmp, gates), order=1, modes=("rev",))


@pytest.mark.parametrize("impl", ["xla", "reference"])
def test_rows_without_compressed_tokens_are_zero_with_zero_gradients(key, impl):
    cfg = SMALL  # l = 8: queries 0..6 of each document see no compressed token
    q, k, v, _ = make_qkv(key, 1, 40, 4, 2, 8)
    seg = jnp.array([[3] * 20 + [4] * 20])
    k_cmp, v_cmp = ops.compress(k, cfg, segment_ids=seg), ops.compress(v, cfg, segment_ids=seg)
    empty = np.r_[0:7, 20:27]

    def loss(q, k_cmp, v_cmp):
        o, lse = ops.compressed_attention(q, k_cmp, v_cmp, cfg, segment_ids=seg,
                                          implementation=impl)
        return jnp.sum(o) + jnp.sum(jnp.where(jnp.isfinite(lse), lse, 0.0)), (o, lse)

    (_, (o, lse)), grads = jax.value_and_grad(loss, (0, 1, 2), has_aux=True)(q, k_cmp, v_cmp)
    assert np.all(np.asarray(o)[0, empty] == 0)
    assert np.all(np.asarray(lse)[0, empty] == -np.inf)
    assert np.all(np.isfinite(np.delete(np.asarray(lse)[0], empty, axis=0)))
    for g in grads:
        assert np.all(np.isfinite(g))
    assert np.all(np.asarray(grads[0])[0, empty] == 0)
