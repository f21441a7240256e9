"""Mosaic GPU range attention (pallas_kernels.gpu.mosaic.range_attention) against the NSA oracle
(nsa_jax.ops, implementation="reference") and a float32 dense-mask reference: outputs, lse and
gradients.

TestRangeAttention runs compiled on a GPU (skipped elsewhere); TestRangeAttentionInterpret runs
the same cases in Mosaic GPU interpret mode with race detection on CPU. TestRangeLowering lowers
forward and backward for CUDA at the benchmark shapes on CPU (jax.export, nothing allocated).
The other classes check the pure-jnp pieces: range builders, row layout, argument errors.
"""
import contextlib
import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax import export

from nsa_jax import layout, ops
from pallas_kernels.gpu.mosaic import common
from pallas_kernels.gpu.mosaic import range_attention as ra
from tests.helpers.inputs import SMALL, random_segments, rel_err
from tests.helpers.kernels import CompiledOrInterpreted

# Small key tiles, so that tiny shapes still take several steps, refill the rings and run the
# unmasked middle loops.
TILES = ra.Tiling(block_kv=64, stages=2, block_kv_dq=64, block_kv_dkv=64, dkv_splits=1)
# max |error| / max |expected|: 16-bit output rounding and 16-bit P, dS in the matmuls.
TOLERANCE = {jnp.dtype(jnp.bfloat16): 3e-2, jnp.dtype(jnp.float16): 5e-3}


@dataclasses.dataclass(frozen=True)
class Case:
    t: int
    hq: int
    hkv: int
    b: int = 1
    dk: int = 64
    dv: int = 64
    dtype: object = jnp.bfloat16
    docs: int = 1  # documents per row, random boundaries when > 1
    window: int = 24
    tiling: ra.Tiling = TILES


WINDOW_CASES = {
    # Two rows of three documents, T not a multiple of any tile, G = 3, Dk != Dv, the dK/dV
    # rows of each key tile split over 3 programs.
    "g3_docs_dk_ne_dv": Case(b=2, t=37, hq=3, hkv=1, dv=128, docs=3,
                             tiling=dataclasses.replace(TILES, dkv_splits=3)),
    # G = 1 and a window wider than a key tile: the unmasked middle loops of all three kernels
    # run; float16; rings of 3 stages.
    "g1_wide_f16": Case(t=200, hq=1, hkv=1, window=150, dtype=jnp.float16,
                        tiling=dataclasses.replace(TILES, stages=3, stages_dq=3, stages_dkv=3)),
}
COMPRESSED_CASES = {
    # G = 16, packed documents (T // d slots, padding slots at the end), rows that see nothing.
    "g16_docs": Case(t=30, hq=16, hkv=1, docs=2),
}


def random_qkv(key, case, keys):
    kq, kk, kv, kd = jax.random.split(key, 4)
    q = jax.random.normal(kq, (case.b, case.t, case.hq, case.dk), case.dtype)
    k = jax.random.normal(kk, (case.b, keys, case.hkv, case.dk), case.dtype)
    v = jax.random.normal(kv, (case.b, keys, case.hkv, case.dv), case.dtype)
    segments = random_segments(kd, case.b, case.t, case.docs) if case.docs > 1 else None
    return q, k, v, segments


def cotangents(key, outputs):
    leaves, tree = jax.tree.flatten(outputs)
    keys = jax.random.split(key, len(leaves))
    return tree.unflatten([jax.random.normal(k, x.shape, jnp.float32).astype(x.dtype)
                           for k, x in zip(keys, leaves)])


def value_and_grads(fn, q, k, v, key):
    """fn(q, k, v) -> outputs; returns (outputs, (dq, dk, dv)) for random cotangents."""
    outputs, pull = jax.vjp(fn, q, k, v)
    return outputs, pull(cotangents(key, outputs))


def assert_close(got, want, dtype):
    for g, w in zip(jax.tree.leaves(got), jax.tree.leaves(want)):
        assert g.shape == w.shape
        assert rel_err(g, w) < TOLERANCE[jnp.dtype(dtype)]


