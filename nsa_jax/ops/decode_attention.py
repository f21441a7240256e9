"""Decoding: attention of one new query per sequence over a KV cache, for NSA and dense attention.

Cache layout read here (`nsa_jax.generation.cache` builds it): token p of sequence b sits in slot p of a
full cache [B, S, Hkv, D], or in slot p % R of a ring [B, R, Hkv, D] that keeps the last R tokens
(a full cache is the ring with R = S); keys carry RoPE at their position. Compressed token i sits
in slot i of k_cmp / v_cmp [B, C, Hkv, D]. `position` [B] int32 is the new query's position t;
the cache already holds token t and any compressed token that t completes. Slots t may not see
hold anything finite. Row t of the result equals row t of the parallel op (ops.nsa_attention,
jax.nn.dot_product_attention) on the same keys.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp

from nsa_jax.branches import combine_branches
from nsa_jax.config import NSAConfig
from nsa_jax.ops import dispatch, validation
from nsa_jax.ops.masked_softmax import compute_dtype, masked_softmax_stats, normalise
from nsa_jax.ops.selection import overlap_to_blocks, top_n


def nsa_decode_attention(q, k, v, k_cmp, v_cmp, gates, position, cfg: NSAConfig, *, k_win=None,
                         v_win=None, scale=None, implementation=None, return_aux=False):
    """NSA for one new query per sequence: q [B, Hq, Dk], gates [B, Hq, 3] -> [B, Hq, Dv].

    k/v [B, S, Hkv, D]: full cache (selection, and the window unless k_win/v_win are given);
    S must be a multiple of select_block. k_cmp/v_cmp [B, C, Hkv, D]: compressed cache, C >=
    (S - l) // d + 1. k_win/v_win [B, R, Hkv, D]: the window branch's own K/V as a ring of R >=
    window slots. With return_aux also returns {"indices": [B, Hkv, n], "lse_cmp": [B, Hq]}.
    scale defaults to 1/sqrt(Dk).

    implementation: "reference" (dense masks over the cache, float32), "xla", "pallas" (the
    Triton decode kernels, four launches split over the cache, on CPU in interpret mode, GPU and
    Hopper, for bf16/f16/f32 caches with power-of-two head dims, select_block >= 16 and a
    compressed cache of whole kernel tiles of >= 16 selection blocks (generation.cache lays it
    out so); xla otherwise and on TPU; pallas_kernels.gpu.mosaic.decode_attention is the same
    with a Mosaic GPU compressed pass) or None (pallas on GPU/TPU, xla on CPU);
    ops.dispatch.TABLE. Raises ValueError for bad arguments.
    """
    validation.check_config(cfg)
    if (k_win is None) != (v_win is None):
        raise ValueError("k_win and v_win must be given together (or both left None)")
    k_win, v_win = (k, v) if k_win is None else (k_win, v_win)
    b, hq, dk = _check_query(q)
    for names, pair in ((("k", "v"), (k, v)), (("k_cmp", "v_cmp"), (k_cmp, v_cmp)),
                        (("k_win", "v_win"), (k_win, v_win))):
        _check_cache(q, *pair, names)
    s = k.shape[1]
    if s % cfg.select_block:
        raise ValueError(f"k must hold a multiple of select_block={cfg.select_block} slots, got "
                         f"shape {k.shape}")
    if k_cmp.shape[1] < cfg.num_compressed(s):
        raise ValueError(f"k_cmp must hold >= {cfg.num_compressed(s)} compressed slots for a "
                         f"{s}-slot cache, got shape {k_cmp.shape}")
    if k_win.shape[1] < min(cfg.window, s):
        raise ValueError(f"k_win must hold >= min(window, S) = {min(cfg.window, s)} slots, got "
                         f"shape {k_win.shape}")
    validation.expect_shape("gates", gates, (b, hq, 3), "[B, Hq, 3]")
    _check_position(position, b)
    out, aux = dispatch.run("nsa_decode", implementation, q, k, v, k_cmp, v_cmp, gates, position,
                            cfg, k_win=k_win, v_win=v_win,
                            scale=validation.default_scale(scale, dk))
    return (out, aux) if return_aux else out


def dense_decode_attention(q, k, v, position, *, window=None, scale=None, implementation=None):
    """Causal GQA attention of one new query per sequence: q [B, Hq, Dk] over a full cache or a
    ring k/v [B, R, Hkv, D] -> [B, Hq, Dv]; all keys [0, t] (window=None, needs R > t) or the
    last `window` keys [t - window + 1, t].

    implementation: "xla" (dense masks over the cache; also what "reference" runs), "pallas"
    (cuDNN's fused attention with per-sequence key counts on GPU for 16-bit caches, window=None
    and equal head dims <= 256; xla otherwise) or None (pallas on GPU, xla elsewhere);
    ops.dispatch.TABLE. Raises ValueError for bad arguments."""
    b, _, dk = _check_query(q)
    _check_cache(q, k, v, ("k", "v"))
    _check_position(position, b)
    return dispatch.run("dense_decode", implementation, q, k, v, position, window=window,
                        scale=validation.default_scale(scale, dk))


def dense_decode_xla(q, k, v, position, *, window, scale):
    if window is None:
        return _attend_all(q, k, v, jnp.arange(k.shape[1]) <= position[:, None], scale)[0]
    return _attend(q, k, v, *window_slots(position, window, k.shape[1]), scale)


def dense_decode_cudnn(q, k, v, position, *, window, scale):
    """cuDNN's fused attention of the one query over keys [0, t] (window=None only)."""
    return jax.nn.dot_product_attention(q[:, None], k, v, scale=scale,
                                        key_value_seq_lengths=position.astype(jnp.int32) + 1,
                                        implementation="cudnn")[:, 0]


