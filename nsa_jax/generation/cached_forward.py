"""The DecoderLM's forward pass through its cache: prefill a batch of prompts, then one token per
sequence per step. Both run the model's own blocks (`DecoderBlock.around`) with the cached
attention of `cached_layers.py` as their token mixer, so nothing of the model is copied or
re-implemented."""
from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from nsa_jax.generation.cache import CacheState, init_state
from nsa_jax.generation.cached_layers import prefill_layer, step_layer


def _through_blocks(model, x, mixer, caches):
    new_caches = []
    for block, cache in zip(model.blocks, caches):
        x, cache = block.around(x, lambda h: mixer(block.attn, h, cache))
        new_caches.append(cache)
    return model.logits(x), tuple(new_caches)


def check_prompts(tokens, lengths, max_len: int):
    if tokens.ndim != 2 or not jnp.issubdtype(tokens.dtype, jnp.integer):
        raise ValueError(f"tokens must be an int array [B, P], got {tokens.dtype} {tokens.shape}")
    if lengths.shape != tokens.shape[:1] or not jnp.issubdtype(lengths.dtype, jnp.integer):
        raise ValueError(f"lengths must be an int array [B] = {tokens.shape[:1]}, got "
                         f"{lengths.dtype} {lengths.shape}")
    if tokens.shape[1] > max_len:
        raise ValueError(f"prompts of {tokens.shape[1]} tokens do not fit max_len={max_len}")


def prefill(model, tokens, lengths, max_len: int):
    """Prompts tokens [B, P] (left-aligned, right-padded; `lengths` [B] real tokens, 1..P) ->
    (logits [B, P, V] float32 as the parallel forward gives them, CacheState for max_len)."""
    check_prompts(tokens, lengths, max_len)
    state = init_state(model.cfg, tokens.shape[0], max_len)
    lengths = lengths.astype(jnp.int32)
    logits, caches = _through_blocks(
        model, model.embed(tokens), lambda attn, h, c: prefill_layer(attn, h, lengths, c),
        state.layers)
    return logits, CacheState(caches, lengths)


def room(model, state: CacheState) -> int | None:
    """Tokens a sequence's cache holds: its full K/V slots S (max_len rounded up to a multiple of
    select_block); None for kind "window", whose ring never fills."""
    return None if model.cfg.attention == "window" else state.layers[0]["k"].shape[1]


def _check_room(position, slots: int) -> None:
    """Outside jit (concrete positions): ValueError for a sequence with no slot left."""
    if isinstance(position, jax.core.Tracer):
        return
    full = np.flatnonzero(np.asarray(position) >= slots)
    if full.size:
        raise ValueError(f"sequence {full[0]} is at position {int(position[full[0]])}, but its "
                         f"cache holds {slots} tokens (max_len rounded up to select_block); "
                         f"prefill with a larger max_len")


def step(model, state: CacheState, tokens, implementation=None):
    """One new token per sequence, tokens [B] int -> (logits [B, V] float32, state).

    A sequence whose cache is full (lengths >= room(model, state)) has no slot for the token:
    outside jit that raises ValueError; under jit its logits are NaN (and stay NaN for every later
    step), so an overflow is never a silently wrong token."""
    position = state.lengths
    slots = room(model, state)
    if slots is not None:
        _check_room(position, slots)
    logits, caches = _through_blocks(
        model, model.embed(tokens[:, None]),
        lambda attn, h, c: step_layer(attn, h, position, c, implementation), state.layers)
    logits = logits[:, 0]
    if slots is not None:
        logits = jnp.where((position < slots)[:, None], logits, jnp.nan)
    return logits, CacheState(caches, position + 1)