class TestRangeAttention(CompiledOrInterpreted):
    BACKENDS = ("hopper",)

    def _run(self, fn, *args):
        """jit(fn)(*args), in interpret mode on CPU (asserting no race) or compiled."""
        context = common.abstract_hopper() if self.INTERPRET else contextlib.nullcontext()
        with context:
            out = jax.block_until_ready(jax.jit(fn)(*args))
        if self.INTERPRET:
            assert not common.races_found()
        return out

    def _kernel(self, case, kstart, kend):
        """(q, k, v) -> (o [B, T, Hq, Dv], lse [B, T, Hq]) through the grouped-rows kernel."""
        def fn(q, k, v):
            o_rows, lse_rows = ra.range_attention(
                ra.to_rows(q, case.hkv), k, v, kstart, kend, group=case.hq // case.hkv,
                scale=case.dk ** -0.5, tiling=case.tiling, interpret=self.INTERPRET)
            return ra.from_rows(o_rows, case.t, case.hq), ra.from_rows(lse_rows, case.t, case.hq)
        return fn

    @pytest.mark.parametrize("name", sorted(WINDOW_CASES))
    def test_window_matches_oracle(self, key, name):
        case = WINDOW_CASES[name]
        q, k, v, segments = random_qkv(key, case, case.t)
        cfg = dataclasses.replace(SMALL, window=case.window)
        kstart, kend = ra.window_ranges(layout.document_starts(segments, case.b, case.t),
                                        case.window)
        kernel = lambda q, k, v: self._kernel(case, kstart, kend)(q, k, v)[0]
        oracle = lambda q, k, v: ops.window_attention(q, k, v, cfg, segment_ids=segments,
                                                      implementation="reference")
        grad_key = jax.random.fold_in(key, 1)
        got = self._run(lambda q, k, v: value_and_grads(kernel, q, k, v, grad_key), q, k, v)
        assert_close(got, value_and_grads(oracle, q, k, v, grad_key), case.dtype)

    @pytest.mark.parametrize("name", sorted(COMPRESSED_CASES))
    def test_compressed_matches_oracle(self, key, name):
        case = COMPRESSED_CASES[name]
        slots = layout.num_compressed_slots(case.t, SMALL, case.docs > 1)
        q, k_cmp, v_cmp, segments = random_qkv(key, case, slots)
        kstart, kend = ra.compressed_ranges(
            layout.compressed_layout(segments, case.b, case.t, SMALL).start,
            layout.document_starts(segments, case.b, case.t), SMALL.compress_block)
        oracle = lambda q, k, v: ops.compressed_attention(q, k, v, SMALL, segment_ids=segments,
                                                          implementation="reference")
        grad_key = jax.random.fold_in(key, 1)
        (o, lse), (dq, dk, dv) = got = self._run(
            lambda q, k, v: value_and_grads(self._kernel(case, kstart, kend), q, k, v,
                                            grad_key), q, k_cmp, v_cmp)
        want = value_and_grads(oracle, q, k_cmp, v_cmp, grad_key)
        assert_close(got, want, case.dtype)
        empty = np.asarray(want[0][1]) == -np.inf  # rows that see no compressed token
        assert empty.any()
        assert np.all(np.asarray(lse)[empty] == -np.inf)
        assert np.all(np.asarray(o, np.float32)[empty] == 0)
        assert np.all(np.asarray(dq, np.float32)[empty] == 0)

    def test_general_ranges_match_reference(self, key):
        """Ranges from neither branch: S != T, random non-decreasing bounds reaching outside
        [0, S] (clipped), some empty, and P < R / G positions (the rows past them see nothing),
        against the dense reference; head dim 128."""
        case = Case(t=40, hq=3, hkv=1, dk=128, dv=128,
                    tiling=dataclasses.replace(TILES, dkv_splits=None))  # auto: 2 splits
        keys, positions, group = 150, 30, 3
        q, k, v, _ = random_qkv(key, case, keys)
        draws = jax.random.randint(jax.random.fold_in(key, 2), (2, 1, positions), -20, keys + 20)
        kstart = jnp.sort(draws[0], axis=1)
        kend = jnp.sort(jnp.maximum(draws[1], kstart - 5), axis=1)
        grad_key = jax.random.fold_in(key, 1)

        def with_grads(attention):
            fn = lambda q, k, v: attention(q, k, v, kstart, kend, group=group, scale=0.125)
            return lambda q, k, v: value_and_grads(fn, q, k, v, grad_key)

        kernel = functools.partial(ra.range_attention, tiling=case.tiling,
                                   interpret=self.INTERPRET)
        q_rows = ra.to_rows(q, case.hkv)
        got = self._run(with_grads(kernel), q_rows, k, v)
        assert_close(got, with_grads(ra.reference)(q_rows, k, v), case.dtype)
        assert np.all(np.asarray(got[0][1])[:, :, positions * group:] == -np.inf)

    def test_all_empty_gives_zeros(self, key):
        """No row sees anything: o = 0, lse = -inf, every gradient exactly 0."""
        case = Case(t=20, hq=2, hkv=1)
        q, k, v, _ = random_qkv(key, case, 64)
        q_rows = ra.to_rows(q, case.hkv)
        span = jnp.full((1, case.t), 7, jnp.int32)
        got = self._run(lambda q, k, v: value_and_grads(
            lambda q, k, v: ra.range_attention(q, k, v, span, span, group=2, scale=0.125,
                                               tiling=TILES, interpret=self.INTERPRET),
            q, k, v, key), q_rows, k, v)
        (o, lse), grads = got
        assert np.all(np.asarray(lse) == -np.inf)
        for x in (o, *grads):
            assert np.all(np.asarray(x, np.float32) == 0)