def _check_query(q):
    if not hasattr(q, "shape") or len(q.shape) != 3:
        raise ValueError(f"q must be [B, Hq, Dk] (one new query per sequence), got "
                         f"{getattr(q, 'shape', type(q).__name__)}")
    return q.shape


def _check_cache(q, k, v, names):
    """k [B, N, Hkv, Dk] and v [B, N, Hkv, Dv] that fit q [B, Hq, Dk]."""
    slots = k.shape[1] if len(getattr(k, "shape", ())) == 4 else 0
    validation.check_qkv(q[:, None], k, v, key_length=slots, names=("q", *names))


def _check_position(position, batch: int):
    if not hasattr(position, "dtype") or not jnp.issubdtype(position.dtype, jnp.integer) \
            or position.shape != (batch,):
        raise ValueError(f"position must be an int array [B] = ({batch},), got "
                         f"{getattr(position, 'dtype', type(position).__name__)} "
                         f"{getattr(position, 'shape', '')}")


def window_slots(position, window: int, ring: int):
    """Slots [B, window] of the keys [t - window + 1, t] in a ring of `ring` slots, and whether
    each exists (position >= 0)."""
    key = position[:, None] - window + 1 + jnp.arange(window, dtype=jnp.int32)
    return key % ring, key >= 0


def selected_slots(indices, position, cfg: NSAConfig):
    """Slots [B, Hkv, n * l'] of the selected blocks' keys in the full cache, and which are used:
    a real block (index >= 0) and a key at or before t."""
    b, hkv, n = indices.shape
    lp = cfg.select_block
    key = indices[..., None] * lp + jnp.arange(lp, dtype=jnp.int32)
    use = (indices[..., None] >= 0) & (key <= position[:, None, None, None])
    return jnp.maximum(key, 0).reshape(b, hkv, n * lp), use.reshape(b, hkv, n * lp)


def decode_block_scores(logits, lse, position, cfg: NSAConfig, num_blocks: int):
    """Selection-block scores [B, Hkv, NB] float32 from the compressed logits [B, Hkv, G, C] (any
    value where invisible) and their log-sum-exp [B, Hkv, G], exactly as ops.block_scores scores
    them: probabilities summed over the group, spread over the blocks by overlap."""
    c = logits.shape[-1]
    visible = (jnp.arange(c) < cfg.num_visible_compressed(position)[:, None])[:, None, None]
    visible &= jnp.isfinite(lse)[..., None]
    probs = jnp.exp(jnp.where(visible, logits - jnp.where(visible, lse[..., None], 0.0), -jnp.inf))
    scores = overlap_to_blocks(jnp.sum(probs, axis=2)[:, :, None], None, cfg, num_blocks)
    return scores[:, :, 0].astype(jnp.float32)


