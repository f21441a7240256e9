"""Block scores on Hopper (pallas_kernels.gpu.mosaic.block_scores) and the selection rule
(nsa_jax.selection_rule).

TestMosaicBlockScores runs the kernel compiled on a GPU (skipped without one);
TestMosaicBlockScoresInterpret runs the same cases in Mosaic GPU interpret mode on CPU with race
detection. Scores are compared with the dense oracle (ops.block_scores, implementation=
"reference", float32) and selections with a float64 numpy oracle: the chosen set must be a valid
top-n of the float64 scores up to float32 rounding, and exactly the float64 top-n at constructed
near-ties (1e-6 relative) and in issue 16's two replay cases. TestTopNKernel checks the Triton top-n
kernel against lax.top_k. TestLowering compiles the kernels for CUDA on a CPU machine at the
benchmark shapes. TestSelectionRule checks the rank-key rule,
non-finite scores included (issue 20 item 1).
"""
import contextlib
import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax import export

from nsa_jax import ops, selection_rule
from nsa_jax.config import NSAConfig
from nsa_jax import layout
from pallas_kernels.gpu import top_n
from pallas_kernels.gpu.mosaic import block_scores as mosaic
from pallas_kernels.gpu.mosaic import common
from tests.helpers.kernels import CompiledOrInterpreted

F32_ROUNDING = 1e-6  # relative score error allowed when checking a top-n against float64 scores

CASES = {
    # name: (B, T, Hq, Hkv, Dk, (l, d, l', n), slots, document lengths or None, dtype)
    "g1_ragged_t": (1, 203, 2, 2, 64, (8, 4, 8, 4), 32, None, jnp.bfloat16),
    "g3_docs": (1, 256, 3, 1, 64, (8, 4, 8, 5), 32, (37, 90, 129), jnp.bfloat16),
    "g16_docs": (1, 192, 16, 1, 64, (8, 4, 16, 4), 64, (70, 122), jnp.bfloat16),
    "dk128_f16_b2": (2, 160, 4, 2, 128, (16, 8, 16, 4), 32, None, jnp.float16),
    "long_spill_docs": (1, 300, 2, 1, 64, (16, 4, 8, 6), 32, (3, 140, 157), jnp.bfloat16),
}


def config(l, d, lp, n):
    return NSAConfig(compress_block=l, compress_stride=d, select_block=lp, num_selected=n,
                     num_init_blocks=1, num_local_blocks=2)


def segments(lengths, b):
    if lengths is None:
        return None
    ids = np.repeat(np.arange(len(lengths)), lengths).astype(np.int32)
    return jnp.asarray(np.broadcast_to(ids, (b, ids.size)))


def problem(q, k_cmp, cfg, seg, scale=None):
    """The compressed branch's lse, slot starts and document starts for q and k_cmp."""
    b, t = q.shape[:2]
    _, lse = ops.compressed_attention(q, k_cmp, k_cmp, cfg, segment_ids=seg, scale=scale,
                                      implementation="reference")
    return (lse, layout.compressed_layout(seg, b, t, cfg).start,
            layout.document_starts(seg, b, t))


def random_problem(key, b, t, hq, hkv, dk, cfg, docs, dtype):
    kq, kk = jax.random.split(key)
    seg = segments(docs, b)
    q = jax.random.normal(kq, (b, t, hq, dk), jnp.float32).astype(dtype)
    k = jax.random.normal(kk, (b, t, hkv, dk), jnp.float32).astype(dtype)
    k_cmp = ops.compress(k, cfg, segment_ids=seg, implementation="reference")
    return (q, k_cmp, *problem(q, k_cmp, cfg, seg)), seg


