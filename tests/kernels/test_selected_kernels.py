"""Selected-block attention kernels (pallas_kernels.gpu.triton) against the dense oracle
(nsa_jax.ops, implementation="reference").

TestSelectedKernel runs the kernels compiled on a GPU (skipped without one);
TestSelectedKernelInterpret runs the same cases in Pallas interpret mode on CPU. The lowering test
compiles the kernels for CUDA on a CPU machine, so a tile the GPU would reject fails here.
"""
import zlib

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from nsa_jax import ops
from nsa_jax.config import NSAConfig
from nsa_jax.layout import document_starts
from pallas_kernels.gpu.triton.selected_attention import selected_attention
from tests.helpers.kernels import CompiledOrInterpreted, export_for_cuda


def random_indices(rng, doc_start, num_kv_heads, block, n, empty_fraction=0.0):
    """Causal block ids per (b, t, h), current block always chosen, -1 padded at the end where a
    query has fewer than n blocks; `empty_fraction` of the rows become all -1, and as many again
    repeat their first block in their last slot (a repeat counts once)."""
    b, t = doc_start.shape
    rel = np.arange(t)[None, :] - np.asarray(doc_start)
    out = np.full((b, t, num_kv_heads, n), -1, np.int32)
    for bi, ti, hi in np.ndindex(b, t, num_kv_heads):
        draw = rng.random()
        if draw < empty_fraction:
            continue
        cur = rel[bi, ti] // block
        others = rng.permutation(cur)[: rng.integers(0, n)]
        chosen = np.sort(np.concatenate([[cur], others]))
        out[bi, ti, hi, : len(chosen)] = chosen
        if draw < 2 * empty_fraction:
            out[bi, ti, hi, -1] = chosen[0]
    assert (out < -(-t // block)).all() and (out >= -1).all()
    return jnp.asarray(out)


CASES = {
    # name: (B, T, Hq, Hkv, Dk, Dv, l', n, dtype, document lengths or None, empty rows)
    "g1_ragged_t": (1, 200, 2, 2, 64, 64, 16, 4, jnp.float32, None, 0.0),
    "g2_docs_empty_rows": (2, 160, 4, 2, 64, 64, 16, 5, jnp.float32, (37, 50, 73), 0.25),
    "g3_dk_ne_dv": (1, 130, 3, 1, 64, 192, 32, 3, jnp.float32, None, 0.0),
    "g16_docs": (1, 256, 16, 1, 64, 64, 16, 6, jnp.float32, (21, 100, 135), 0.0),
    "g4_bf16_docs": (1, 192, 8, 2, 128, 64, 32, 4, jnp.bfloat16, (70, 122), 0.0),
}


class TestSelectedKernel(CompiledOrInterpreted):

    @pytest.mark.parametrize("name", sorted(CASES))
    def test_matches_oracle(self, name):
        b, t, hq, hkv, dk, dv, block, n, dtype, docs, empty = CASES[name]
        rng = np.random.default_rng(zlib.crc32(name.encode()))
        keys = jax.random.split(jax.random.PRNGKey(rng.integers(2**31)), 4)
        q = jax.random.normal(keys[0], (b, t, hq, dk), dtype)
        k = jax.random.normal(keys[1], (b, t, hkv, dk), dtype)
        v = jax.random.normal(keys[2], (b, t, hkv, dv), dtype)
        cotangent = jax.random.normal(keys[3], (b, t, hq, dv), jnp.float32)
        segment_ids = None
        if docs is not None:
            segment_ids = jnp.asarray(np.repeat(np.arange(len(docs)) % 2, docs))[None].repeat(b, 0)
        doc_start = document_starts(segment_ids, b, t)
        indices = random_indices(rng, doc_start, hkv, block, n, empty)
        cfg = NSAConfig(compress_block=block, compress_stride=block, select_block=block,
                        num_selected=n, num_init_blocks=0, num_local_blocks=1)
        scale = 0.7 / np.sqrt(dk)

        def value_and_grads(use_kernel, q, k, v, indices, segment_ids):
            if use_kernel:
                f = lambda q, k, v: selected_attention(q, k, v, indices, cfg,
                                                       segment_ids=segment_ids, scale=scale,
                                                       interpret=self.INTERPRET)
            else:
                f = lambda q, k, v: ops.selected_attention(
                    q, k, v, indices, cfg, segment_ids=segment_ids, scale=scale,
                    implementation="reference")
            o, vjp = jax.vjp(f, q, k, v)
            return (o, *vjp(cotangent.astype(o.dtype)))

        # Index arrays are arguments, not constants XLA would fold at compile time.
        run = jax.jit(value_and_grads, static_argnums=0)
        got, *got_grads = run(True, q, k, v, indices, segment_ids)
        want, *want_grads = run(False, q, k, v, indices, segment_ids)
        assert got.shape == (b, t, hq, dv) and got.dtype == dtype
        tol = self._tolerance(dtype)
        for label, x, y in zip(("o", "dq", "dk", "dv"), (got, *got_grads), (want, *want_grads)):
            x, y = x.astype(jnp.float32), y.astype(jnp.float32)
            err = float(jnp.linalg.norm(x - y) / jnp.linalg.norm(y))
            assert err < tol, f"{label}: relative L2 error {err:.2e} >= {tol:.0e}"
        if empty:
            no_keys = np.asarray((indices < 0).all(-1))  # [B, T, Hkv] rows with nothing selected
            rows = np.repeat(no_keys, hq // hkv, axis=2)
            assert no_keys.any() and float(jnp.abs(got[rows]).max()) == 0.0

    def test_rejects_bad_input(self):
        cfg = NSAConfig(select_block=16, num_selected=4)
        q = jnp.zeros((1, 32, 4, 64))
        k = jnp.zeros((1, 32, 3, 64))
        idx = jnp.zeros((1, 32, 3, 4), jnp.int32)
        with pytest.raises(ValueError, match="multiple of KV heads"):
            selected_attention(q, k, k, idx, cfg, interpret=True)
        with pytest.raises(ValueError, match="indices must be int32"):
            selected_attention(q, q, q, jnp.zeros((1, 32, 4, 4)), cfg, interpret=True)


class TestSelectedKernelInterpret(TestSelectedKernel):
    INTERPRET = True


@pytest.mark.parametrize("hq,hkv", [(64, 4), (32, 8)])
@pytest.mark.parametrize("packed", [False, True])
def test_lowers_for_cuda_at_benchmark_shapes(hq, hkv, packed):
    """Forward and backward go through the real Pallas -> Triton lowering for an H100."""
    t, d, n = 8192, 128, 16
    cfg = NSAConfig(select_block=64, num_selected=n)
    sds = jax.ShapeDtypeStruct
    args = (sds((1, t, hq, d), jnp.bfloat16), sds((1, t, hkv, d), jnp.bfloat16),
            sds((1, t, hkv, d), jnp.bfloat16), sds((1, t, hkv, n), jnp.int32),
            sds((1, t), jnp.int32))

    def fwd_bwd(q, k, v, indices, segment_ids):
        f = lambda q, k, v: selected_attention(q, k, v, indices, cfg,
                                               segment_ids=segment_ids if packed else None)
        o, vjp = jax.vjp(f, q, k, v)
        return o, vjp(o)

    text = export_for_cuda(fwd_bwd, *args).mlir_module()
    for kernel in ("nsa_selected_fwd", "nsa_selected_dq", "nsa_selected_dkv"):
        assert kernel in text, f"{kernel} missing from the CUDA lowering"
