"""The generation cache: its layout, its allocation and the two ways of writing into it.

Sequences are left-aligned: token p of sequence b is at position p (RoPE angle p) and sequences
of one batch may hold different numbers of tokens (`CacheState.lengths`). Per layer (a dict):

  every kind  k, v            [B, S, Hkv, D]  token p in slot p (k rotated at p); S = max_len
                                              rounded up to a multiple of select_block.
                                              For kind "window" a ring of R slots instead.
  "nsa"       k_cmp, v_cmp    [B, C, Hkv, D]  compressed token i in slot i (k_cmp rotated at i*d),
                                              C = S // d rounded up to a multiple of
                                              min(128, its next power of 2): whole tiles
                                              of the decode kernels' compressed pass
              pending_k/_v    [B, l, Hkv, D]  raw pre-RoPE K/V that phi compresses (the
                                              compression branch's own with separate K/V): ring of
                                              the last l tokens, token p in slot p % l
              k_win, v_win    [B, R, Hkv, D]  only with separate branch K/V: ring of the last R
                                              tokens (R = window rounded up to select_block, at
                                              most S); otherwise the window reads k, v.

Slots a sequence has not reached hold anything finite (zeros, or K/V of prompt padding); the
attention ops mask them by position, and they are overwritten when the sequence gets there.
"""
from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp

from nsa_jax.config import ModelConfig, require_int

COMPRESSED_TILE = 128  # the decode kernels' largest compressed tile


class CacheState(NamedTuple):
    layers: tuple  # one dict of cache arrays per layer (layout: module docstring)
    lengths: jax.Array  # [B] int32: tokens held per sequence = position of its next token


def _round_up(x: int, multiple: int) -> int:
    return -(-x // multiple) * multiple


def cache_sizes(cfg: ModelConfig, max_len: int) -> dict:
    """Slots of each buffer for sequences of up to max_len tokens: S (full), C (compressed),
    R (window ring), l (pending)."""
    require_int("max_len", max_len, 1)
    nsa = cfg.nsa
    full = _round_up(max_len, nsa.select_block)
    compressed = full // nsa.compress_stride
    align = min(COMPRESSED_TILE, 1 << max(0, (compressed - 1).bit_length()))
    return {"full": full, "compressed": _round_up(compressed, align),
            "ring": min(full, _round_up(nsa.window, nsa.select_block)),
            "pending": nsa.compress_block}


def init_state(cfg: ModelConfig, batch: int, max_len: int) -> CacheState:
    """An empty cache for `batch` sequences of up to max_len tokens."""
    sizes, dtype = cache_sizes(cfg, max_len), jnp.dtype(cfg.dtype)
    hkv, dk, dv = cfg.num_kv_heads, cfg.head_dim, cfg.v_head_dim

    def pair(slots, names=("k", "v")):
        return {names[0]: jnp.zeros((batch, slots, hkv, dk), dtype),
                names[1]: jnp.zeros((batch, slots, hkv, dv), dtype)}

    if cfg.attention == "window":
        layer = pair(sizes["ring"])
    elif cfg.attention == "full":
        layer = pair(sizes["full"])
    else:
        layer = {**pair(sizes["full"]), **pair(sizes["compressed"], ("k_cmp", "v_cmp")),
                 **pair(sizes["pending"], ("pending_k", "pending_v"))}
        if cfg.separate_branch_kv:
            layer.update(pair(sizes["ring"], ("k_win", "v_win")))
    layers = tuple(dict(layer) for _ in range(cfg.num_layers))
    return CacheState(layers, jnp.zeros((batch,), jnp.int32))


def write_slots(buf, values, slots, keep):
    """buf [B, N, ...] with values [B, P, ...] written at slots [B, P] where keep [B, P]."""
    rows = jnp.arange(buf.shape[0])[:, None]
    slots = jnp.where(keep, slots, buf.shape[1])  # out of range: dropped
    return buf.at[rows, slots].set(values.astype(buf.dtype), mode="drop")


def write_ring(buf, values, positions, lengths):
    """Write tokens at `positions` [B, P] into a ring of buf.shape[1] slots (token p -> slot
    p % R), keeping only the last R tokens of each sequence of `lengths` [B] tokens."""
    ring = buf.shape[1]
    lengths = lengths[:, None]
    keep = (positions < lengths) & (positions >= lengths - ring)
    return write_slots(buf, values, positions % ring, keep)
