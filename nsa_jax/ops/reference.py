"""The dense-mask oracle: NSA written as plainly as possible, in float32 (float64 under x64), with
O(T^2) memory. It is the spec in code and the yardstick of every other implementation — small T
only. Every mask is built as a full [T, keys] table from positions, independently of the chunked
gathers of the xla implementation; only the document layout, the NaN-safe softmax and the
selection rule's rank keys (nsa_jax.selection_rule; the top-n here is a sort) are shared.
ops.dispatch.TABLE names these as "reference".
"""
from __future__ import annotations

import functools

import jax
import jax.numpy as jnp

from nsa_jax import layout, selection_rule
from nsa_jax.branches import combine_branches
from nsa_jax.ops.masked_softmax import compute_dtype, masked_softmax_stats, normalise


def _f(x):
    return x.astype(compute_dtype(x))


def whole_sequence(*per_query: int):
    """Decorator for an oracle op whose positional arguments `per_query` are [B, Tq, ...] per query
    row: with query_offset (q holds queries query_offset .. query_offset + Tq - 1 of the sequence
    segment_ids [B, T] spans, `layout.query_layout`), it computes every query of the sequence, the
    shard's rows placed in zeros, and returns the shard's rows. Queries are independent rows, so
    this is exact, and the oracle is O(T^2) either way."""

    def wrap(op):
        @functools.wraps(op)
        def call(*args, segment_ids=None, query_offset=None, **kwargs):
            if query_offset is None:
                return op(*args, segment_ids=segment_ids, **kwargs)
            rows = args[0].shape[1]
            length = layout.sequence_length(rows, segment_ids, query_offset)
            place = lambda x: jax.lax.dynamic_update_slice_in_dim(
                jnp.zeros((x.shape[0], length, *x.shape[2:]), x.dtype), x, query_offset, axis=1)
            args = [place(x) if i in per_query else x for i, x in enumerate(args)]
            out = op(*args, segment_ids=segment_ids, **kwargs)
            return jax.tree.map(
                lambda y: jax.lax.dynamic_slice_in_dim(y, query_offset, rows, axis=1), out)

        return call

    return wrap


def _same_document(segment_ids, b, t):
    """[B, T, T] bool: query and key lie in the same document."""
    doc = layout.document_starts(segment_ids, b, t)
    return doc[:, :, None] == doc[:, None, :]


def _attend(q, k, v, mask_bhts, scale):
    """Grouped softmax attention under an explicit mask [B, Hkv or 1, T, S] -> (o, lse [B,T,Hq])."""
    b, t, hq, _ = q.shape
    hkv = k.shape[2]
    g = hq // hkv
    logits = jnp.einsum("bthd,bshd->bhts", _f(q), jnp.repeat(_f(k), g, axis=2),
                        precision="highest") * scale
    mask = jnp.repeat(mask_bhts, g, axis=1) if mask_bhts.shape[1] == hkv else mask_bhts
    probs, lse = normalise(*masked_softmax_stats(logits, mask))
    o = jnp.einsum("bhts,bshd->bthd", probs, jnp.repeat(_f(v), g, axis=2), precision="highest")
    return o.astype(q.dtype), jnp.moveaxis(lse[..., 0], 1, 2).astype(jnp.float32)


def _slot_windows(segment_ids, b, t, cfg):
    """[B, Tc, T] bool: raw tokens covered by each compressed slot."""
    start = layout.compressed_layout(segment_ids, b, t, cfg).start[:, :, None]
    tok = jnp.arange(t)
    return (start >= 0) & (tok >= start) & (tok < start + cfg.compress_block)


def compress(x, cfg, *, segment_ids=None):
    b, t = x.shape[:2]
    weights = _slot_windows(segment_ids, b, t, cfg).astype(compute_dtype(x)) / cfg.compress_block
    return jnp.einsum("bct,bthd->bchd", weights, _f(x), precision="highest").astype(x.dtype)