class TestRangeAttentionInterpret(TestRangeAttention):
    INTERPRET = True


class TestRangeBuilders:
    """The ranges are exactly the oracle's visibility masks."""

    @staticmethod
    def _as_mask(kstart, kend, keys):
        k = jnp.arange(keys)
        return (k >= kstart[..., None]) & (k < kend[..., None])

    @pytest.mark.parametrize("docs", [1, 4])
    def test_compressed_ranges_are_the_visible_slots(self, key, docs):
        b, t = 3, 150
        segments = random_segments(key, b, t, docs) if docs > 1 else None
        slots = layout.compressed_layout(segments, b, t, SMALL).start
        doc_start = layout.document_starts(segments, b, t)
        kstart, kend = ra.compressed_ranges(slots, doc_start, SMALL.compress_block)
        positions = jnp.broadcast_to(jnp.arange(t), (b, t))
        visible = layout.compressed_visible(slots, positions, doc_start, SMALL) & (slots >= 0)[
            :, None]
        np.testing.assert_array_equal(self._as_mask(kstart, kend, slots.shape[1]), visible)
        assert jnp.all(jnp.diff(kstart, axis=1) >= 0) and jnp.all(jnp.diff(kend, axis=1) >= 0)

    def test_window_ranges_are_the_window(self, key):
        b, t, w = 2, 90, 17
        segments = random_segments(key, b, t, 4)
        doc_start = layout.document_starts(segments, b, t)
        kstart, kend = ra.window_ranges(doc_start, w)
        pos = jnp.arange(t)
        dist = pos[:, None] - pos[None, :]
        same_doc = doc_start[:, :, None] == doc_start[:, None, :]
        np.testing.assert_array_equal(self._as_mask(kstart, kend, t),
                                      same_doc & (dist >= 0) & (dist < w))

    def test_rows_round_trip(self, key):
        q = jax.random.normal(key, (2, 13, 6, 64))
        rows = ra.to_rows(q, 2)
        assert rows.shape == (2, 2, ra.ROW_ALIGN, 64)
        # Row r of KV head h: position r // G, query head h * G + r % G.
        np.testing.assert_array_equal(rows[1, 1, 3 * 7 + 2], q[1, 7, 1 * 3 + 2])
        np.testing.assert_array_equal(rows[:, :, 13 * 3:], 0)
        np.testing.assert_array_equal(ra.from_rows(rows, 13, 6), q)
        np.testing.assert_array_equal(ra.from_rows(rows[..., 0], 13, 6), q[..., 0])


