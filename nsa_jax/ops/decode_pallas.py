"""The GPU "pallas" implementation of ops.nsa_decode_attention (registered by ops/pallas_gpu.py):
three launches (compressed partials, top-n, selected blocks + window partials), XLA only merging
partials and combining branches. Shapes the Triton lowering cannot take fall back to the xla
implementation (`kernel_supports` says which)."""
from __future__ import annotations

import jax.numpy as jnp

from nsa_jax.config import NSAConfig
from nsa_jax.ops import pallas_gpu
from nsa_jax.ops.decode import (_nsa_decode_xla, combine_branches, group_queries,
                                select_decode_blocks)
from nsa_jax.ops.selection import sorted_block_ids

MIN_ROWS = 16  # Triton dots want >= 16 rows: small groups are padded with zero queries


def _power_of_two(x: int) -> bool:
    return x >= 1 and x & (x - 1) == 0


def compressed_block(slots: int) -> int:
    """The largest power-of-two tile (<= 128) that divides the compressed cache."""
    return next((c for c in (128, 64, 32, 16) if slots % c == 0), 0)


def kernel_supports(q, k, v, k_cmp, k_win, cfg: NSAConfig) -> bool:
    dk, dv, lp, c = q.shape[-1], v.shape[-1], cfg.select_block, k_cmp.shape[1]
    tile = compressed_block(c)
    return (all(_power_of_two(x) and x >= 16 for x in (dk, dv, lp))
            and tile > 0 and tile % (lp // cfg.compress_stride) == 0  # top-n: whole blocks a tile
            and c * cfg.compress_stride >= k.shape[1]  # the top-n reads whole blocks' slots
            and k.shape[1] % lp == 0 and k_win.shape[1] % lp == 0)


def nsa_decode(q, k, v, k_cmp, v_cmp, gates, position, k_win, v_win, cfg, scale, *,
               topn_kernel=True):
    """topn_kernel=False: the top-n in XLA between the kernels instead (benchmark comparison)."""
    from pallas_kernels.gpu import nsa_decode, nsa_decode_select

    if not kernel_supports(q, k, v, k_cmp, k_win, cfg):
        return _nsa_decode_xla(q, k, v, k_cmp, v_cmp, gates, position, k_win, v_win, cfg, scale)
    b, hq, _ = q.shape
    hkv = k.shape[2]
    g = hq // hkv
    rows = max(MIN_ROWS, 1 << (g - 1).bit_length())
    q_g = group_queries(q, hkv)
    q_g = jnp.pad(q_g, [(0, 0), (0, 0), (0, rows - g), (0, 0)])
    interpret = not pallas_gpu.on_gpu()
    common = dict(scale=scale, interpret=interpret)
    position = position.astype(jnp.int32)
    tile = compressed_block(k_cmp.shape[1])
    logits, *partials = nsa_decode.compressed_partials(q_g, k_cmp, v_cmp, position, cfg,
                                                       block_c=tile, **common)
    o_cmp, lse = nsa_decode.merge_partials(*partials)
    if topn_kernel:
        chosen = nsa_decode_select.select_top_n(logits, lse, position, cfg, groups=g,
                                                slots=tile, interpret=interpret)
        indices = sorted_block_ids(chosen)
    else:
        chosen = indices = select_decode_blocks(logits[:, :, :g], lse[:, :, :g], position, cfg,
                                                k.shape[1] // cfg.select_block)
    o_cmp, lse = o_cmp[:, :, :g], lse[:, :, :g]
    m, l, acc = nsa_decode.sparse_partials(q_g, k, v, k_win, v_win, chosen, position, cfg,
                                           **common)
    n = cfg.num_selected
    o_slc = nsa_decode.merge_partials(m[:, :, :n], l[:, :, :n], acc[:, :, :n])[0][:, :, :g]
    o_win = nsa_decode.merge_partials(m[:, :, n:], l[:, :, n:], acc[:, :, n:])[0][:, :, :g]
    outputs = tuple(o.reshape(b, hq, -1).astype(q.dtype) for o in (o_cmp, o_slc, o_win))
    return (combine_branches(gates, outputs, q.dtype),
            {"indices": indices, "lse_cmp": lse.reshape(b, hq)})
