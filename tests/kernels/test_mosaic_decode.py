"""The Mosaic GPU decode pass (pallas_kernels.gpu.mosaic.decode_attention): its partials against
the Triton pass's, the whole step against the xla decode path (interpret mode on CPU with race
detection; compiled on Hopper), and its CUDA lowering at the benchmark shapes."""
import contextlib

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax import export

from nsa_jax import NSAConfig, ops
from nsa_jax.ops.decode_attention import group_queries
from pallas_kernels.gpu.mosaic import common
from pallas_kernels.gpu.mosaic import decode_attention as mosaic
from pallas_kernels.gpu.triton import decode_attention as triton
from tests.helpers.inputs import rel_err
from tests.helpers.kernels import DECODE_SHAPES, CompiledOrInterpreted, decode_specs

CFG = NSAConfig()  # the paper's l=32, d=16, l'=64 (X = 16 slots before each tile), n=16, w=512
SLOTS = 8192  # 512 compressed slots: 4 tiles of 128


def _cache(key, b, hq=8, hkv=2, d=64, dtype=jnp.bfloat16):
    ks = jax.random.split(key, 6)
    normal = lambda k, n: jax.random.normal(k, (b, n, hkv, d), dtype)
    return dict(q=jax.random.normal(ks[0], (b, hq, d), dtype), k=normal(ks[1], SLOTS),
                v=normal(ks[2], SLOTS), k_cmp=normal(ks[3], SLOTS // 16),
                v_cmp=normal(ks[4], SLOTS // 16),
                gates=jax.nn.sigmoid(jax.random.normal(ks[5], (b, hq, 3))).astype(dtype))


# no compressed token yet, one just completed, a selection block's first key, the position that
# fills the first 128-slot tile and the next, a position whose X spill slots start a new tile
# only, the last slot
POSITIONS = jnp.array([20, 31 + 16 * 5, 64 * 40, 127 * 16 + 31, 128 * 16 + 31, 255 * 16 + 31,
                       SLOTS - 1], jnp.int32)


class TestMosaicDecode(CompiledOrInterpreted):
    BACKENDS = ("hopper",)

    def _context(self):
        return common.abstract_hopper() if self.INTERPRET else contextlib.nullcontext()

    @pytest.mark.parametrize("splits", [1, 2])  # 4 tiles through a 2-slot ring; 2 per split
    def test_partials_match_the_triton_pass(self, key, splits):
        args = _cache(key, len(POSITIONS))
        geo = triton.Geometry.of(args["q"], args["k_cmp"], args["v"], CFG,
                                 triton.Tiling(compressed_splits=splits))
        q = jnp.pad(group_queries(args["q"], 2), ((0, 0), (0, 0), (0, geo.gp - 4), (0, 0)))
        run = lambda fn: jax.jit(lambda *a: fn(*a, CFG, geo, scale=0.125,
                                               interpret=self.INTERPRET))(
            q, args["k_cmp"], args["v_cmp"], POSITIONS)
        with self._context():
            got = run(mosaic.compressed_partials)
        if self.INTERPRET:
            assert not common.races_found()
        want = run(triton.compressed_partials)
        for got_x, want_x in zip(got[:3], want[:3]):  # m, l, acc
            assert rel_err(got_x, want_x) < 1e-5
        written = np.asarray(triton.reach(CFG.num_visible_compressed(POSITIONS), geo))
        for row, tiles in enumerate(written):  # mt, bs where written
            for got_x, want_x in zip(got[3:], want[3:]):
                assert rel_err(got_x[row, :, :tiles], want_x[row, :, :tiles]) < 1e-5

    def test_step_matches_xla_decode(self, key):
        args = _cache(key, len(POSITIONS))

        def step(a):
            with self._context():
                return mosaic.nsa_decode_attention(position=POSITIONS, cfg=CFG,
                                                   interpret=self.INTERPRET, **a)

        out, aux = jax.jit(step)(args)
        want, want_aux = jax.jit(lambda a: ops.nsa_decode_attention(
            position=POSITIONS, cfg=CFG, implementation="xla", return_aux=True, **a))(args)
        np.testing.assert_array_equal(aux["indices"], want_aux["indices"])
        assert rel_err(out.astype(jnp.float32), want.astype(jnp.float32)) < 2e-2
        assert rel_err(aux["lse_cmp"], want_aux["lse_cmp"]) < 1e-5


class TestMosaicDecodeInterpreted(TestMosaicDecode):
    INTERPRET = True


def test_supports_16_bit_caches_with_64_wide_heads(key):
    args = _cache(key, 1)
    call = lambda a: [a[n] for n in ("q", "k", "v", "k_cmp", "v_cmp", "gates")] + [
        POSITIONS[:1], CFG]
    assert mosaic.supports(*call(args))
    assert not mosaic.supports(*call({n: x.astype(jnp.float32) for n, x in args.items()}))
    narrow = _cache(key, 1, d=32)
    assert triton.supports(*call(narrow)) and not mosaic.supports(*call(narrow))
    with pytest.raises(ValueError, match="multiples of 64"):
        mosaic.nsa_decode_attention(*call(narrow))


@pytest.mark.parametrize("shape", DECODE_SHAPES)
def test_lowers_for_cuda(shape):
    """The Mosaic pass and the three Triton launches lower on CPU for an H100."""
    specs = decode_specs(*shape)
    fn = jax.jit(lambda *a: mosaic.nsa_decode_attention(*a, NSAConfig())[0])
    with common.abstract_hopper():
        exported = export.export(fn, platforms=["cuda"], disabled_checks=[
            export.DisabledSafetyCheck.custom_call("__gpu$xla.gpu.triton")])(*specs)
    text = exported.mlir_module()
    assert "mosaic_gpu" in text and text.count("__gpu$xla.gpu.triton") == 3
    assert exported.out_avals[0].shape == specs[0].shape
