"""Compressed-attention and fused top-n selection kernels (pallas_kernels.gpu.triton) against the
dense oracle (nsa_jax.ops, implementation="reference").

TestCompressedKernels runs the kernels compiled on a GPU (skipped without one);
TestCompressedKernelsInterpret runs the same cases in Pallas interpret mode on CPU. The lowering
test compiles every kernel for CUDA on a CPU machine, so a tile the GPU would reject fails here.
"""
import zlib

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from nsa_jax import layout, ops
from nsa_jax.config import NSAConfig
from nsa_jax.ops import reference
from pallas_kernels.gpu.triton.compressed_attention import Tiling, compressed_attention
from pallas_kernels.gpu.triton.select_blocks import Tiling as SelectTiling
from pallas_kernels.gpu.triton.select_blocks import select_blocks
from tests.helpers.kernels import CompiledOrInterpreted, export_for_cuda

SMALL = NSAConfig(compress_block=8, compress_stride=4, select_block=16, num_selected=4,
                  num_init_blocks=1, num_local_blocks=2, window=24)
PAPER_N5 = NSAConfig(num_selected=5)  # n not a power of 2: padded top-n columns
TINY_TILES = dict(rows_per_program=16, key_block=16)  # several tiles even at small T

CASES = {
    # name: (B, T, Hq, Hkv, Dk, Dv, cfg, document lengths or None, dtype, tile options)
    "g1_ragged_t": (1, 139, 2, 2, 16, 16, SMALL, None, jnp.float32, TINY_TILES),
    "b2_g3_dk_ne_dv_docs": (2, 101, 3, 1, 16, 32, SMALL, (20, 3, 78), jnp.float32, TINY_TILES),
    "t_below_l": (1, 20, 4, 2, 16, 16, NSAConfig(), None, jnp.float32, {}),
    "g16_docs_bf16": (1, 230, 16, 1, 32, 32, PAPER_N5, (23, 161, 46), jnp.bfloat16, {}),
}
SELECT_CASES = ("g1_ragged_t", "b2_g3_dk_ne_dv_docs", "g16_docs_bf16")


def _problem(name):
    b, t, hq, hkv, dk, dv, cfg, docs, dtype, tiles = CASES[name]
    rng = np.random.default_rng(zlib.crc32(name.encode()) + np.random.SeedSequence().entropy)
    keys = jax.random.split(jax.random.PRNGKey(rng.integers(2**31)), 5)
    segment_ids = None
    if docs is not None:
        segment_ids = jnp.asarray(np.repeat(np.arange(len(docs)) % 2, docs))[None].repeat(b, 0)
    tc = layout.num_compressed_slots(t, cfg, segment_ids is not None)
    q = jax.random.normal(keys[0], (b, t, hq, dk), dtype)
    k_cmp = jax.random.normal(keys[1], (b, tc, hkv, dk), dtype)
    v_cmp = jax.random.normal(keys[2], (b, tc, hkv, dv), dtype)
    cotangents = (jax.random.normal(keys[3], (b, t, hq, dv), jnp.float32),
                  jax.random.normal(keys[4], (b, t, hq), jnp.float32))
    return q, k_cmp, v_cmp, cotangents, cfg, segment_ids, tiles


