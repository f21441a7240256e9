"""The Pallas decode kernels: interpret mode on CPU against the xla decode path, and the real
Triton lowering for CUDA (jax.export on CPU) at the paper's shape and a 64k context."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from nsa_jax import NSAConfig, ops
from nsa_jax.selection_rule import sorted_block_ids
from nsa_jax.ops import dispatch
from nsa_jax.ops.decode_attention import select_decode_blocks
from pallas_kernels.gpu.triton import decode_attention
from tests.helpers.inputs import rel_err
from tests.helpers.kernels import export_for_cuda

# l != d, l' != l, window not a multiple of l' (its tiles straddle it), n > forced blocks
CFG = NSAConfig(compress_block=8, compress_stride=4, select_block=16, num_selected=4,
                num_init_blocks=1, num_local_blocks=2, window=24)


def _cache(key, cfg, b, slots, hq, hkv, d, ring=None, dtype=jnp.float32):
    ks = jax.random.split(key, 8)
    normal = lambda k, n: jax.random.normal(k, (b, n, hkv, d), dtype)
    compressed = -(-(slots // cfg.compress_stride) // 16) * 16
    args = dict(q=jax.random.normal(ks[0], (b, hq, d), dtype), k=normal(ks[1], slots),
                v=normal(ks[2], slots), k_cmp=normal(ks[3], compressed),
                v_cmp=normal(ks[4], compressed),
                gates=jax.nn.sigmoid(jax.random.normal(ks[5], (b, hq, 3))).astype(dtype))
    if ring is not None:
        args.update(k_win=normal(ks[6], ring), v_win=normal(ks[7], ring))
    return args


def _decode(args, position, implementation):
    fn = jax.jit(lambda a, p: ops.nsa_decode_attention(
        position=p, cfg=CFG, implementation=implementation, return_aux=True, **a))
    return fn(args, position)


@pytest.mark.parametrize("hq,hkv,ring,dtype,slots", [
    (4, 2, None, jnp.float32, 128),  # window reads the full cache; 8 blocks, 32 compressed slots
    (8, 1, 32, jnp.float32, 128),  # the window's own ring of 32 slots, MQA
    (4, 2, 32, jnp.bfloat16, 128),
    (4, 2, None, jnp.float32, 1024),  # 64 blocks: the top-n walks two tiles of 32 blocks
])
def test_interpret_kernel_matches_xla_decode(key, hq, hkv, ring, dtype, slots):
    args = _cache(key, CFG, 3, slots, hq, hkv, 16, ring, dtype)
    # no compressed token yet, a partial selection block, the last slot
    position = jnp.array([5, 70, slots - 1], jnp.int32)
    out, aux = _decode(args, position, "pallas")
    want, want_aux = _decode(args, position, "xla")
    np.testing.assert_array_equal(aux["indices"], want_aux["indices"])
    tolerance = 1e-5 if dtype == jnp.float32 else 2e-2
    assert rel_err(out.astype(jnp.float32), want.astype(jnp.float32)) < tolerance
    assert rel_err(aux["lse_cmp"], want_aux["lse_cmp"]) < tolerance
    assert (np.asarray(want_aux["indices"])[2] >= 0).all()  # 8 blocks, n = 4: a real choice


@pytest.mark.parametrize("cfg", [CFG, NSAConfig(compress_block=16, compress_stride=4,
                                                select_block=8, num_selected=5)])
def test_top_n_kernel_matches_xla_selection(key, cfg):
    """The top-n kernel alone on random logits, at positions around compressed-token, block and
    tile boundaries; padded heads hold peaked logits that must be ignored."""
    b, hkv, g, gp, slots = 8, 2, 3, 16, 1024
    c = slots // cfg.compress_stride
    tile = decode_attention.compressed_tile(c)
    assert c // tile >= 2  # several tiles, so the spill between them is used
    k1, k2 = jax.random.split(key)
    logits = 3 * jax.random.normal(k1, (b, hkv, gp, c))
    logits = logits.at[:, :, g:].multiply(10.0)  # peaked: would change the choice if counted
    position = jnp.concatenate([jnp.array([0, cfg.compress_block - 1, 127, 128, 511, slots - 1]),
                                jax.random.randint(k2, (b - 6,), 0, slots)]).astype(jnp.int32)
    visible = jnp.arange(c) < cfg.num_visible_compressed(position)[:, None, None, None]
    lse = jax.nn.logsumexp(jnp.where(visible, logits, -jnp.inf), axis=-1)
    got = decode_attention.select_top_n(logits, lse, position, cfg, groups=g, slots=tile,
                                        interpret=True)
    want = select_decode_blocks(logits[:, :, :g], lse[:, :, :g], position, cfg,
                                slots // cfg.select_block)
    np.testing.assert_array_equal(sorted_block_ids(got), want)
    assert (np.asarray(want)[5] >= 0).all()  # the last slot: a real choice of n blocks


def test_unsupported_shapes_fall_back_to_xla(key):
    """head_dim 12 is no Triton tile: the pallas implementation must still give the answer."""
    args = _cache(key, CFG, 2, 64, 4, 2, 12)
    position = jnp.array([20, 63], jnp.int32)
    call = [args[n] for n in ("q", "k", "v", "k_cmp", "v_cmp", "gates")] + [position, CFG]
    assert not decode_attention.supports(*call)
    chosen = dispatch.choose("nsa_decode", "pallas", call, {"scale": 0.3}, on="gpu")
    assert chosen == dispatch.DEC + "nsa_decode_xla"
    np.testing.assert_array_equal(_decode(args, position, "pallas")[0],
                                  _decode(args, position, "xla")[0])


@pytest.mark.parametrize("batch", [1, 8])
def test_kernels_lower_for_cuda_at_paper_shape(monkeypatch, batch):
    """Hq=64, Hkv=4, D=128, bf16, 64k context plus room, paper hyper-parameters: the real
    Pallas -> Triton lowering runs on CPU, so shapes the GPU rejects fail here."""
    monkeypatch.setattr(dispatch, "backend", lambda: "gpu")  # compile, not interpret
    cfg = NSAConfig()
    slots, compressed, hq, hkv, d = 65536 + 1024, (65536 + 1024) // 16, 64, 4, 128
    bf16 = lambda *s: jax.ShapeDtypeStruct(s, jnp.bfloat16)
    shapes = (bf16(batch, hq, d), bf16(batch, slots, hkv, d), bf16(batch, slots, hkv, d),
              bf16(batch, compressed, hkv, d), bf16(batch, compressed, hkv, d),
              bf16(batch, hq, 3), jax.ShapeDtypeStruct((batch,), jnp.int32))
    exported = export_for_cuda(
        lambda *a: ops.nsa_decode_attention(*a, cfg, implementation="pallas"), *shapes)
    text = exported.mlir_module()
    assert text.count("__gpu$xla.gpu.triton") >= 3  # all three kernels, not the xla fallback
    assert exported.out_avals[0].shape == (batch, hq, d)


def test_lowering_rejects_a_tile_the_gpu_cannot_take():
    """The CPU lowering check can fail: a 48-token selection block is not a Triton tile."""
    cfg = NSAConfig(compress_block=48, compress_stride=16, select_block=48, num_selected=4)
    bf16 = lambda *s: jax.ShapeDtypeStruct(s, jnp.bfloat16)
    shapes = (bf16(1, 4, 16, 128), bf16(1, 480, 4, 128), bf16(1, 480, 4, 128),
              bf16(1, 480, 4, 128), bf16(1, 480, 4, 128),
              jax.ShapeDtypeStruct((1, 4, 4), jnp.int32), jax.ShapeDtypeStruct((1,), jnp.int32))
    with pytest.raises(Exception, match="power of 2"):
        export_for_cuda(lambda *a: decode_attention.sparse_partials(*a, cfg, scale=0.1), *shapes)


@pytest.mark.parametrize("bad", ["slots", "compressed", "position", "window_pair", "query"])
def test_bad_decode_arguments_raise(key, bad):
    args = _cache(key, CFG, 2, 64, 4, 2, 16)
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
