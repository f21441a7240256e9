"""implementation="pallas" through the public ops: the kernels (interpret mode on CPU) where they
exist, xla for the rest — same answers as the oracle."""
from __future__ import annotations

import jax
import numpy as np

from conftest import SMALL, make_qkv, random_segments, rel_err
from nsa_jax import ops


def test_nsa_attention_pallas_matches_reference(key):
    k1, k2, k3 = jax.random.split(key, 3)
    q, k, v, gates = make_qkv(k1, 1, 96, 4, 2, 16)
    seg = random_segments(k2, 1, 96)
    ct = jax.random.normal(k3, q.shape)

    def run(impl):
        def loss(q, k, v, g):
            out, aux = ops.nsa_attention(q, k, v, g, SMALL, segment_ids=seg, implementation=impl,
                                         return_aux=True)
            return jax.numpy.sum(out * ct), (out, aux["indices"])
        return jax.jit(jax.value_and_grad(loss, (0, 1, 2, 3), has_aux=True))(q, k, v, gates)

    (_, (out, idx)), grads = run("pallas")
    (_, (want, want_idx)), want_grads = run("reference")
    np.testing.assert_array_equal(idx, want_idx)
    assert rel_err(out, want) <= 1e-5
    for g, w in zip(grads, want_grads):
        assert rel_err(g, w) <= 1e-5