class TestCompressedKernels(CompiledOrInterpreted):

    @pytest.mark.parametrize("name", sorted(CASES))
    def test_attention_matches_oracle(self, name):
        q, k_cmp, v_cmp, (do, dlse), cfg, segment_ids, tiles = _problem(name)
        scale = 0.8 / np.sqrt(q.shape[-1])

        def value_and_grads(use_kernel, q, k_cmp, v_cmp, segment_ids):
            if use_kernel:
                tiling = Tiling(bwd_rows=16, bwd_key_block=16, **tiles)
                f = lambda *x: compressed_attention(*x, cfg, segment_ids=segment_ids, scale=scale,
                                                    interpret=self.INTERPRET, tiling=tiling)
            else:
                f = lambda *x: ops.compressed_attention(*x, cfg, segment_ids=segment_ids,
                                                        scale=scale, implementation="reference")
            (o, lse), vjp = jax.vjp(f, q, k_cmp, v_cmp)
            return (o, lse, *vjp((do.astype(o.dtype), dlse)))

        run = jax.jit(value_and_grads, static_argnums=0)
        got = run(True, q, k_cmp, v_cmp, segment_ids)
        want = run(False, q, k_cmp, v_cmp, segment_ids)
        assert got[0].shape == want[0].shape and got[0].dtype == q.dtype
        assert got[1].dtype == jnp.float32
        lse, want_lse = np.asarray(got[1]), np.asarray(want[1])
        np.testing.assert_array_equal(np.isneginf(lse), np.isneginf(want_lse))
        assert np.isfinite(lse[~np.isneginf(want_lse)]).all()
        blind = np.isneginf(want_lse)  # [B, T, Hq] rows that see nothing
        assert blind.any(), "every case has queries before their document's first l tokens"
        assert float(jnp.abs(got[0][blind]).max()) == 0.0
        assert float(jnp.abs(got[2][blind]).max()) == 0.0
        tol = self._tolerance(q.dtype)
        lse_pair = (jnp.where(blind, 0.0, got[1]), jnp.where(blind, 0.0, want[1]))
        pairs = zip(("o", "lse", "dq", "dk_cmp", "dv_cmp"), (got[0], lse_pair[0], *got[2:]),
                    (want[0], lse_pair[1], *want[2:]))
        for label, x, y in pairs:
            x, y = x.astype(jnp.float32), y.astype(jnp.float32)
            assert bool(jnp.isfinite(x).all()), f"{label}: non-finite values"
            norm = float(jnp.linalg.norm(y))
            err = float(jnp.linalg.norm(x - y)) / max(norm, 1e-30)
            assert err < tol or norm == 0.0 == float(jnp.abs(x).max()), \
                f"{label}: relative L2 error {err:.2e} >= {tol:.0e}"

    @pytest.mark.parametrize("name", SELECT_CASES)
    def test_select_equals_oracle(self, name):
        q, k_cmp, v_cmp, _, cfg, segment_ids, tiles = _problem(name)
        scale = q.shape[-1] ** -0.5
        lse = ops.compressed_attention(q, k_cmp, v_cmp, cfg, segment_ids=segment_ids,
                                       implementation="xla")[1]

        @jax.jit
        def kernel(q, k_cmp, lse, segment_ids):
            return select_blocks(q, k_cmp, lse, cfg, segment_ids=segment_ids, scale=scale,
                                 interpret=self.INTERPRET, tiling=SelectTiling(**tiles))

        got = kernel(q, k_cmp, lse, segment_ids)
        want = reference.select(q.astype(jnp.float32), k_cmp.astype(jnp.float32), lse, cfg,
                                segment_ids=segment_ids, scale=scale)
        assert got.shape == want.shape and got.dtype == jnp.int32
        # Both come sorted ascending with -1 last, so equal sets means equal rows.
        np.testing.assert_array_equal(np.asarray(got), np.asarray(want))

    def test_rejects_bad_input(self):
        q = jnp.zeros((1, 64, 4, 16))
        k_cmp = jnp.zeros((1, SMALL.num_compressed(64), 2, 16))
        with pytest.raises(ValueError, match=r"k_cmp must be \[B, Tc, Hkv, Dk\]"):
            compressed_attention(q, k_cmp[:, :2], k_cmp[:, :2], SMALL, interpret=True)
        with pytest.raises(ValueError, match="share one dtype"):
            compressed_attention(q, k_cmp.astype(jnp.bfloat16), k_cmp, SMALL, interpret=True)
        with pytest.raises(ValueError, match="key_block must be a power of 2"):
            compressed_attention(q, k_cmp, k_cmp, SMALL, tiling=Tiling(key_block=48),
                                 interpret=True)
        with pytest.raises(ValueError, match=r"lse must be \[B, T, Hq\]"):
            select_blocks(q, k_cmp, jnp.zeros((1, 64, 2)), SMALL, interpret=True)


class TestCompressedKernelsInterpret(TestCompressedKernels):
    INTERPRET = True


@pytest.mark.parametrize("hq,hkv", [(64, 4), (32, 8)])
@pytest.mark.parametrize("packed", [False, True])
def test_lowers_for_cuda_at_benchmark_shapes(hq, hkv, packed):
    """Compressed forward, dQ, dK/dV and the fused top-n go through the real Pallas -> Triton
    lowering for an H100 at the benchmark's shapes and default tiles."""
    t, d = 8192, 128
    cfg = NSAConfig()
    tc = layout.num_compressed_slots(t, cfg, packed)
    sds = jax.ShapeDtypeStruct
    args = (sds((1, t, hq, d), jnp.bfloat16), sds((1, tc, hkv, d), jnp.bfloat16),
            sds((1, tc, hkv, d), jnp.bfloat16), sds((1, t), jnp.int32))

    def fwd_bwd_select(q, k_cmp, v_cmp, segment_ids):
        segment_ids = segment_ids if packed else None
        f = lambda *x: compressed_attention(*x, cfg, segment_ids=segment_ids)
        (o, lse), vjp = jax.vjp(f, q, k_cmp, v_cmp)
        return o, vjp((o, lse)), select_blocks(q, k_cmp, lse, cfg, segment_ids=segment_ids)

    text = export_for_cuda(fwd_bwd_select, *args).mlir_module()
    for kernel in ("nsa_compressed_fwd", "nsa_compressed_dq", "nsa_compressed_dkv",
                   "nsa_select_topn"):
        assert kernel in text, f"{kernel} missing from the CUDA lowering"