class TestRangeErrors:
    """Bad input raises ValueError naming the argument (checked before any kernel is built)."""

    @staticmethod
    def _call(q_shape=(1, 1, 128, 64), k_shape=(1, 64, 1, 64), v_shape=None, dtype=jnp.bfloat16,
              ranges_shape=(1, 64), group=2, scale=0.125, tiling=None):
        q, k = jnp.zeros(q_shape, dtype), jnp.zeros(k_shape, dtype)
        v = jnp.zeros(v_shape or k_shape, dtype)
        kstart = kend = jnp.zeros(ranges_shape, jnp.int32)
        return ra.range_attention(q, k, v, kstart, kend, group=group, scale=scale, tiling=tiling)

    @pytest.mark.parametrize("kwargs,match", [
        (dict(dtype=jnp.float32), "bfloat16 or float16"),
        (dict(q_shape=(1, 1, 128, 96), k_shape=(1, 64, 1, 96)), "head dim Dk"),
        (dict(v_shape=(1, 64, 1, 320)), "head dim Dv"),
        (dict(q_shape=(1, 1, 100, 64)), "multiple of 128 rows"),
        (dict(k_shape=(1, 64, 2, 64)), "k "),
        (dict(ranges_shape=(2, 64)), "kstart and kend"),
        (dict(group=0), "group"),
        (dict(scale=0.0), "scale"),
        (dict(tiling=ra.Tiling(block_kv=256, stages=4, block_kv_dq=256)), "shared memory"),
    ])
    def test_bad_input(self, kwargs, match):
        with pytest.raises(ValueError, match=match):
            self._call(**kwargs)

    @pytest.mark.parametrize("field,value", [("block_kv", 96), ("stages", 1),
                                             ("block_rows_dkv", 192), ("dkv_splits", 0),
                                             ("dkv_splits", 17)])
    def test_bad_tiling(self, field, value):
        with pytest.raises(ValueError, match=f"Tiling.{field}"):
            ra.Tiling(**{field: value})

    @pytest.mark.parametrize("keys,rows,splits", [
        (511, 8192 * 16, 16),  # compressed branch at 8k, paper shape: 16 programs, capped
        (4095, 65536 * 16, 3),  # compressed at 64k: 128 programs, 3 splits for two waves
        (65536, 65536 * 16, 1),  # window at 64k: 2048 programs already
        (200, 128, 2),  # no more splits than row tiles
    ])
    def test_auto_dkv_splits(self, keys, rows, splits):
        assert ra.Tiling().auto_dkv_splits(keys, rows, num_kv_heads=4, batch=1) == splits
        assert ra.Tiling(dkv_splits=5).auto_dkv_splits(keys, rows, 4, 1) == 5


# Benchmark shapes (issue 15): (Hq, Hkv) paper and small-group, T, keys of the compressed branch
# ((T - l) // d + 1 with l=32, d=16) and of the window (T); B=1, D=128, bf16. Then D = 64 (its
# own default tiles) and Dk != Dv at a small shape.
LOWERING_CASES = [(hq, hkv, t, keys, 128, 128) for hq, hkv in ((64, 4), (32, 8))
                  for t in (8192, 65536) for keys in ((t - 32) // 16 + 1, t)]
LOWERING_CASES += [(8, 2, 1024, 1024, 64, 64), (8, 2, 1024, 61, 64, 128)]


class TestRangeLowering:
    """jax.export to CUDA on CPU (abstract Hopper): the real Pallas -> Mosaic GPU lowering of all
    three kernels, so layout, tile-shape and TMA-box errors surface here. ptxas, register and
    SMEM-capacity errors only show on a GPU (SMEM use is checked in Python by
    Tiling.check_smem). About a minute in all."""

    @pytest.mark.parametrize("hq,hkv,t,keys,dk,dv", LOWERING_CASES)
    def test_forward_and_backward_lower(self, hq, hkv, t, keys, dk, dv):
        sd = jax.ShapeDtypeStruct
        rows = -(-t * (hq // hkv) // ra.ROW_ALIGN) * ra.ROW_ALIGN
        args = (sd((1, hkv, rows, dk), jnp.bfloat16), sd((1, keys, hkv, dk), jnp.bfloat16),
                sd((1, keys, hkv, dv), jnp.bfloat16), sd((1, t), jnp.int32), sd((1, t), jnp.int32))

        def forward_backward(q, k, v, kstart, kend):
            attention = lambda q, k, v: ra.range_attention(q, k, v, kstart, kend,
                                                           group=hq // hkv, scale=dk ** -0.5)
            out, pull = jax.vjp(attention, q, k, v)
            return out, pull(out)

        with common.abstract_hopper():
            module = export.export(jax.jit(forward_backward), platforms=["cuda"])(
                *args).mlir_module()
        assert module.count("@mosaic_gpu") >= 3  # forward, dQ, dK/dV
