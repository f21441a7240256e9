"""nsa_attention: the three NSA branches combined by per-head gates."""
from __future__ import annotations

import jax

from nsa_jax.branches import combine_branches
from nsa_jax.config import NSAConfig
from nsa_jax.ops import dispatch, validation
from nsa_jax.ops.compression import compress, compressed_attention
from nsa_jax.ops.selection import select, selected_attention
from nsa_jax.ops.window import window_attention


def _pair(name_k, name_v, k, v, default_k, default_v):
    if (k is None) != (v is None):
        raise ValueError(f"{name_k} and {name_v} must be given together (or both left None)")
    return (default_k, default_v) if k is None else (k, v)


def nsa_attention(q, k, v, gates, cfg: NSAConfig, *, k_cmp=None, v_cmp=None, k_win=None,
                  v_win=None, segment_ids=None, scale=None, implementation=None,
                  return_aux=False):
    """Native Sparse Attention: out = g_cmp * o_cmp + g_slc * o_slc + g_win * o_win.

    q [B, T, Hq, Dk], k [B, T, Hkv, Dk], v [B, T, Hkv, Dv], gates [B, T, Hq, 3] in [0, 1] ordered
    (cmp, slc, win) -> [B, T, Hq, Dv] (and, with return_aux, a dict with the selected block
    `indices` [B, T, Hkv, n] and the compressed branch's `lse_cmp` [B, T, Hq]).

    k/v feed the selection branch; k_cmp/v_cmp default to `compress(k)`/`compress(v)` (pass a
    learned compressor's output instead) and k_win/v_win default to k/v (pass the paper's
    independent window K/V there). Block choice is not differentiable: gradients reach q, k, v,
    the compressed K/V and the gates through the branch outputs only (paper eq. 5, nsa_spec.md
    §1). scale defaults to 1/sqrt(Dk).

    implementation goes to every branch op (compress, compressed_attention, the fused
    block_scores + select_blocks of `selection.select`, selected_attention, window_attention),
    each with its own fallbacks (see their docstrings and ops.dispatch.TABLE). Raises ValueError
    for bad arguments.
    """
    validation.check_config(cfg)
    dims = validation.check_qkv(q, k, v)
    validation.expect_shape("gates", gates, (dims.batch, dims.length, dims.q_heads, 3),
                            "[B, T, Hq, 3]")
    validation.check_segment_ids(segment_ids, dims.batch, dims.length)
    dispatch.check_implementation(implementation)
    scale = validation.default_scale(scale, dims.dk)
    if k_cmp is None and v_cmp is None:
        k_cmp = compress(k, cfg, segment_ids=segment_ids, implementation=implementation)
        v_cmp = compress(v, cfg, segment_ids=segment_ids, implementation=implementation)
    k_cmp, v_cmp = _pair("k_cmp", "v_cmp", k_cmp, v_cmp, None, None)
    k_win, v_win = _pair("k_win", "v_win", k_win, v_win, k, v)
    validation.check_qkv(q, k_win, v_win, names=("q", "k_win", "v_win"))

    common = dict(segment_ids=segment_ids, scale=scale, implementation=implementation)
    o_cmp, lse = compressed_attention(q, k_cmp, v_cmp, cfg, **common)
    indices = select(q, k_cmp, lse, cfg, **common)
    o_slc = selected_attention(q, k, v, jax.lax.stop_gradient(indices), cfg, **common)
    o_win = window_attention(q, k_win, v_win, cfg, **common)

    out = combine_branches(gates, (o_cmp, o_slc, o_win), q.dtype)
    return (out, {"indices": indices, "lse_cmp": lse}) if return_aux else out
