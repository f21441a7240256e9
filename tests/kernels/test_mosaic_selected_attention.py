"""Mosaic GPU selected-block attention (pallas_kernels.gpu.mosaic.selected_attention) against the
dense oracle (nsa_jax.ops, implementation="reference"), on outputs and gradients.

TestMosaicSelected runs the kernels compiled on a Hopper GPU (skipped elsewhere);
TestMosaicSelectedInterpret runs the same cases in Mosaic GPU interpret mode on CPU, with race
detection. The lowering tests put the kernels through the real Pallas -> Mosaic GPU lowering for
an H100 at the benchmark shapes; TestTmaAlignment checks the alignment rules interpret mode and
lowering do not (the first GPU run died of a misaligned TMA destination).
"""
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from nsa_jax import ops
from nsa_jax.config import NSAConfig
from nsa_jax.layout import document_starts
from pallas_kernels.gpu.mosaic import common
from pallas_kernels.gpu.mosaic import selected_attention as sa
from tests.helpers.kernels import CompiledOrInterpreted

HUGE_IDS = (2**27, 2**31 - 1)  # id * l' would wrap in int32

# Interpret mode runs each simulated GPU thread as its own XLA CPU program and threads block each
# other at barriers; with async dispatch on a 2-core machine a barrier wait can hold the last CPU
# worker while the thread it waits for is queued (a hang, seen about one run in three). Inline
# dispatch avoids it; the flag only takes effect if no computation ran before this import.
jax.config.update("jax_cpu_enable_async_dispatch", False)


def awkward_indices(rng, doc_start, num_kv_heads, block, n, shared=()):
    """Causal block ids with every case the kernels must survive: -1 slots, repeats, ids of
    blocks after the query and ids past the end (some huge), empty rows, and `shared` block ids
    that every query able to see them selects."""
    b, t = doc_start.shape
    own = (np.arange(t)[None, :] - np.asarray(doc_start)) // block
    out = np.full((b, t, num_kv_heads, n), -1, np.int64)
    for bi, ti, hi in np.ndindex(b, t, num_kv_heads):
        cur = own[bi, ti]
        ids = [cur] + [s for s in shared if s <= cur]
        ids += list(rng.integers(0, cur + 1, rng.integers(0, n)))  # repeats allowed
        draw = rng.random()
        if draw < 0.1:
            ids = []  # nothing selected
        elif draw < 0.2:
            ids += [cur + 1 + rng.integers(0, 3)]  # starts after the query
        elif draw < 0.3:
            ids += [HUGE_IDS[rng.integers(0, 2)]]
        ids = (ids + [-1] * n)[:n]
        out[bi, ti, hi] = rng.permutation(ids)
    return jnp.asarray(out.astype(np.int32))


def select_path_indices(q, k, cfg):
    """Block ids from the real selection path: compress, compressed attention, scores, top-n."""
    k_cmp, v_cmp = ops.compress(k, cfg), ops.compress(k, cfg)
    _, lse = ops.compressed_attention(q, k_cmp, v_cmp, cfg)
    return ops.select_blocks(ops.block_scores(q, k_cmp, lse, cfg), cfg)


CASES = {
    # name: (B, T, Hq, Hkv, Dk, Dv, l', n, dtype, document lengths, tiling, indices)
    # Interpret mode simulates every TMA copy, one per (query, slot): keep the shapes small.
    "g1_docs_l16": (1, 64, 1, 1, 64, 64, 16, 3, jnp.bfloat16, (23, 30, 11),
                    sa.Tiling(compute_wgs=2), "awkward"),
    "g2_batch_docs_unaligned_l64": (2, 80, 2, 1, 64, 64, 64, 2, jnp.bfloat16, (30, 50),
                                    sa.Tiling(compute_wgs=1), "awkward"),
    "g3_dk_ne_dv_f16": (1, 64, 3, 1, 64, 96, 32, 3, jnp.float16, None,
                        sa.Tiling(compute_wgs=2), "awkward"),
    "g4_select_path": (1, 64, 4, 1, 64, 64, 16, 3, jnp.bfloat16, None,
                       sa.Tiling(compute_wgs=2), "select"),
    "g16_shared_l128": (1, 160, 16, 1, 64, 64, 128, 3, jnp.bfloat16, None,
                        sa.Tiling(compute_wgs=2, num_programs=3), "shared"),
}


