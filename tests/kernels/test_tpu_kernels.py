"""The TPU Pallas kernels on CPU: run in TPU interpret mode (simulated HBM/VMEM/SMEM, DMAs and
semaphores, race detector on) against the dense oracle, outputs and gradients; and lowered for
TPU with jax.export at the paper's shape. Interpret mode is slow, so shapes are tiny and each case
is one jitted call computing outputs and gradients together."""
from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax import export
from jax.experimental.pallas import tpu as pltpu

from nsa_jax import ops
from nsa_jax.ops import dispatch
from pallas_kernels.tpu import compressed, selected
from tests.helpers.inputs import PAPER, SMALL, make_qkv, random_segments, rel_err

TOL = {jnp.float32: 1e-5, jnp.bfloat16: 2e-2}  # bf16: MXU operands rounded, as on a TPU
INTERPRET = pltpu.InterpretParams(detect_races=True, uninitialized_memory="nan")


@pytest.fixture
def no_races(capfd):
    """The race detector prints 'RACE DETECTED' for every race it finds, in any kernel."""
    pltpu.reset_tpu_interpret_mode_state()
    yield
    assert "RACE DETECTED" not in capfd.readouterr().out


def _outputs_and_grads(fn, args, key):
    """fn(*args) -> array or tuple; returns (outputs, grads of a random projection of them)."""
    out, vjp = jax.vjp(fn, *args)
    leaves = jax.tree.leaves(out)
    keys = jax.random.split(key, len(leaves))
    cot = [jnp.where(jnp.isfinite(x), jax.random.normal(k, x.shape, x.dtype), 0)
           for k, x in zip(keys, leaves)]
    return out, vjp(jax.tree.unflatten(jax.tree.structure(out), cot))


def _compare(got, want, dtype=jnp.float32):
    for g, w in zip(jax.tree.leaves(got), jax.tree.leaves(want)):
        assert g.shape == w.shape and g.dtype == w.dtype
        assert rel_err(g, w) < TOL[dtype]


def _random_indices(key, b, t, hkv, n, num_blocks):
    """Any integers the oracle accepts: -1 and other negatives, repeats, blocks past the query or
    past the sequence."""
    return jax.random.randint(key, (b, t, hkv, n), -3, num_blocks + 2).astype(jnp.int32)


# (B, T, Hq, Hkv, Dk, Dv, packed, block_q, block_k, dtype): G in {1, 2, 3}, Dk != Dv, T off every
# block size, several slot and query tiles, unaligned documents; T < l (no compressed token).
COMPRESSED_CASES = [
    (1, 70, 6, 2, 8, 16, True, 16, 8, jnp.float32),
    (2, 40, 2, 1, 8, 8, False, 8, 16, jnp.bfloat16),
    (1, 7, 1, 1, 8, 8, False, 8, 8, jnp.float32),
]


@pytest.mark.parametrize("b,t,hq,hkv,dk,dv,packed,block_q,block_k,dtype", COMPRESSED_CASES)
def test_compressed_kernel_matches_oracle(key, no_races, b, t, hq, hkv, dk, dv, packed, block_q,
                                          block_k, dtype):
    k1, k2, k3 = jax.random.split(key, 3)
    q, k, v, _ = make_qkv(k1, b, t, hq, hkv, dk, dv, dtype)
    seg = random_segments(k2, b, t) if packed else None
    k_cmp, v_cmp = ops.compress(k, SMALL, segment_ids=seg), ops.compress(v, SMALL, segment_ids=seg)
    scale = 0.7

    def run(impl):
        if impl == "kernel":
            fn = lambda *a: compressed.compressed_attention(
                *a, SMALL, segment_ids=seg, scale=scale, interpret=INTERPRET,
                tiling=compressed.Tiling(block_q=block_q, block_k=block_k))
        else:
            fn = lambda *a: ops.compressed_attention(*a, SMALL, segment_ids=seg, scale=scale,
                                                     implementation="reference")
        return jax.jit(lambda *a: _outputs_and_grads(fn, a, k3))(q, k_cmp, v_cmp)

    got, want = run("kernel"), run("reference")
    assert np.array_equal(np.isneginf(got[0][1]), np.isneginf(want[0][1]))
    assert not np.any(got[0][0][np.isneginf(want[0][1])])  # rows that see nothing: exact zeros
    _compare(got, want, dtype)


# (B, T, Hq, Hkv, Dk, Dv, packed, block_q, realistic, dtype): indices from select_blocks, or any
# integers.
SELECTED_CASES = [
    (1, 70, 4, 2, 8, 16, True, 8, True, jnp.float32),
    (2, 50, 1, 1, 8, 8, False, 16, False, jnp.bfloat16),
]


def _realistic_indices(q, k, v, seg):
    kw = dict(segment_ids=seg, implementation="reference")
    k_cmp = ops.compress(k, SMALL, **kw)
    lse = ops.compressed_attention(q, k_cmp, ops.compress(v, SMALL, **kw), SMALL, **kw)[1]
    return ops.select_blocks(ops.block_scores(q, k_cmp, lse, SMALL, **kw), SMALL, **kw)