def oracle_scores(q, k_cmp, lse, cfg, seg, scale=None):
    """float64 block scores [B, T, Hkv, NB] (numpy; the definition, summed in float64)."""
    b, t, hq, dk = q.shape
    hkv = k_cmp.shape[2]
    scale = dk ** -0.5 if scale is None else scale
    f64 = lambda x: np.asarray(jnp.asarray(x, jnp.float32), np.float64)
    lay = layout.compressed_layout(seg, b, t, cfg)
    start, index = np.asarray(lay.start), np.asarray(lay.index)
    doc = np.asarray(layout.document_starts(seg, b, t))
    visible = ((start[:, None, :] >= doc[:, :, None]) & (start[:, None, :] >= 0)
               & (start[:, None, :] + cfg.compress_block - 1 <= np.arange(t)[None, :, None]))
    logits = np.einsum("bthd,bshd->bths", f64(q), np.repeat(f64(k_cmp), hq // hkv, 2)) * scale
    lse64 = f64(lse)
    use = visible[:, :, None, :] & np.isfinite(lse64)[..., None]
    p = np.where(use, np.exp(np.where(use, logits - np.where(use, lse64[..., None], 0), 0)), 0)
    blocks = np.arange(cfg.num_blocks(t))
    first = index[..., None] * cfg.compress_stride
    shared = (np.minimum(first + cfg.compress_block, (blocks + 1) * cfg.select_block)
              - np.maximum(first, blocks * cfg.select_block))
    weights = np.where(index[..., None] >= 0, np.maximum(shared, 0) // cfg.compress_stride, 0)
    per_head = np.einsum("bths,bsn->bthn", p, weights.astype(np.float64))
    return per_head.reshape(b, t, hkv, hq // hkv, -1).sum(3)


def local_positions(seg, b, t):
    return np.arange(t)[None, :] - np.asarray(layout.document_starts(seg, b, t))


def classes(num_blocks, local, cfg):
    visible, forced = selection_rule.block_classes(num_blocks, local, cfg)
    return np.asarray(visible), np.asarray(forced)


def oracle_top_n(scores64, local, cfg):
    """The rule applied to float64 scores [B, T, H, NB] (finite): [B, T, H, n], -1 padded."""
    b, t, h, nb = scores64.shape
    visible, forced = classes(nb, local, cfg)
    out = np.full((b, t, h, cfg.num_selected), -1, np.int32)
    for bi, ti, hi in np.ndindex(b, t, h):
        cand = [j for j in range(nb) if visible[bi, ti, j]]
        cand.sort(key=lambda j: (not forced[bi, ti, j], -scores64[bi, ti, hi, j], j))
        chosen = sorted(cand[:cfg.num_selected])
        out[bi, ti, hi, :len(chosen)] = chosen
    return out


def assert_valid_top_n(chosen, scores64, local, cfg, tolerance=F32_ROUNDING):
    """chosen [B, T, H, n] is a top-n of scores64 under the rule, up to `tolerance` (relative to
    each row's largest score) between chosen and unchosen free blocks."""
    b, t, h, nb = scores64.shape
    visible, forced = classes(nb, local, cfg)
    for bi, ti, hi in np.ndindex(b, t, h):
        row = chosen[bi, ti, hi]
        ids = row[row >= 0]
        vis, frc = visible[bi, ti], forced[bi, ti]
        assert list(ids) == sorted(set(ids.tolist())) and (row[len(ids):] == -1).all(), row
        assert len(ids) == min(cfg.num_selected, vis.sum()), (bi, ti, hi, row)
        assert vis[ids].all() and set(np.flatnonzero(frc)) <= set(ids.tolist()), (bi, ti, row)
        s = scores64[bi, ti, hi]
        free_in = [j for j in ids if not frc[j]]
        free_out = [j for j in np.flatnonzero(vis & ~frc) if j not in set(ids.tolist())]
        if free_in and free_out:
            gap = max(s[free_out]) - min(s[free_in])
            assert gap <= tolerance * max(s.max(), 1e-30), (bi, ti, hi, row, gap / s.max())


class TestMosaicBlockScores(CompiledOrInterpreted):
    BACKENDS = ("hopper",)

    def scores(self, q, k_cmp, lse, start, doc, cfg, **kwargs):
        """Kernel scores as [B, T, Hkv, NB] numpy (the ops layout)."""
        fn = jax.jit(lambda *a: mosaic.block_scores(*a, cfg, interpret=self.INTERPRET,
                                                    **kwargs))
        with common.abstract_hopper() if self.INTERPRET else contextlib.nullcontext():
            out = np.asarray(fn(q, k_cmp, lse, start, doc))
        if self.INTERPRET:
            assert not common.races_found()
        return out.transpose(0, 2, 1, 3)

    @staticmethod
    def select(scores, local, cfg):
        return np.asarray(selection_rule.select_top_n(scores, local[..., None], cfg))

    @pytest.mark.parametrize("name", sorted(CASES))
    def test_matches_oracle(self, name, key):
        b, t, hq, hkv, dk, hyper, slots, docs, dtype = CASES[name]
        cfg = config(*hyper)
        args, seg = random_problem(key, b, t, hq, hkv, dk, cfg, docs, dtype)
        ours = self.scores(*args, cfg, tiling=mosaic.Tiling(slots, 2, 1))
        want = np.asarray(ops.block_scores(*args[:3], cfg, segment_ids=seg,
                                           implementation="reference"))
        assert ours.shape == want.shape and np.isfinite(ours).all()
        np.testing.assert_allclose(ours, want, rtol=1e-5, atol=1e-5 * np.abs(want).max())
        local = local_positions(seg, b, t)
        assert_valid_top_n(self.select(ours, local, cfg),
                           oracle_scores(*args[:3], cfg, seg), local, cfg)

    def test_query_chunks(self, key):
        """A traced query_start (one kernel for every chunk) gives the rows of the whole call,
        with free-running or ping-ponging warpgroups."""
        cfg = config(8, 4, 8, 4)
        args, _ = random_problem(key, 1, 200, 2, 1, 64, cfg, (50, 150), jnp.bfloat16)
        whole = self.scores(*args, cfg, tiling=mosaic.Tiling(32, 2, 1))
        tiling = mosaic.Tiling(32, 2, 2, schedule="ping_pong")
        fn = jax.jit(lambda first, *a: mosaic.block_scores(
            *a, cfg, query_start=first, num_queries=64, tiling=tiling, interpret=self.INTERPRET))
        with common.abstract_hopper() if self.INTERPRET else contextlib.nullcontext():
            for first in (0, 128):
                part = np.asarray(fn(jnp.int32(first), *args)).transpose(0, 2, 1, 3)
                np.testing.assert_array_equal(part, whole[:, first:first + 64])

    def test_select_chunk(self, key):
        """select in 128-query chunks (the second overlapping the first) picks what one
        whole-sequence chunk picks, a valid top-n of the float64 scores; a chunk off the 64-row
        grid is rejected."""
        cfg = config(8, 4, 8, 4)
        args, seg = random_problem(key, 1, 160, 2, 1, 64, cfg, (60, 100), jnp.bfloat16)
        tiling = mosaic.Tiling(32, 2, 1)
        run = lambda chunk: np.asarray(mosaic.select(
            *args[:3], cfg, segment_ids=seg, tiling=tiling, chunk=chunk,
            interpret=self.INTERPRET))
        with common.abstract_hopper() if self.INTERPRET else contextlib.nullcontext():
            chunked, whole = run(128), run(192)
            with pytest.raises(ValueError, match="chunk"):
                run(100)
        np.testing.assert_array_equal(chunked, whole)
        assert_valid_top_n(chunked, oracle_scores(*args[:3], cfg, seg),
                           local_positions(seg, 1, 160), cfg)

    @pytest.mark.parametrize("schedule", ["alternate", "pipeline"])
    def test_schedules(self, schedule, key):
        """The warpgroup schedules reorder whole matmuls and exp2s, never the float32 adds: the
        same bits as "free" (G=3, three documents, two sub-tiles, masked and skipped ones)."""
        b, t, hq, hkv, dk, hyper, slots, docs, dtype = CASES["g3_docs"]
        cfg = config(*hyper)
        args, _ = random_problem(key, b, t, hq, hkv, dk, cfg, docs, dtype)
        free = self.scores(*args, cfg, tiling=mosaic.Tiling(slots, 2, 1))
        ours = self.scores(*args, cfg, tiling=mosaic.Tiling(slots, 2, 1, schedule=schedule))
        np.testing.assert_array_equal(ours, free)

    def test_near_ties_are_exact(self):
        """Blocks A=3 < B=6 carry the same hot keys; for KV head 0 one of B's keys is nudged so
        that B outscores A by ~1e-6 (relative), for KV head 1 they tie exactly. With one free
        slot (n=4: blocks 0, J-1, J forced) every query past block 7 must take B for head 0
        and A (the lower id) for head 1."""
        cfg = config(8, 4, 8, 4)
        t, dk, nudge_dim = 128, 64, 0
        rng = np.random.default_rng(16)
        hot = np.where(rng.random(dk) < 0.5, -0.5, 0.5)
        hot[nudge_dim] = 0.0
        q = 0.25 * rng.standard_normal((1, t, 4, dk)) + hot
        q[..., nudge_dim] = 1.0
        k_cmp = 0.5 * rng.standard_normal((1, cfg.num_compressed(t), 2, dk))
        for block in (3, 6):  # slots 2j-1, 2j, 2j+1 reach block j (r = 2, l/d = 2)
            k_cmp[0, 2 * block - 1:2 * block + 2] = 4 * hot[None, None, :]
        k_cmp[0, 12, 0, nudge_dim] = 2.0 ** -16  # B's weight-2 slot, head 0 only
        q, k_cmp = jnp.asarray(q, jnp.bfloat16), jnp.asarray(k_cmp, jnp.bfloat16)
        args = (q, k_cmp, *problem(q, k_cmp, cfg, None))
        ours = self.scores(*args, cfg, tiling=mosaic.Tiling(32, 2, 1))
        exact = oracle_scores(*args[:3], cfg, None)
        late = slice(64, t)
        gap = (exact[0, late, 0, 6] - exact[0, late, 0, 3]) / exact[0, late, 0, 6]
        assert (gap > 5e-7).all() and (gap < 2e-6).all(), gap  # the construction is a near-tie
        np.testing.assert_array_equal(ours[0, late, 1, 3], ours[0, late, 1, 6])
        chosen = self.select(ours, local_positions(None, 1, t), cfg)[0, late]
        assert (chosen[:, 0] == 6).any(-1).all() and not (chosen[:, 0] == 3).any()
        assert (chosen[:, 1] == 3).any(-1).all() and not (chosen[:, 1] == 6).any()

    @pytest.mark.parametrize("hyper,t", [((16, 4, 8, 5), 100), ((8, 4, 8, 6), 128)])
    def test_issue16_replays(self, hyper, t, key):
        """The two public-bug replays (Hq=4, Hkv=2, D=16): the selection equals the float64
        top-n, both from the rank-key rule on float64 scores and from the kernel (D=16 padded
        with zeros to the kernel's 64, which leaves every logit unchanged)."""
        cfg = config(*hyper)
        args, _ = random_problem(key, 1, t, 4, 2, 16, cfg, None, jnp.bfloat16)
        exact = oracle_scores(*args[:3], cfg, None)
        local = local_positions(None, 1, t)
        want = oracle_top_n(exact, local, cfg)
        np.testing.assert_array_equal(self.select(exact, local, cfg), want)
        pad = lambda x: jnp.pad(x, ((0, 0), (0, 0), (0, 0), (0, 48)))
        ours = self.scores(pad(args[0]), pad(args[1]), *args[2:], cfg, scale=0.25,
                           tiling=mosaic.Tiling(32, 2, 1))
        np.testing.assert_array_equal(self.select(ours, local, cfg), want)

    def test_rejects_unsupported(self):
        cfg = config(8, 4, 8, 4)
        q = jnp.zeros((1, 64, 2, 16), jnp.bfloat16)
        k_cmp = jnp.zeros((1, 15, 1, 16), jnp.bfloat16)
        lse, start, doc = jnp.zeros((1, 64, 2)), jnp.zeros((1, 15), jnp.int32), jnp.zeros(
            (1, 64), jnp.int32)
        with pytest.raises(ValueError, match="Dk must be a multiple of 64"):
            mosaic.block_scores(q, k_cmp, lse, start, doc, cfg)
        q64, k64 = jnp.zeros((1, 64, 2, 64), jnp.float32), jnp.zeros((1, 15, 1, 64), jnp.float32)
        with pytest.raises(ValueError, match="bfloat16 or float16"):
            mosaic.block_scores(q64, k64, lse, start, doc, cfg)
        with pytest.raises(ValueError, match="lse must be"):
            mosaic.block_scores(q64.astype(jnp.bfloat16), k64.astype(jnp.bfloat16), lse[:, 1:],
                                start, doc, cfg)
        with pytest.raises(ValueError, match="Tiling.slots"):
            mosaic.block_scores(q64.astype(jnp.bfloat16), k64.astype(jnp.bfloat16), lse, start,
                                doc, cfg, tiling=mosaic.Tiling(16, 2, 1))
        with pytest.raises(ValueError, match="query_start"):
            mosaic.block_scores(q64.astype(jnp.bfloat16), k64.astype(jnp.bfloat16), lse, start,
                                doc, cfg, query_start=32)


class TestMosaicBlockScoresInterpret(TestMosaicBlockScores):
    INTERPRET = True


class TestTopNKernel(CompiledOrInterpreted):
    """pallas_kernels.gpu.top_n with the rank keys computed in the kernel picks exactly the
    blocks of select_top_n (lax.top_k on the keys), with either scheme and any group size."""

    CFG = config(8, 4, 8, 6)

    def run(self, scores, local, *, n=6, **kwargs):
        keys = lambda s, p, c: selection_rule.rank_keys(s, p, self.CFG, blocks=c)
        fn = jax.jit(lambda s, p: top_n.top_n(s, p, n, keys, interpret=self.INTERPRET,
                                              **kwargs))
        return np.asarray(selection_rule.chosen_blocks(*fn(scores, local)))

    def want(self, scores, local, n=6):
        cfg = dataclasses.replace(self.CFG, num_selected=n)
        return np.asarray(selection_rule.select_top_n(scores, local, cfg))

    @staticmethod
    def special_scores(rng, shape):
        """Random scores with +-inf, NaN, -0.0 and many equal values."""
        scores = rng.standard_normal(shape).astype(np.float32)
        special = rng.random(shape)
        for value, lo, hi in ((np.inf, 0, .05), (np.nan, .05, .1), (.5, .1, .25),
                              (-np.inf, .25, .3), (-0.0, .3, .33), (0.0, .33, .36)):
            scores[(special >= lo) & (special < hi)] = value
        return scores

    @pytest.mark.parametrize("scheme,group", [("rounds", None), ("groups", None),
                                              ("groups", 2), ("groups", 8)])
    def test_matches_lax_top_k(self, scheme, group):
        """Random rows with non-finite and equal scores, NB not a power of 2 (the block reads
        past it), positions anywhere in the row."""
        rng = np.random.default_rng(6)
        nb = 100
        scores = self.special_scores(rng, (2, 64, nb))
        local = rng.integers(0, nb * 8, (2, 64)).astype(np.int32)
        got = self.run(scores, local, scheme=scheme, group=group)
        np.testing.assert_array_equal(got, self.want(scores, local))

    @pytest.mark.parametrize("n", [6, 16])
    def test_adversarial_rows(self, n):
        """Rows of one repeated score, all -inf, all NaN, +inf everywhere but one column, fewer
        visible blocks than n, a best block per group (every group ties), and scores that
        rise with the block id (the n best in the last groups)."""
        nb, rows = 128, 16
        scores = np.zeros((1, rows, nb), np.float32)
        scores[0, 0] = 1.0
        scores[0, 1] = -np.inf
        scores[0, 2] = np.nan
        scores[0, 3] = np.inf
        scores[0, 3, 77] = 1.0
        scores[0, 4] = np.where(np.arange(nb) % 8 == 5, 2.0, 1.0)
        scores[0, 5] = np.arange(nb, dtype=np.float32)
        scores[0, 6] = -np.arange(nb, dtype=np.float32)
        scores[0, 7] = np.where(np.arange(nb) % 2, np.nan, -np.inf)
        scores[0, 8:] = np.arange(nb, dtype=np.float32)[::-1] % 3
        local = np.full((1, rows), nb * 8 - 1, np.int32)
        local[0, 8:] = [0, 7, 8, 40, 47, 48, 100, 333]  # few visible blocks
        for kwargs in (dict(scheme="rounds"), dict(scheme="groups", group=4)):
            np.testing.assert_array_equal(self.run(scores, local, n=n, **kwargs),
                                          self.want(scores, local, n), err_msg=str(kwargs))

    def test_causal_widths(self):
        """With `width_of`, rows are read to their power-of-2 visible width in segments of 64
        rows (16, 32, 64, 128 columns here): the same blocks as the whole rows."""
        rng = np.random.default_rng(7)
        rows, nb = 448, 120
        scores = self.special_scores(rng, (2, rows, nb))
        pos = np.arange(rows) * 2  # absolute position of row c: 2c, 8 per block
        local = (pos - rng.integers(0, 40, (2, rows))).clip(0).astype(np.int32)
        width_of = lambda end: 2 * (end - 1) // 8 + 1
        widths = [w for _, _, w in top_n._segments(rows, nb, width_of, 6)]
        assert widths == [16, 32, 64, 128], widths
        for scheme in ("groups", "rounds"):
            got = self.run(scores, local, scheme=scheme, width_of=width_of, block_elems=1024)
            np.testing.assert_array_equal(got, self.want(scores, local), err_msg=scheme)


class TestTopNKernelInterpret(TestTopNKernel):
    INTERPRET = True


class TestLowering:
    """jax.export for CUDA on a CPU machine: the real Pallas -> Mosaic GPU lowering."""

    @pytest.mark.parametrize("t,hq,hkv,schedule,slots", [
        (8192, 64, 4, "free", 128), (65536, 64, 4, "free", 128), (8192, 32, 8, "free", 128),
        (65536, 32, 8, "free", 128), (65536, 64, 4, "ping_pong", 128),
        (65536, 64, 4, "alternate", 128), (65536, 64, 4, "pipeline", 128),
        (65536, 32, 8, "pipeline", 64)])
    def test_lowers_at_benchmark_shapes(self, t, hq, hkv, schedule, slots):
        cfg, d = NSAConfig(), 128
        tc = cfg.num_compressed(t)
        spec = jax.ShapeDtypeStruct
        args = (spec((1, t, hq, d), jnp.bfloat16), spec((1, tc, hkv, d), jnp.bfloat16),
                spec((1, t, hq), jnp.float32), spec((1, tc), jnp.int32), spec((1, t), jnp.int32))
        tiling = mosaic.Tiling.for_shape(cfg, d, hq // hkv, jnp.bfloat16, slots, schedule)
        fn = jax.jit(lambda *a: mosaic.block_scores(*a, cfg, query_start=0, num_queries=8192,
                                                    tiling=tiling))
        with common.abstract_hopper():
            exported = export.export(fn, platforms=["cuda"])(*args)
        assert exported.out_avals[0].shape == (1, hkv, 8192, cfg.num_blocks(t))
        assert "mosaic_gpu" in exported.mlir_module()

    @pytest.mark.parametrize("scheme", top_n.SCHEMES)
    def test_top_n_kernel_lowers(self, scheme):
        """T=64k paper shape: 4 KV heads x 65536 rows x 1024 blocks, causal widths."""
        cfg = NSAConfig()
        keys = lambda s, p, c: selection_rule.rank_keys(s, p, cfg, blocks=c)
        width_of = lambda end: (end - 1) // cfg.select_block + 1
        fn = jax.jit(lambda s, p: top_n.top_n(s, p, 16, keys, width_of=width_of,
                                              scheme=scheme))
        spec = jax.ShapeDtypeStruct
        with common.abstract_hopper():
            exported = export.export(fn, platforms=["cuda"], disabled_checks=[
                export.DisabledSafetyCheck.custom_call("__gpu$xla.gpu.triton")])(
                spec((4, 65536, 1024), jnp.float32), spec((4, 65536), jnp.int32))
        assert exported.out_avals[1].shape == (4, 65536, 16)

    def test_default_tiling_fits_smem(self):
        cfg = NSAConfig()
        for dk, g in ((128, 16), (128, 4), (64, 64), (256, 16)):
            tiling = mosaic.Tiling.for_shape(cfg, dk, g, jnp.bfloat16)
            mosaic.check(cfg, tiling, dk, g, jnp.bfloat16)


class TestSelectionRule:
    CFG = config(8, 4, 8, 6)  # issue 20 item 1: l'=8, n=6, 1 initial + 2 local forced

    def select(self, scores, t):
        return np.asarray(selection_rule.select_top_n(jnp.asarray(scores, jnp.float32), t,
                                                      self.CFG)).tolist()

    def test_issue20_non_finite_scores(self):
        s = np.full(10, 0.5)
        s[[2, 4, 6, 7]] = np.inf  # t=79 (block 9): forced 0, 8, 9 keep their slots
        assert self.select(s, 79) == [0, 2, 4, 6, 8, 9]
        s = np.full(10, 0.5)
        s[1] = -np.inf  # t=31 sees blocks 0..3: all four, -inf included
        assert self.select(s, 31) == [0, 1, 2, 3, -1, -1]
        s = np.full(10, 0.5)
        s[[3, 5]] = np.nan  # NaN below every finite score, still selectable when needed
        assert self.select(s, 79) == [0, 1, 2, 4, 8, 9]
        assert self.select(s, 47) == [0, 1, 2, 3, 4, 5]
        s = np.full(10, -np.inf)
        s[9] = np.nan  # forced blocks are taken whatever their score; -inf ties go low
        assert self.select(s, 79) == [0, 1, 2, 3, 8, 9]

    def test_order_ties_and_widths(self):
        s = np.array([0.0, -0.0, 0.0, 1.0, 1.0, 5.0, 5.0, np.inf, 3.0, 2.0])
        # t=79: forced 0, 8, 9; free by score: 7 (+inf), then 5 and 6 (5.0)
        assert self.select(s, 79) == [0, 5, 6, 7, 8, 9]
        s[[5, 6, 7]] = -1.0  # free: 3, 4 (1.0), then -0.0 (block 1) ties +0.0 (block 2)
        assert self.select(s, 79) == [0, 1, 3, 4, 8, 9]
        wide = np.concatenate([s, np.full(5, 7.0)])  # columns past the sequence are invisible
        assert self.select(wide, 79) == [0, 1, 3, 4, 8, 9]
        assert self.select(s[:2], 9) == [0, 1, -1, -1, -1, -1]  # NB < n

    def test_random_against_float64_rule(self):
        rng = np.random.default_rng(20)
        scores = rng.standard_normal((64, 3, 40)).astype(np.float32)
        special = rng.random(scores.shape)
        scores[special < 0.05] = np.inf
        scores[(special >= 0.05) & (special < 0.1)] = -np.inf
        scores[(special >= 0.1) & (special < 0.15)] = np.nan
        scores[(special >= 0.15) & (special < 0.3)] = 0.5  # ties
        local = rng.integers(0, 320, (64,))
        got = np.asarray(selection_rule.select_top_n(jnp.asarray(scores), local[:, None],
                                                     self.CFG))
        visible, forced = classes(40, local[:, None], self.CFG)
        rank = np.where(np.isnan(scores) | (scores == -np.inf), -np.inf, scores)
        for i, h in np.ndindex(64, 3):
            cand = [j for j in range(40) if visible[i, 0, j]]
            cand.sort(key=lambda j: (not forced[i, 0, j], -rank[i, h, j], j))
            want = sorted(cand[:6]) + [-1] * (6 - min(6, len(cand)))
            assert got[i, h].tolist() == want, (i, h, local[i])