class TestMosaicSelected(CompiledOrInterpreted):
    BACKENDS = ("hopper",)

    @pytest.mark.parametrize("name", sorted(CASES))
    def test_matches_oracle(self, name, key):
        b, t, hq, hkv, dk, dv, block, n, dtype, docs, tiling, kind = CASES[name]
        keys = jax.random.split(key, 5)
        rng = np.random.default_rng(int(jax.random.randint(keys[4], (), 0, 2**31 - 1)))
        q = jax.random.normal(keys[0], (b, t, hq, dk), dtype)
        k = jax.random.normal(keys[1], (b, t, hkv, dk), dtype)
        v = jax.random.normal(keys[2], (b, t, hkv, dv), dtype)
        cotangent = jax.random.normal(keys[3], (b, t, hq, dv), jnp.float32)
        segment_ids = None
        if docs is not None:
            segment_ids = jnp.asarray(np.repeat(np.arange(len(docs)), docs))[None].repeat(b, 0)
        doc_start = document_starts(segment_ids, b, t)
        cfg = NSAConfig(compress_block=8, compress_stride=4, select_block=block,
                        num_selected=n, num_init_blocks=1, num_local_blocks=1)
        if kind == "select":
            indices = select_path_indices(q.astype(jnp.float32), k.astype(jnp.float32), cfg)
        else:
            indices = awkward_indices(rng, doc_start, hkv, block, n,
                                      shared=(0, 1) if kind == "shared" else ())
        if kind == "shared":  # block 0's tiles are split over programs: several dK/dV runs
            shape = sa.Shape(b, t, hkv, hq // hkv, dk, dv, 2, 1.0, 2, 3, True)
            seg_key = np.asarray(sa.build_items(indices, doc_start, 0, block, shape).seg_key)
            live = seg_key[seg_key != np.iinfo(np.int32).max]
            assert len(live) > len(np.unique(live))
        scale = 0.7 / np.sqrt(dk)

        def value_and_grads(use_kernel, q, k, v, indices, segment_ids):
            if use_kernel:
                ds = None if segment_ids is None else document_starts(segment_ids, b, t)
                f = lambda q, k, v: sa.selected_attention(
                    q, k, v, indices, cfg, doc_start=ds, scale=scale, interpret=self.INTERPRET,
                    tiling=tiling)
            else:
                f = lambda q, k, v: ops.selected_attention(
                    q, k, v, indices, cfg, segment_ids=segment_ids, scale=scale,
                    implementation="reference")
            o, vjp = jax.vjp(f, q, k, v)
            return (o, *vjp(cotangent.astype(o.dtype)))

        run = jax.jit(value_and_grads, static_argnums=0)
        with common.abstract_hopper():
            got = jax.block_until_ready(run(True, q, k, v, indices, segment_ids))
        up = lambda x: x.astype(jnp.float32)
        want = run(False, up(q), up(k), up(v), indices, segment_ids)
        if self.INTERPRET:
            assert not common.races_found()
        assert got[0].shape == (b, t, hq, dv) and got[0].dtype == dtype
        for label, x, y in zip(("o", "dq", "dk", "dv"), got, want):
            x, y = up(x), up(y)
            err = float(jnp.linalg.norm(x - y) / jnp.linalg.norm(y))
            assert err < 3e-2, f"{label}: relative L2 error {err:.2e}"
        self._check_empty_rows(got, want, indices, doc_start, block, hq // hkv)

    @staticmethod
    def _check_empty_rows(got, want, indices, doc_start, block, group):
        """Queries with no visible key: exactly 0 output and 0 dq."""
        t = indices.shape[1]
        own = ((jnp.arange(t)[None] - doc_start) // block)[..., None, None]
        visible = jnp.any((indices >= 0) & (indices <= own), axis=-1)  # [B, T, Hkv]
        rows = np.repeat(np.asarray(~visible), group, axis=2)
        if rows.any():
            assert float(jnp.abs(got[0][rows]).max()) == 0.0
            assert float(jnp.abs(got[1][rows]).max()) == 0.0
            assert float(jnp.abs(want[0][rows]).max()) == 0.0

    def test_rejects_bad_input(self):
        cfg = NSAConfig(select_block=16, num_selected=4)
        q = jnp.zeros((1, 32, 4, 64), jnp.bfloat16)
        idx = jnp.zeros((1, 32, 2, 4), jnp.int32)
        kv = jnp.zeros((1, 32, 2, 64), jnp.bfloat16)
        with pytest.raises(ValueError, match="16-bit"):
            sa.selected_attention(q.astype(jnp.float32), kv.astype(jnp.float32),
                                  kv.astype(jnp.float32), idx, cfg)
        with pytest.raises(ValueError, match="multiple of KV heads"):
            sa.selected_attention(q, kv[:, :, :1].repeat(3, 2), kv[:, :, :1].repeat(3, 2),
                                  idx[:, :, :1].repeat(3, 2), cfg)
        with pytest.raises(ValueError, match="indices must be int32"):
            sa.selected_attention(q, kv, kv, idx.astype(jnp.float32), cfg)
        with pytest.raises(ValueError, match="doc_start"):
            sa.selected_attention(q, kv, kv, idx, cfg, doc_start=jnp.zeros((1, 31), jnp.int32))
        with pytest.raises(ValueError, match="SMEM"):
            wide = jnp.zeros((1, 32, 2, 512), jnp.bfloat16)
            sa.selected_attention(jnp.zeros((1, 32, 4, 512), jnp.bfloat16), wide, wide, idx, cfg)
        with pytest.raises(ValueError, match="compute_wgs"):
            sa.Tiling(compute_wgs=3)

    def test_ops_entry_point_rejects_what_supports_rejects(self):
        cfg = NSAConfig(select_block=16, num_selected=4)
        idx = jnp.zeros((1, 32, 1, 4), jnp.int32)
        kv = jnp.zeros((1, 32, 1, 64), jnp.bfloat16)
        assert sa.supports(jnp.zeros((1, 32, 64, 64), jnp.bfloat16), kv, kv, idx, cfg)
        for q, k in [(jnp.zeros((1, 32, 2, 64), jnp.float32), kv.astype(jnp.float32)),
                     (jnp.zeros((1, 32, 65, 64), jnp.bfloat16), kv),  # G = 65
                     (jnp.zeros((1, 32, 2, 512), jnp.bfloat16), kv.repeat(8, -1))]:  # SMEM
            assert not sa.supports(q, k, k, idx, cfg)
            with pytest.raises(ValueError, match="Mosaic selected-attention kernels need"):
                sa.selected_attention_op(q, k, k, idx, cfg)


class TestMosaicSelectedInterpret(TestMosaicSelected):
    INTERPRET = True


def test_index_is_int32_safe_at_long_context():
    """Positions past 2**31 / (Hq * D) and ids whose offset id * l' wraps in int32: the index of a
    late query chunk matches a numpy int64 computation of visible key ranges."""
    t, block, n = 2**31 // (64 * 128) + 4096, 64, 4
    t0, tq = t - 64, 64
    shape = sa.Shape(1, t, 1, 16, 128, 128, 1, 1.0, 2, 4, True)
    pos = t0 + np.arange(tq)
    own = pos // block
    ids = np.stack([own, own - 5, np.full(tq, 2**27), own - 3000], -1).astype(np.int32)
    ids[::7, 1] = -1
    items = sa.build_items(jnp.asarray(ids)[None, :, None], jnp.zeros((1, tq), jnp.int32), t0,
                           block, shape)
    meta, rows = np.asarray(items.meta), np.asarray(items.rows)
    count = int(np.asarray(items.work)[-1])
    got = set()
    for i in range(count):
        tile = int(meta[i, 1])
        for w in range(2):
            for e in range(4):  # 64 // G positions per warpgroup
                lo, hi = rows[i, 0, w, e * 16], rows[i, 1, w, e * 16]
                if lo <= hi:
                    got.add((int(meta[i, 2 + w * 4 + e]), tile * 64 + int(lo), tile * 64 + int(hi)))
    want = {(int(p), int(j) * block, int(j) * block + block - 1 if j < p // block else int(p))
            for p, row in zip(pos, ids.astype(np.int64)) for j in row if 0 <= j <= p // block}
    assert got == want


def test_segment_sums_follow_tile_keys(key):
    """dK/dV partials of runs that share a tile add up per tile (in a fixed order); unused
    segment slots, whatever they hold, and tiles nobody read give nothing."""
    seg_key = jnp.asarray([0, 0, 0, 2, 5, 5, sa._BIG, sa._BIG], jnp.int32)
    part = jax.random.normal(key, (8, 2, 64, 8), jnp.float32)
    part = part.at[6:].set(jnp.nan)  # never written by the kernel
    got = sa._reduce_segments(part, seg_key, 6)
    summed = np.asarray(part, np.float64).sum(axis=1)
    want = np.zeros((6, 64, 8))
    for s, k in enumerate(np.asarray(seg_key)[:6]):
        want[k] += summed[s]
    np.testing.assert_allclose(np.asarray(got), want, rtol=1e-5, atol=1e-5)


def _export(f, *args):
    with common.abstract_hopper():
        return jax.export.export(jax.jit(f), platforms=["cuda"])(*args).mlir_module()


@pytest.mark.parametrize("t,hq,hkv,wgs,packed,fused", [
    (65536, 64, 4, 2, False, True),  # paper shape
    (8192, 64, 4, 1, True, False),
    (8192, 64, 16, 2, False, True),  # G=4
    (8192, 48, 16, 2, True, True),  # G=3: gathered rows in plain SMEM
    (8192, 16, 16, 2, True, False),  # G=1
])
def test_lowers_for_hopper_at_benchmark_shapes(t, hq, hkv, wgs, packed, fused):
    """Forward and forward+backward through the real Pallas -> Mosaic GPU lowering for an H100
    (also checks every ring fits in shared memory): one kernel forward, then one fused backward
    kernel or a dQ and a dK/dV kernel."""
    d, n = 128, 16
    cfg = NSAConfig(select_block=64, num_selected=n)
    sds = jax.ShapeDtypeStruct
    args = (sds((1, t, hq, d), jnp.bfloat16), sds((1, t, hkv, d), jnp.bfloat16),
            sds((1, t, hkv, d), jnp.bfloat16), sds((1, t, hkv, n), jnp.int32),
            sds((1, t), jnp.int32))
    tiling = sa.Tiling(compute_wgs=wgs, fused_backward=fused)

    def forward(q, k, v, indices, doc_start):
        return sa.selected_attention(q, k, v, indices, cfg, tiling=tiling,
                                     doc_start=doc_start if packed else None)

    def forward_backward(q, k, v, indices, doc_start):
        o, vjp = jax.vjp(lambda q, k, v: forward(q, k, v, indices, doc_start), q, k, v)
        return o, vjp(o)

    kernels = lambda text: len(re.findall(r"mosaic_gpu_v2\(", text))
    assert kernels(_export(forward, *args)) == 1
    assert kernels(_export(forward_backward, *args)) == (2 if fused else 3)


class TestTmaAlignment:
    """Every TMA copy's SMEM start is a multiple of 128 bytes (1024 in swizzled tiles), for every
    group size and warpgroup count the kernels take (module docstring, "TMA alignment")."""

    @pytest.mark.parametrize("wgs", [1, 2])
    def test_every_group_size_is_aligned(self, wgs):
        for g in range(1, sa.ROWS + 1):
            for d in (64, 128, 192):
                shape = sa.Shape(1, 4096, 1, g, d, d, 2, 1.0, wgs, 132, False)
                assert sa.tma_alignment_errors(shape, jnp.bfloat16) == [], (g, d)
                meta_bytes = sa._meta_width(shape) * 4
                assert meta_bytes % sa.TMA_ALIGN == 0 and meta_bytes >= 4 * (2 + wgs * (64 // g))
                starts = [r * g for r in range(shape.per_wg + 1)]  # positions, then spare rows
                if shape.aligned_rows:  # swizzled: whole 8-row (1 KiB) atoms
                    assert all(row % 8 == 0 for row in starts)
                else:  # plain SMEM rows of d * 2 bytes
                    assert all(row * d * 2 % sa.TMA_ALIGN == 0 for row in starts)

    def test_unpadded_head_dim_is_reported(self):
        shape = sa.Shape(1, 64, 1, 4, 96, 64, 1, 1.0, 2, 2, False)
        assert sa.tma_alignment_errors(shape, jnp.bfloat16)
