"""Prefill and one decoding step of an attention layer, with the layer's own modules and
parameters: NSAAttention (three branches over the cache of `cache.py`) and DenseAttention
("full" / "window")."""
from __future__ import annotations

import jax
import jax.numpy as jnp

from nsa_jax.generation.cache import write_ring, write_slots
from nsa_jax.layers import NSAAttention
from nsa_jax.ops import dense_decode_attention, nsa_decode_attention


def prefill_layer(attn, x, lengths, cache: dict):
    """x [B, P, d_model] (prompts right-padded, `lengths` [B] real tokens) -> (y, cache): y is the
    layer's parallel (training) output; the cache receives the real tokens."""
    batch, length = x.shape[:2]
    positions = jnp.broadcast_to(jnp.arange(length, dtype=jnp.int32), (batch, length))
    cache = dict(cache)
    if not isinstance(attn, NSAAttention):
        q, k, v = attn.project(x, positions)
        _write_kv(cache, ("k", "v"), (k, v), positions, lengths)
        return attn.attend(q, k, v)[0], cache
    p = attn.project(x, positions)
    k_cmp, v_cmp = attn.compress(p.k_cmp_raw, p.v_cmp_raw)
    _write_kv(cache, ("k", "v"), (p.k, p.v), positions, lengths)
    _write_kv(cache, ("pending_k", "pending_v"), (p.k_cmp_raw, p.v_cmp_raw), positions, lengths)
    if p.k_win is not None:
        _write_kv(cache, ("k_win", "v_win"), (p.k_win, p.v_win), positions, lengths)
    slots = jnp.arange(k_cmp.shape[1], dtype=jnp.int32)[None]
    complete = slots < attn.cfg.nsa.num_visible_compressed(lengths - 1)[:, None]
    for name, value in (("k_cmp", k_cmp), ("v_cmp", v_cmp)):
        cache[name] = write_slots(cache[name], value, slots, complete)
    return attn.attend(p, k_cmp, v_cmp)[0], cache


def step_layer(attn, x, position, cache: dict, implementation=None):
    """x [B, 1, d_model] of the token at `position` [B] -> (y [B, 1, d_model], cache)."""
    batch = x.shape[0]
    pos = position[:, None]
    cache = dict(cache)
    if not isinstance(attn, NSAAttention):
        q, k, v = attn.project(x, pos)
        _write_kv(cache, ("k", "v"), (k, v), pos, position + 1)
        o = dense_decode_attention(q[:, 0], cache["k"], cache["v"], position, window=attn.window,
                                   implementation=implementation)
        return attn.out(o.reshape(batch, 1, -1)), cache
    p = attn.project(x, pos)
    _write_kv(cache, ("k", "v"), (p.k, p.v), pos, position + 1)
    _write_kv(cache, ("pending_k", "pending_v"), (p.k_cmp_raw, p.v_cmp_raw), pos, position + 1)
    if p.k_win is not None:
        _write_kv(cache, ("k_win", "v_win"), (p.k_win, p.v_win), pos, position + 1)
    _append_compressed(attn, cache, position)
    nsa = attn.cfg.nsa
    o = nsa_decode_attention(
        p.q[:, 0], cache["k"], cache["v"], cache["k_cmp"], cache["v_cmp"],
        p.gates[:, 0].astype(p.q.dtype), position, nsa, k_win=cache.get("k_win"),
        v_win=cache.get("v_win"),
        implementation=attn.cfg.implementation if implementation is None else implementation)
    return attn.out(o.reshape(batch, 1, -1)), cache


def _write_kv(cache, names, values, positions, lengths):
    for name, value in zip(names, values):
        cache[name] = write_ring(cache[name], value, positions, lengths)


def _append_compressed(attn, cache, position):
    """Compressed token i = (t + 1 - l) / d is complete when its last raw token t arrives: phi of
    the pending window [t - l + 1, t], rotated at i*d, goes to slot i before t attends. A
    sequence completes one every d steps, so phi runs under lax.cond (on GPU a conditional node
    of the step's CUDA graph): most steps skip its gather and matmuls."""
    l, d = attn.cfg.nsa.compress_block, attn.cfg.nsa.compress_stride
    index = jnp.maximum(position + 1 - l, 0) // d
    complete = (position + 1 >= l) & ((position + 1 - l) % d == 0)
    order = (position[:, None] - l + 1 + jnp.arange(l, dtype=jnp.int32)) % l

    def compress(pending):
        window = [jnp.take_along_axis(x, order[:, :, None, None], axis=1) for x in pending]
        return attn.compress(*window, offset=(index * d)[:, None])

    def nothing(pending):
        return tuple(jnp.zeros(x.shape, x.dtype) for x in jax.eval_shape(compress, pending))

    new = jax.lax.cond(jnp.any(complete), compress, nothing,
                       (cache["pending_k"], cache["pending_v"]))
    for name, value in zip(("k_cmp", "v_cmp"), new):
        cache[name] = write_slots(cache[name], value, index[:, None], complete[:, None])