def _compressed_mask(segment_ids, b, t, cfg):
    """[B, T, Tc] bool: slot entirely inside the query's document and ending at or before it."""
    windows = _slot_windows(segment_ids, b, t, cfg)  # [B, Tc, T]
    same = _same_document(segment_ids, b, t)  # [B, Tq, Tk]
    tok = jnp.arange(t)
    inside = jnp.all(~windows[:, None] | (same[:, :, None] & (tok <= tok[:, None])[None, :, None]),
                     axis=-1)
    return inside & jnp.any(windows, axis=-1)[:, None]


@whole_sequence(0)
def compressed_attention(q, k_cmp, v_cmp, cfg, *, segment_ids=None, scale):
    b, t = q.shape[:2]
    mask = _compressed_mask(segment_ids, b, t, cfg)[:, None]
    return _attend(q, k_cmp, v_cmp, mask, scale)


def overlap_weights(cfg, num_blocks: int, num_compressed: int | None = None):
    """[i, j]: stride-d chunks shared by compressed token i and selection block j (interval overlap
    of [i*d, i*d + l) and [j*l', (j+1)*l') divided by d), for the first `num_compressed`
    compressed tokens (default: all that start inside the blocks)."""
    if num_compressed is None:
        num_compressed = -(-num_blocks * cfg.select_block // cfg.compress_stride)
    i = jnp.arange(num_compressed)[:, None]
    j = jnp.arange(num_blocks)[None, :]
    lo = jnp.maximum(i * cfg.compress_stride, j * cfg.select_block)
    hi = jnp.minimum(i * cfg.compress_stride + cfg.compress_block, (j + 1) * cfg.select_block)
    return jnp.maximum(hi - lo, 0) // cfg.compress_stride


def block_scores(q, k_cmp, lse, cfg, *, segment_ids=None, scale):
    b, t, hq, _ = q.shape
    hkv = k_cmp.shape[2]
    num_blocks = cfg.num_blocks(t)
    logits = jnp.einsum("bthd,bshd->bths", _f(q), jnp.repeat(_f(k_cmp), hq // hkv, axis=2),
                        precision="highest") * scale
    mask = _compressed_mask(segment_ids, b, t, cfg)[:, :, None] & jnp.isfinite(lse)[..., None]
    probs = jnp.where(mask, jnp.exp(logits - jnp.where(mask, lse[..., None], 0.0)), 0.0)
    index = layout.compressed_layout(segment_ids, b, t, cfg).index  # [B, Tc]
    table = overlap_weights(cfg, num_blocks)
    weights = jnp.where((index >= 0)[..., None], table[jnp.maximum(index, 0)], 0)  # [B, Tc, NB]
    per_head = jnp.einsum("bths,bsn->bthn", probs, weights.astype(probs.dtype), precision="highest")
    return per_head.reshape(b, t, hkv, hq // hkv, num_blocks).sum(3).astype(jnp.float32)


def _top_n_by_sort(scores, local_pos, cfg):
    """The rule's rank keys of scores [..., NB] (queries at document positions local_pos,
    broadcastable to [...]) through a stable full sort, not lax.top_k -> [..., n]."""
    keys = selection_rule.rank_keys(scores, local_pos, cfg)
    short = max(cfg.num_selected - keys.shape[-1], 0)
    keys = jnp.pad(keys, [(0, 0)] * (keys.ndim - 1) + [(0, short)],
                   constant_values=selection_rule.KEY_INVISIBLE)
    order = jnp.argsort(keys, axis=-1, descending=True, stable=True)[..., :cfg.num_selected]
    return selection_rule.chosen_blocks(jnp.take_along_axis(keys, order, axis=-1), order)


def select_blocks(scores, cfg, *, segment_ids=None):
    local_pos = layout.document_positions(segment_ids, *scores.shape[:2])
    return _top_n_by_sort(scores, local_pos[..., None], cfg)


@whole_sequence(0, 2)
def select(q, k_cmp, lse, cfg, *, segment_ids=None, scale):
    stop = jax.lax.stop_gradient
    scores = block_scores(stop(q), stop(k_cmp), stop(lse), cfg, segment_ids=segment_ids,
                          scale=scale)
    return select_blocks(scores, cfg, segment_ids=segment_ids)


@whole_sequence(0, 3)
def selected_attention(q, k, v, indices, cfg, *, segment_ids=None, scale):
    b, t = q.shape[:2]
    doc = layout.document_starts(segment_ids, b, t)
    key_block = (jnp.arange(t) - doc) // cfg.select_block  # [B, Tk]
    chosen = jnp.any(indices[..., None] == jnp.arange(cfg.num_blocks(t)), axis=-2)  # [B,T,Hkv,NB]
    picked = jnp.take_along_axis(chosen, key_block[:, None, None, :], axis=-1)  # [B,Tq,Hkv,Tk]
    causal = jnp.arange(t)[None, :] <= jnp.arange(t)[:, None]
    mask = picked & (_same_document(segment_ids, b, t) & causal)[:, :, None]
    return _attend(q, k, v, jnp.moveaxis(mask, 2, 1), scale)[0]


@whole_sequence(0)
def window_attention(q, k, v, cfg, *, segment_ids=None, scale):
    b, t = q.shape[:2]
    dist = jnp.arange(t)[:, None] - jnp.arange(t)[None, :]
    mask = _same_document(segment_ids, b, t) & (dist >= 0) & (dist < cfg.window)
    return _attend(q, k, v, mask[:, None], scale)[0]


def nsa_decode(q, k, v, k_cmp, v_cmp, gates, position, cfg, *, k_win, v_win, scale):
    """One query per sequence at `position` over the cache laid out as ops.decode_attention says,
    every mask a full [B, slots] table from token positions."""
    b, hq, _ = q.shape
    hkv, lp, t = k.shape[2], cfg.select_block, position[:, None]
    q1 = q[:, None]  # [B, 1, Hq, Dk]: the parallel oracle's layout with one query
    seen = jnp.arange(k_cmp.shape[1]) * cfg.compress_stride + cfg.compress_block - 1 <= t
    o_cmp, lse = _attend(q1, k_cmp, v_cmp, seen[:, None, None], scale)
    lse = lse[:, 0]  # [B, Hq]
    logits = jnp.einsum("bhd,bshd->bhs", _f(q), jnp.repeat(_f(k_cmp), hq // hkv, axis=2),
                        precision="highest") * scale
    usable = seen[:, None] & jnp.isfinite(lse)[..., None]
    probs = jnp.where(usable, jnp.exp(logits - jnp.where(usable, lse[..., None], 0.0)), 0.0)
    num_blocks = k.shape[1] // lp
    weights = overlap_weights(cfg, num_blocks, k_cmp.shape[1]).astype(probs.dtype)
    scores = jnp.einsum("bhs,sn->bhn", probs, weights, precision="highest")
    scores = scores.reshape(b, hkv, hq // hkv, num_blocks).sum(2).astype(jnp.float32)
    indices = _top_n_by_sort(scores, t, cfg)  # [B, Hkv, n]
    slot = jnp.arange(k.shape[1])  # full cache: slot s holds token s
    chosen = jnp.any(indices[..., None] == slot // lp, axis=-2)  # [B, Hkv, S]
    o_slc = _attend(q1, k, v, (chosen & (slot <= t)[:, None])[:, :, None], scale)[0]
    ring = jnp.arange(k_win.shape[1])  # ring slot r holds the latest token p <= t, p = r mod R
    token = t - (t - ring) % k_win.shape[1]
    in_window = (token >= 0) & (token > t - cfg.window)
    o_win = _attend(q1, k_win, v_win, in_window[:, None, None], scale)[0]
    outputs = tuple(o[:, 0] for o in (o_cmp, o_slc, o_win))
    return combine_branches(gates, outputs, q.dtype), {"indices": indices, "lse_cmp": lse}