@pytest.mark.parametrize("b,t,hq,hkv,dk,dv,packed,block_q,realistic,dtype", SELECTED_CASES)
def test_selected_kernel_matches_oracle(key, no_races, b, t, hq, hkv, dk, dv, packed, block_q,
                                        realistic, dtype):
    k1, k2, k3, k4 = jax.random.split(key, 4)
    q, k, v, _ = make_qkv(k1, b, t, hq, hkv, dk, dv, dtype)
    seg = random_segments(k2, b, t) if packed else None
    if realistic:
        indices = jax.jit(_realistic_indices)(q, k, v, seg)
    else:
        indices = _random_indices(k3, b, t, hkv, SMALL.num_selected, SMALL.num_blocks(t))
    scale = 0.4

    def run(impl):
        if impl == "kernel":
            fn = lambda *a: selected.selected_attention(
                *a, indices, SMALL, segment_ids=seg, scale=scale, interpret=INTERPRET,
                tiling=selected.Tiling(block_q=block_q))
        else:
            fn = lambda *a: ops.selected_attention(*a, indices, SMALL, segment_ids=seg,
                                                   scale=scale, implementation="reference")
        return jax.jit(lambda *a: _outputs_and_grads(fn, a, k4))(q, k, v)

    _compare(run("kernel"), run("reference"), dtype)


def _chosen(op: str, implementation, on: str, dtype=jnp.bfloat16):
    """What dispatch runs for the op's whole argument list at head dim 16 (the Hopper kernels'
    conditions read every argument; 16 is below every Mosaic GPU kernel's head dims)."""
    q, kv = jnp.zeros((1, 64, 2, 16), dtype), jnp.zeros((1, 64, 1, 16), dtype)
    if op == "selected_attention":
        indices = jnp.zeros((1, 64, 1, SMALL.num_selected), jnp.int32)
        args = (q, kv, kv, indices, SMALL)
    else:
        args = (q, kv, kv, SMALL)
    return dispatch.load(dispatch.choose(op, implementation, args, {}, on=on))


def test_cpu_backend_keeps_the_tpu_kernels_out():
    """Off TPU, "pallas" must not reach the Mosaic kernels (they compile only for TPUs)."""
    assert ops.backend() != "tpu"
    for op, fn in (("compressed_attention", compressed.compressed_attention),
                   ("selected_attention", selected.selected_attention)):
        for on in ("cpu", "gpu", "hopper"):
            assert _chosen(op, "pallas", on) is not fn


@pytest.mark.parametrize("implementation", ["pallas", None])
def test_tpu_backend_picks_the_kernels(implementation):
    """On a TPU backend "pallas" and None resolve to these kernels for the two ops, and to xla
    for inputs they do not take."""
    assert _chosen("compressed_attention", implementation, "tpu") is compressed.compressed_attention
    assert _chosen("selected_attention", implementation, "tpu") is selected.selected_attention
    assert _chosen("selected_attention", implementation, "tpu", jnp.float16) is \
        dispatch.load(dispatch.SEL + "selected_attention_xla")


def _paper_lowering(kernel: str):
    """(fn(q, k, v, *rest), args) at the paper's shape (B=1, Hq=64, Hkv=4, D=128, l'=64, n=16,
    l=32, d=16, bf16)."""
    b, t, hq, hkv, d = 1, 8192, 64, 4, 128
    spec = jax.ShapeDtypeStruct
    q, kv = spec((b, t, hq, d), jnp.bfloat16), spec((b, t, hkv, d), jnp.bfloat16)
    if kernel == "compressed":
        slots = spec((b, PAPER.num_compressed(t), hkv, d), jnp.bfloat16)
        fn = lambda q, k, v: compressed.compressed_attention(q, k, v, PAPER)
        return fn, (q, slots, slots)
    idx = spec((b, t, hkv, PAPER.num_selected), jnp.int32)
    fn = lambda q, k, v, i: selected.selected_attention(q, k, v, i, PAPER)
    return fn, (q, kv, kv, idx)


@pytest.mark.parametrize("device_kind", ["TPU v5 lite", "TPU v6 lite"])
@pytest.mark.parametrize("kernel", ["compressed", "selected"])
def test_kernels_lower_for_tpu_at_paper_shape(kernel, device_kind):
    """jax.export runs the real Pallas -> Mosaic lowering (block-shape rules, supported
    primitives) without a TPU; the Mosaic compiler's own passes run only on a TPU."""
    fn, args = _paper_lowering(kernel)

    def fwd_and_bwd(q, k, v, *rest):
        out, vjp = jax.vjp(lambda *qkv: fn(*qkv, *rest), q, k, v)
        return vjp(out)

    device = jax.sharding.AbstractDevice(device_kind=device_kind, platform="tpu", num_cores=1)
    with jax.sharding.use_abstract_mesh(jax.sharding.AbstractMesh((), (), abstract_device=device)):
        for f, kernels in ((fn, 1), (fwd_and_bwd, 3)):  # forward; forward + dQ + dK/dV
            module = export.export(jax.jit(f), platforms=["tpu"])(*args).mlir_module()
            assert module.count("tpu_custom_call") == kernels
