"""The Pallas decode kernels: interpret mode on CPU against the xla decode path (outputs, chosen
blocks, the compressed LSE and the block scores), at positions on compressed-token, selection-block
and kernel-tile boundaries in one batch, and the real Triton lowering for CUDA (jax.export on
CPU) at the paper's shape."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from nsa_jax import NSAConfig, ops
from nsa_jax.ops import dispatch
from nsa_jax.ops.decode_attention import decode_block_scores, group_queries
from nsa_jax.ops.selection import candidate_scores
from pallas_kernels.gpu.triton import decode_attention
from tests.helpers.inputs import rel_err
from tests.helpers.kernels import DECODE_SHAPES, decode_specs, export_for_cuda

# l != d (compressed tokens overlap, so chunks spill into the next tile's first block), l' != l,
# the window (24) not a multiple of l' (its tiles straddle it), n > forced blocks; l'/d = 4, so a
# 64-slot compressed tile holds the 16 blocks a Triton dot needs.
CFG = NSAConfig(compress_block=8, compress_stride=4, select_block=16, num_selected=4,
                num_init_blocks=1, num_local_blocks=2, window=24)
SLOTS = 1024  # 64 selection blocks, 256 compressed slots


def _cache(key, b, slots, hq, hkv, d, ring=None, dtype=jnp.float32):
    ks = jax.random.split(key, 8)
    normal = lambda k, n: jax.random.normal(k, (b, n, hkv, d), dtype)
    compressed = slots // CFG.compress_stride
    args = dict(q=jax.random.normal(ks[0], (b, hq, d), dtype), k=normal(ks[1], slots),
                v=normal(ks[2], slots), k_cmp=normal(ks[3], compressed),
                v_cmp=normal(ks[4], compressed),
                gates=jax.nn.sigmoid(jax.random.normal(ks[5], (b, hq, 3))).astype(dtype))
    if ring is not None:
        args.update(k_win=normal(ks[6], ring), v_win=normal(ks[7], ring))
    return args


def _boundary_positions(tile: int):
    """One query per sequence (so the batch has different prompt lengths): before the first
    compressed token, the one completing a compressed token, the first and last of a selection
    block, the one that makes the compressed tile full (and the next), the last slot."""
    l, d, lp = CFG.compress_block, CFG.compress_stride, CFG.select_block
    tile_full = (tile - 1) * d + l - 1  # completes compressed token tile - 1
    return jnp.array([l - 2, l - 1 + 5 * d, 20 * lp, 21 * lp - 1, tile_full, tile_full + d,
                      SLOTS - 1], jnp.int32)


def _decode(args, position, implementation, tiling=None):
    if implementation == "kernel":  # the kernel entry itself, with a chosen tiling
        fn = lambda a, p: decode_attention.nsa_decode_attention(
            position=p, cfg=CFG, interpret=True, tiling=tiling, **a)
    else:
        fn = lambda a, p: ops.nsa_decode_attention(
            position=p, cfg=CFG, implementation=implementation, return_aux=True, **a)
    return jax.jit(fn)(args, position)


@pytest.mark.parametrize("hq,hkv,ring,dtype,tiling", [
    (4, 2, None, jnp.float32, None),  # window reads the full cache; 2 tiles of 128 slots
    (8, 1, 32, jnp.float32, decode_attention.Tiling(compressed_tile=64, compressed_splits=2,
                                                    units=2)),  # a ring, MQA, 2 tiles a split
    (4, 2, 32, jnp.bfloat16, decode_attention.Tiling(compressed_tile=64, units=4)),
    (4, 2, None, jnp.float32, decode_attention.Tiling(compressed_splits=1)),  # top-n fused
])
def test_interpret_kernels_match_xla_decode(key, hq, hkv, ring, dtype, tiling):
    args = _cache(key, 7, SLOTS, hq, hkv, 16, ring, dtype)
    position = _boundary_positions((tiling or decode_attention.Tiling()).compressed_tile)
    out, aux = _decode(args, position, "kernel", tiling)
    want, want_aux = _decode(args, position, "xla")
    np.testing.assert_array_equal(aux["indices"], want_aux["indices"])
    tolerance = 1e-5 if dtype == jnp.float32 else 2e-2
    assert rel_err(out.astype(jnp.float32), want.astype(jnp.float32)) < tolerance
    assert rel_err(aux["lse_cmp"], want_aux["lse_cmp"]) < tolerance
    chosen = np.asarray(want_aux["indices"])
    assert (chosen[0, :, 1:] == -1).all() and (chosen[-1] >= 0).all()  # block 0 only / a choice


def test_block_scores_match_the_xla_scores(key):
    """The top-n kernel's scores (block partials per tile, rescaled by exp(mt - lse)) against
    the xla path's probabilities spread over blocks, with forced and later blocks marked: the
    padded heads (G = 2 of 16 rows) and the chunks spilling across tiles must not count."""
    b, hq, hkv, d = 7, 4, 2, 16
    args = _cache(key, b, SLOTS, hq, hkv, d)
    position = _boundary_positions(64)
    tiling = decode_attention.Tiling(compressed_tile=64, compressed_splits=2)
    geo = decode_attention.Geometry.of(args["q"], args["k_cmp"], args["v"], CFG, tiling)
    q_g = jnp.pad(group_queries(args["q"], hkv), ((0, 0), (0, 0), (0, geo.gp - 2), (0, 0)))
    m, l, _, mt, bs = decode_attention.compressed_partials(
        q_g, args["k_cmp"], args["v_cmp"], position, CFG, geo, scale=d ** -0.5, interpret=True)
    lse, scores, _ = decode_attention.select_top_n(m, l, mt, bs, position, CFG, geo,
                                                   interpret=True)
    logits = jnp.einsum("bhgd,bshd->bhgs", group_queries(args["q"], hkv), args["k_cmp"],
                        precision="highest") * d ** -0.5
    want = decode_block_scores(logits, lse[:, :, :2], position, CFG, SLOTS // CFG.select_block)
    want = candidate_scores(want[:, None], position[:, None], CFG)[:, 0]
    got = scores.reshape(b, hkv, -1)[..., :want.shape[-1]]
    assert rel_err(got, want) < 1e-5


def test_unsupported_shapes_fall_back_to_xla(key):
    """head_dim 12 is no Triton tile: the pallas implementation must still give the answer."""
    args = _cache(key, 2, 256, 4, 2, 12)
    position = jnp.array([20, 255], jnp.int32)
    call = [args[n] for n in ("q", "k", "v", "k_cmp", "v_cmp", "gates")] + [position, CFG]
    assert not decode_attention.supports(*call)
    chosen = dispatch.choose("nsa_decode", "pallas", call, {"scale": 0.3}, on="gpu")
    assert chosen == dispatch.DEC + "nsa_decode_xla"
    np.testing.assert_array_equal(_decode(args, position, "pallas")[0],
                                  _decode(args, position, "xla")[0])


def test_small_compressed_tiles_are_refused(key):
    """A 32-slot compressed cache holds 8 selection blocks per tile, fewer than a Triton dot's 16:
    supports() says no and the kernel entry explains it."""
    args = _cache(key, 1, 128, 4, 2, 16)
    call = [args[n] for n in ("q", "k", "v", "k_cmp", "v_cmp", "gates")]
    assert not decode_attention.supports(*call, jnp.array([5], jnp.int32), CFG)
    with pytest.raises(ValueError, match="16 whole selection blocks"):
        decode_attention.nsa_decode_attention(*call, jnp.array([5], jnp.int32), CFG)


@pytest.mark.parametrize("shape", DECODE_SHAPES)
def test_kernels_lower_for_cuda(monkeypatch, shape):
    """The paper's shape at 64k context (batch 1 and 32), and the small model's (G = 4, D = 64)
    with room for new tokens: the real Pallas -> Triton lowering runs on CPU, so shapes the GPU
    rejects fail here."""
    monkeypatch.setattr(dispatch, "backend", lambda: "gpu")  # compile, not interpret
    specs = decode_specs(*shape)
    exported = export_for_cuda(
        lambda *a: ops.nsa_decode_attention(*a, NSAConfig(), implementation="pallas"), *specs)
    assert exported.mlir_module().count("__gpu$xla.gpu.triton") == 4  # not the xla fallback
    assert exported.out_avals[0].shape == specs[0].shape


def test_fused_top_n_lowers_for_cuda():
    """One compressed split per (sequence, KV head) ranks the blocks itself: three launches."""
    fn = lambda *a: decode_attention.nsa_decode_attention(
        *a, NSAConfig(), tiling=decode_attention.Tiling(compressed_splits=1))[0]
    exported = export_for_cuda(fn, *decode_specs(*DECODE_SHAPES[1]))
    assert exported.mlir_module().count("__gpu$xla.gpu.triton") == 3


def test_lowering_rejects_a_tile_the_gpu_cannot_take():
    """The CPU lowering check can fail: a 48-token selection block is not a Triton tile."""
    cfg = NSAConfig(compress_block=48, compress_stride=16, select_block=48, num_selected=4)
    q = jax.ShapeDtypeStruct((1, 16, 128), jnp.bfloat16)
    kv = jax.ShapeDtypeStruct((1, 480, 4, 128), jnp.bfloat16)
    geo = decode_attention.Geometry.of(q, kv, kv, cfg, decode_attention.Tiling())
    bf16 = lambda *s: jax.ShapeDtypeStruct(s, jnp.bfloat16)
    shapes = (bf16(1, 4, 16, 128), kv, kv, kv, kv, jax.ShapeDtypeStruct((1, 4, 4), jnp.int32),
              jax.ShapeDtypeStruct((1,), jnp.int32))
    with pytest.raises(Exception, match="power of 2"):
        export_for_cuda(lambda *a: decode_attention.sparse_partials(*a, cfg, geo, scale=0.1),
                        *shapes)


@pytest.mark.parametrize("bad", ["slots", "compressed", "position", "window_pair", "query"])
def test_bad_decode_arguments_raise(key, bad):
    args = _cache(key, 2, 64, 4, 2, 16)
    position = jnp.array([3, 40], jnp.int32)
    if bad == "slots":  # not a whole number of selection blocks
        args["k"], args["v"] = args["k"][:, :60], args["v"][:, :60]
    elif bad == "compressed":
        args["k_cmp"], args["v_cmp"] = args["k_cmp"][:, :4], args["v_cmp"][:, :4]
    elif bad == "position":
        position = position.astype(jnp.float32)
    elif bad == "window_pair":
        args["k_win"] = args["k"]
    else:
        args["q"] = args["q"][:, None]
    with pytest.raises(ValueError):
        ops.nsa_decode_attention(position=position, cfg=CFG, **args)
