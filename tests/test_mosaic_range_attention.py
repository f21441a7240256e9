"""Mosaic GPU range attention (pallas_kernels.gpu.mosaic.range_attention) against a float32
dense-mask reference and against the NSA oracle (nsa_jax.ops, implementation="reference").

TestRangeAttention runs compiled on a GPU (skipped elsewhere); TestRangeAttentionInterpret runs
the same cases in Mosaic GPU interpret mode with race detection on CPU. TestRangeLowering lowers
the kernels for CUDA at the benchmark shapes on CPU (jax.export), so a layout or shape the Mosaic
GPU compiler rejects fails here; it allocates nothing.
"""
import contextlib
import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax import export

from conftest import SMALL, random_segments, rel_err
from kernel_testing import CompiledOrInterpreted
from nsa_jax import ops
from nsa_jax.ops import layout
from pallas_kernels.gpu.mosaic import common
from pallas_kernels.gpu.mosaic import range_attention as ra

# Small tiles so that the tiny test shapes still take several key steps, ring refills and the
# unmasked middle loop.
SMALL_TILES = ra.RangeTiling(block_kv=64, stages=3, block_kv_dq=64, block_kv_dkv=64)
# Relative error bounds: the 16-bit output rounding plus 16-bit probabilities in P @ V.
TOLERANCE = {jnp.dtype(jnp.bfloat16): 2e-2, jnp.dtype(jnp.float16): 3e-3}


@dataclasses.dataclass(frozen=True)
class Case:
    b: int
    t: int
    hq: int
    hkv: int
    dk: int = 64
    dv: int = 64
    dtype: object = jnp.bfloat16
    docs: int = 1  # documents per row (random boundaries when > 1)
    window: int = 24


CASES = {
    "window_g3_docs_ragged_t": Case(b=2, t=37, hq=3, hkv=1, docs=3),
    "window_g16_wide_f16": Case(b=1, t=21, hq=16, hkv=1, dtype=jnp.float16, window=150),
    "window_g1_dk_ne_dv": Case(b=1, t=150, hq=2, hkv=2, dk=64, dv=128, docs=2, window=70),
}


def inputs(key, case, keys=None):
    kq, kk, kv, kd = jax.random.split(key, 4)
    keys = case.t if keys is None else keys
    q = jax.random.normal(kq, (case.b, case.t, case.hq, case.dk), case.dtype)
    k = jax.random.normal(kk, (case.b, keys, case.hkv, case.dk), case.dtype)
    v = jax.random.normal(kv, (case.b, keys, case.hkv, case.dv), case.dtype)
    segments = random_segments(kd, case.b, case.t, case.docs) if case.docs > 1 else None
    return q, k, v, segments


class TestRangeAttention(CompiledOrInterpreted):

    def _context(self):
        return common.abstract_hopper() if self.INTERPRET else contextlib.nullcontext()

    def _attention(self, q, k, v, kstart, kend, tiling=SMALL_TILES):
        """o [B, T, Hq, Dv], lse [B, T, Hq] through the grouped-rows kernel."""
        b, t, hq, dk = q.shape
        group = hq // k.shape[2]
        fn = jax.jit(lambda q, k, v, kstart, kend: ra.range_attention(
            ra.to_rows(q, k.shape[2]), k, v, kstart, kend, group=group, scale=dk ** -0.5,
            tiling=tiling, interpret=self.INTERPRET))
        with self._context():
            o_rows, lse_rows = fn(q, k, v, kstart, kend)
        if self.INTERPRET:
            assert not common.races_found()
        return ra.from_rows(o_rows, t, hq), ra.from_rows(lse_rows, t, hq)

    @pytest.mark.parametrize("name", sorted(CASES))
    def test_window_matches_oracle(self, key, name):
        case = CASES[name]
        q, k, v, segments = inputs(key, case)
        cfg = dataclasses.replace(SMALL, window=case.window)
        doc_start = layout.document_starts(segments, case.b, case.t)
        o, _ = self._attention(q, k, v, *ra.window_ranges(doc_start, case.window))
        expected = ops.window_attention(q, k, v, cfg, segment_ids=segments,
                                        implementation="reference")
        assert rel_err(o, expected) < TOLERANCE[jnp.dtype(case.dtype)]


class TestRangeAttentionInterpret(TestRangeAttention):
    INTERPRET = True


# Benchmark shapes (issue 15): (Hq, Hkv) paper and small-group; B=1, D=128, bf16, l=32, d=16.
LOWERING_CASES = [(hq, hkv, t, keys) for hq, hkv in ((64, 4), (32, 8)) for t in (8192, 65536)
                  for keys in ((t - 32) // 16 + 1, t)]


class TestRangeLowering:
    """jax.export to CUDA at the benchmark shapes on CPU (abstract Hopper): Mosaic GPU lowering
    errors (layouts, tile shapes, TMA boxes) surface here. ptxas, register and SMEM-capacity
    errors only show on a GPU; SMEM use is checked by RangeTiling.check_smem."""

    @staticmethod
    def _lower(fn, *args):
        with common.abstract_hopper():
            return export.export(jax.jit(fn), platforms=["cuda"])(*args)

    @pytest.mark.parametrize("hq,hkv,t,keys", LOWERING_CASES)
    def test_forward_lowers(self, hq, hkv, t, keys):
        sd = jax.ShapeDtypeStruct
        d = 128
        rows = t * (hq // hkv)
        args = (sd((1, hkv, rows, d), jnp.bfloat16), sd((1, keys, hkv, d), jnp.bfloat16),
                sd((1, keys, hkv, d), jnp.bfloat16), sd((1, t), jnp.int32), sd((1, t), jnp.int32))
        fn = lambda q, k, v, ks, ke: ra.range_attention(q, k, v, ks, ke, group=hq // hkv,
                                                        scale=d ** -0.5)
        exported = self._lower(fn, *args)
        assert "mosaic_gpu" in exported.mlir_module()
