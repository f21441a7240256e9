"""nsa_attention: the three NSA branches combined by per-head gates."""
from __future__ import annotations

import functools

import jax
import jax.numpy as jnp

from nsa_jax import layout
from nsa_jax.branches import combine_branches
from nsa_jax.config import NSAConfig
from nsa_jax.ops import context_parallel, dispatch, validation
from nsa_jax.ops.compression import check_compressed_args, compress


def _check_pair(name_k, name_v, k, v):
    if (k is None) != (v is None):
        raise ValueError(f"{name_k} and {name_v} must be given together (or both left None)")


def nsa_attention(q, k, v, gates, cfg: NSAConfig, *, k_cmp=None, v_cmp=None, k_win=None,
                  v_win=None, segment_ids=None, scale=None, implementation=None,
                  return_aux=False, context_layout="plain"):
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

    Context parallelism: under a mesh (`jax.set_mesh`) whose `context` axis has N > 1 devices,
    the sequence is split over that axis and every device computes its own queries against
    all-gathered K/V (ops.context_parallel), with the result of one device. context_layout says
    how the sequence axis of every [B, T, ...] argument and result lies over those devices:
    "plain" (natural order) or "zigzag" (causal work balanced; tokens in
    `context_parallel.layout_order` order; k_cmp/v_cmp keep their slot layout). T must then be
    divisible by N ("plain") or 2N ("zigzag") and B by the devices of the other mesh axes.
    Without such a mesh both layouts are natural order.
    """
    validation.check_config(cfg)
    dims = validation.check_qkv(q, k, v)
    validation.expect_shape("gates", gates, (dims.batch, dims.length, dims.q_heads, 3),
                            "[B, T, Hq, 3]")
    validation.check_segment_ids(segment_ids, dims.batch, dims.length)
    dispatch.check_implementation(implementation)
    context_parallel.check_layout(context_layout)
    _check_pair("k_cmp", "v_cmp", k_cmp, v_cmp)
    _check_pair("k_win", "v_win", k_win, v_win)
    if k_cmp is not None:
        check_compressed_args(q, k_cmp, v_cmp, cfg, segment_ids)
    if k_win is not None:
        validation.check_qkv(q, k_win, v_win, names=("q", "k_win", "v_win"))
    static = dict(cfg=cfg, scale=validation.default_scale(scale, dims.dk),
                  implementation=implementation)
    arrays = ((q, gates), (k, v, k_win, v_win, segment_ids), (k_cmp, v_cmp))
    if context_parallel.context_size() > 1:
        out, indices, lse = context_parallel.shard_queries(
            functools.partial(_on_shard, **static), *arrays, context_layout=context_layout)
    else:
        out, indices, lse = _attend(*arrays, None, **static)
    return (out, {"indices": indices, "lse_cmp": lse}) if return_aux else out


def _attend(queries, keys, compressed, query_offset, *, cfg, scale, implementation):
    """(out, indices, lse) of validated arguments: the gated branches of queries (q, gates) at
    query_offset (None: the whole sequence; else see `layout.query_layout`) over keys (k, v, k_win,
    v_win, segment_ids) and compressed (k_cmp, v_cmp), None for the defaults."""
    (q, gates), (k, v, k_win, v_win, segment_ids), (k_cmp, v_cmp) = queries, keys, compressed
    if k_cmp is None:
        k_cmp, v_cmp = (compress(x, cfg, segment_ids=segment_ids, implementation=implementation)
                        for x in (k, v))
    k_win, v_win = (k, v) if k_win is None else (k_win, v_win)
    shard = {} if query_offset is None else {"query_offset": query_offset}

    def run(op, *args):
        return dispatch.run(op, implementation, *args, cfg, segment_ids=segment_ids, scale=scale,
                            **shard)

    o_cmp, lse = run("compressed_attention", q, k_cmp, v_cmp)
    indices = run("select", q, k_cmp, lse)
    o_slc = run("selected_attention", q, k, v, jax.lax.stop_gradient(indices))
    o_win = run("window_attention", q, k_win, v_win)
    return combine_branches(gates, (o_cmp, o_slc, o_win), q.dtype), indices, lse


def _on_shard(queries, keys, compressed, query_offset, *, cfg, **static):
    """`_attend` for one device's queries under context parallelism. A query offset needs
    segment_ids (they give the sequence's length), so an unpacked sequence becomes one document:
    all-zero ids, and k_cmp/v_cmp padded with empty slots from (T - l) // d + 1 to the T // d
    slots of the packed layout, which agrees with the unpacked one on the slots both have."""
    k, v, k_win, v_win, segment_ids = keys
    if segment_ids is None:
        segment_ids = jnp.zeros(k.shape[:2], jnp.int32)
        slots = layout.num_compressed_slots(k.shape[1], cfg, packed=True)
        pad = lambda x: jnp.pad(x, [(0, 0), (0, slots - x.shape[1]), (0, 0), (0, 0)])
        compressed = tuple(None if x is None else pad(x) for x in compressed)
    return _attend(queries, (k, v, k_win, v_win, segment_ids), compressed, query_offset,
                   cfg=cfg, **static)