def select_decode_blocks(logits, lse, position, cfg: NSAConfig, num_blocks: int):
    """Top-n selection blocks [B, Hkv, n] of `decode_block_scores`, forced blocks included, as
    ops.select_blocks chooses them."""
    scores = decode_block_scores(logits, lse, position, cfg, num_blocks)
    return top_n(scores[:, None], position[:, None], cfg)[:, 0]


def group_queries(q, kv_heads: int):
    """[B, Hq, D] -> [B, Hkv, G, D]: query head h uses KV head h // G."""
    b, hq, d = q.shape
    return q.reshape(b, kv_heads, hq // kv_heads, d)


def _attend_all(q, k, v, use, scale):
    """Softmax attention of q [B, Hq, Dk] over every slot of k/v [B, N, Hkv, D] where `use`
    [B, N] -> (o [B, Hq, Dv], lse [B, Hkv, G], logits [B, Hkv, G, N]). Products in the cache's
    dtype, accumulated in float32 (exact for float32 caches): the cache is never copied."""
    b, hq, _ = q.shape
    cd = compute_dtype(q)
    logits = jnp.einsum("bhgd,bshd->bhgs", group_queries(q.astype(k.dtype), k.shape[2]), k,
                        precision="highest", preferred_element_type=cd) * scale
    probs, lse = normalise(*masked_softmax_stats(logits, use[:, None, None]))
    o = jnp.einsum("bhgs,bshd->bhgd", probs.astype(v.dtype), v, precision="highest",
                   preferred_element_type=cd)
    return o.reshape(b, hq, -1).astype(q.dtype), lse[..., 0], logits


def _attend(q, k, v, slots, use, scale):
    """Softmax attention of q [B, Hq, Dk] over the cache slots [B, K] (all heads) or [B, Hkv, K]
    (per KV head) where `use` -> o [B, Hq, Dv]. Only the gathered slots are cast."""
    b, hq, _ = q.shape
    hkv = k.shape[2]
    cd = compute_dtype(q)
    if slots.ndim == 2:
        slots, use = (jnp.broadcast_to(x[:, None], (b, hkv, x.shape[1])) for x in (slots, use))
    rows, heads = jnp.arange(b)[:, None, None], jnp.arange(hkv)[None, :, None]
    k, v = (x[rows, slots, heads].astype(cd) for x in (k, v))  # [B, Hkv, K, D]
    logits = jnp.einsum("bhgd,bhkd->bhgk", group_queries(q.astype(cd), hkv), k,
                        precision="highest") * scale
    probs, _ = normalise(*masked_softmax_stats(logits, use[:, :, None]))
    o = jnp.einsum("bhgk,bhkd->bhgd", probs, v, precision="highest")
    return o.reshape(b, hq, -1).astype(q.dtype)


def nsa_decode_xla(q, k, v, k_cmp, v_cmp, gates, position, cfg, *, k_win, v_win, scale):
    b, hq, _ = q.shape
    visible = jnp.arange(k_cmp.shape[1]) < cfg.num_visible_compressed(position)[:, None]
    o_cmp, lse, logits = _attend_all(q, k_cmp, v_cmp, visible, scale)
    indices = select_decode_blocks(jax.lax.stop_gradient(logits), lse, position, cfg,
                                   k.shape[1] // cfg.select_block)
    o_slc = _attend(q, k, v, *selected_slots(indices, position, cfg), scale)
    o_win = _attend(q, k_win, v_win, *window_slots(position, cfg.window, k_win.shape[1]), scale)
    outputs = (o_cmp, o_slc, o_win)
    return (combine_branches(gates, outputs, q.dtype),
            {"indices": indices, "lse_cmp": lse.reshape(b, hq)})
