"""The xla implementation against the dense oracle, op by op and end to end, on fresh random
inputs. Each side is one jitted call per case (compilation dominates on CPU)."""
from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from nsa_jax import ops
from tests.helpers.inputs import PAPER, SMALL, make_qkv, random_segments, rel_err

TOL = 1e-5

# (B, T, Hq, Hkv, Dk, Dv, cfg, packed): T off every multiple, T < l, T < n*l', G in {1, 2, 3, 16},
# Dk != Dv, several query chunks (T > 256), unaligned packed documents.
CASES = [
    (2, 99, 4, 2, 8, 8, SMALL, False),
    (1, 99, 3, 1, 8, 16, SMALL, True),
    (1, 7, 2, 2, 8, 8, SMALL, False),
    (1, 7, 2, 2, 8, 8, SMALL, True),
    (1, 50, 16, 1, 8, 4, SMALL, True),
    (1, 300, 4, 4, 16, 16, PAPER, False),
    (2, 600, 32, 2, 16, 8, SMALL, True),
]


def _everything(impl, q, k, v, gates, shared_idx, cfg, seg):
    """Every op of `impl`; selected attention also on `shared_idx` so kernels and oracle are
    compared on one index tensor (independent of near-ties in the scores)."""
    kw = dict(segment_ids=seg, implementation=impl)
    k_cmp, v_cmp = ops.compress(k, cfg, **kw), ops.compress(v, cfg, **kw)
    o_cmp, lse = ops.compressed_attention(q, k_cmp, v_cmp, cfg, **kw)
    scores = ops.block_scores(q, k_cmp, lse, cfg, **kw)
    out, aux = ops.nsa_attention(q, k, v, gates, cfg, return_aux=True, **kw)
    return dict(k_cmp=k_cmp, v_cmp=v_cmp, o_cmp=o_cmp, lse=lse, scores=scores,
                indices=ops.select_blocks(scores, cfg, **kw),
                o_slc=ops.selected_attention(q, k, v, shared_idx, cfg, **kw),
                o_win=ops.window_attention(q, k, v, cfg, **kw),
                out=out, nsa_indices=aux["indices"], nsa_lse=aux["lse_cmp"])


@pytest.mark.parametrize("b,t,hq,hkv,dk,dv,cfg,packed", CASES)
def test_xla_matches_reference(key, b, t, hq, hkv, dk, dv, cfg, packed):
    k1, k2, k3 = jax.random.split(key, 3)
    q, k, v, gates = make_qkv(k1, b, t, hq, hkv, dk, dv)
    seg = random_segments(k2, b, t) if packed else None
    # Random distinct blocks with -1 holes: exercises more than select_blocks ever produces.
    nb = cfg.num_blocks(t)
    perm = jax.random.permutation(k3, jnp.broadcast_to(jnp.arange(nb + 2) - 2, (b, t, hkv, nb + 2)),
                                  axis=-1, independent=True)
    shared_idx = jnp.maximum(perm[..., :cfg.num_selected], -1).astype(jnp.int32)
    if perm.shape[-1] < cfg.num_selected:
        shared_idx = jnp.pad(shared_idx, [(0, 0)] * 3 + [(0, cfg.num_selected - perm.shape[-1])],
                             constant_values=-1)
    got = jax.jit(lambda *a: _everything("xla", *a, cfg, seg))(q, k, v, gates, shared_idx)
    want = jax.jit(lambda *a: _everything("reference", *a, cfg, seg))(q, k, v, gates, shared_idx)
    for name in want:
        assert got[name].shape == want[name].shape, name
        if jnp.issubdtype(want[name].dtype, jnp.integer):
            np.testing.assert_array_equal(got[name], want[name], err_msg=name)
        else:
            assert rel_err(got[name], want[name]) <= TOL, name
    # Both selectors on identical scores must agree exactly (ties -> lower index).
    np.testing.assert_array_equal(
        ops.select_blocks(want["scores"], cfg, segment_ids=seg, implementation="xla"),
        ops.select_blocks(want["scores"], cfg, segment_ids=seg, implementation="reference"))


def test_selected_attention_skips_negative_and_repeated_slots(key):
    q, k, v, _ = make_qkv(key, 1, 64, 2, 1, 8)
    idx = jnp.broadcast_to(jnp.array([2, -1, 2, 0], jnp.int32), (1, 64, 1, 4))
    once = jnp.broadcast_to(jnp.array([0, 2, -1, -1], jnp.int32), (1, 64, 1, 4))
    for impl in ("xla", "reference"):
        a = ops.selected_attention(q, k, v, idx, SMALL, implementation=impl)
        b = ops.selected_attention(q, k, v, once, SMALL, implementation=impl)
        assert rel_err(a, b) <= TOL, impl


@pytest.mark.parametrize("hq,hkv,ring", [(4, 2, None), (6, 3, 32), (2, 1, 48)])
def test_decode_xla_matches_reference(key, hq, hkv, ring):
    """nsa_decode_attention over a random cache: xla against the dense-mask decode oracle, at
    positions before the first compressed token, inside a block and at the last slot."""
    b, slots, d = 3, 128, 8
    keys = jax.random.split(key, 8)
    normal = lambda k, n: jax.random.normal(k, (b, n, hkv, d))
    compressed = slots // SMALL.compress_stride
    args = [jax.random.normal(keys[0], (b, hq, d)), normal(keys[1], slots), normal(keys[2], slots),
            normal(keys[3], compressed), normal(keys[4], compressed),
            jax.nn.sigmoid(jax.random.normal(keys[5], (b, hq, 3))),
            jnp.array([5, 70, slots - 1], jnp.int32), SMALL]
    window = {} if ring is None else dict(k_win=normal(keys[6], ring), v_win=normal(keys[7], ring))
    run = lambda impl: ops.nsa_decode_attention(*args, **window, implementation=impl,
                                                return_aux=True)
    (got, got_aux), (want, want_aux) = run("xla"), run("reference")
    np.testing.assert_array_equal(got_aux["indices"], want_aux["indices"])
    assert (np.asarray(want_aux["indices"])[2] >= 0).all()  # 8 blocks, n = 4: a real choice
    assert rel_err(got, want) < 1e-5 and rel_err(got_aux["lse_cmp"], want_aux["lse_cmp"]) < 1e-5
