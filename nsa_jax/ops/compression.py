"""Compression branch: compressed tokens (mean pooling over overlapping windows) and attention
over them with offset-causal visibility."""
from __future__ import annotations

import jax.numpy as jnp

from nsa_jax import layout
from nsa_jax.config import NSAConfig
from nsa_jax.ops import dispatch, validation
from nsa_jax.ops.chunking import map_query_chunks
from nsa_jax.ops.masked_softmax import compute_dtype, masked_softmax_stats, normalise


def compression_blocks(x, cfg: NSAConfig, *, segment_ids=None):
    """The raw l-token window behind every compressed slot, for learned compressors phi.

    x [B, T, H, D] -> (blocks [B, Tc, l, H, D], position [B, Tc] int32), where position is the
    document-relative index of the window's first token (i * d) and -1 for padding slots, whose
    blocks are 0. Slot layout: see `nsa_jax.layout`.
    """
    validation.check_config(cfg)
    validation.check_tokens("x", x)
    b, t = x.shape[:2]
    validation.check_segment_ids(segment_ids, b, t)
    lay = layout.compressed_layout(segment_ids, b, t, cfg)
    offsets = jnp.arange(cfg.compress_block, dtype=jnp.int32)
    rows = jnp.clip(lay.start[:, :, None] + offsets, 0, t - 1)  # pads read row 0, zeroed below
    blocks = jnp.take_along_axis(x, rows.reshape(b, -1)[:, :, None, None], axis=1)
    blocks = blocks.reshape(b, lay.start.shape[1], cfg.compress_block, *x.shape[2:])
    valid = (lay.start >= 0)[:, :, None, None, None]
    position = jnp.where(lay.start >= 0, lay.index * cfg.compress_stride, -1)
    return jnp.where(valid, blocks, 0).astype(x.dtype), position


def compress(x, cfg: NSAConfig, *, segment_ids=None, implementation=None):
    """Mean-pooled compressed tokens: x [B, T, H, D] -> [B, Tc, H, D] in x's dtype (Tc and the
    slot layout: see `nsa_jax.layout`). Compressed token i is the mean of tokens
    [i*d, i*d + l - 1] of its document (paper eq. 7 with phi = mean pooling).

    implementation: "reference" (dense oracle) or "xla"; "pallas" and None run "xla" (there is no
    kernel for a strided mean). Raises ValueError for bad arguments.
    """
    validation.check_config(cfg)
    validation.check_tokens("x", x)
    validation.check_segment_ids(segment_ids, *x.shape[:2])
    return dispatch.run("compress", implementation, x, cfg, segment_ids=segment_ids)


def compress_xla(x, cfg, *, segment_ids=None):
    blocks, _ = compression_blocks(x, cfg, segment_ids=segment_ids)
    return jnp.mean(blocks.astype(compute_dtype(x)), axis=2).astype(x.dtype)


def compressed_attention(q, k_cmp, v_cmp, cfg: NSAConfig, *, segment_ids=None, scale=None,
                         implementation=None):
    """Attention of every query over the compressed tokens it may see.

    q [B, T, Hq, Dk], k_cmp [B, Tc, Hkv, Dk], v_cmp [B, Tc, Hkv, Dv] ->
    (o [B, T, Hq, Dv], lse [B, T, Hq] float32). Compressed token i (tokens [i*d, i*d + l - 1]) is
    visible to query t iff i*d + l - 1 <= t, both counted in the query's document (nsa_spec.md
    §2.1). Rows that see nothing (the first l - 1 tokens of every document) give o = 0 and
    lse = -inf, with zero gradients. scale defaults to 1/sqrt(Dk).

    implementation: "reference", "xla", "pallas" (on Hopper the Mosaic GPU range-attention kernels
    for 16-bit inputs with Dk, Dv in {64, 128}, else the Triton kernels; the Triton kernels on other
    GPUs and on CPU in interpret mode; the Mosaic TPU kernels on TPU; xla for dtypes those kernels
    do not take: float64 anywhere, float16 on TPU) or None (pallas on GPU/TPU, xla on CPU);
    ops.dispatch.TABLE. Raises ValueError for bad arguments.
    """
    check_compressed_args(q, k_cmp, v_cmp, cfg, segment_ids)
    return dispatch.run("compressed_attention", implementation, q, k_cmp, v_cmp, cfg,
                        segment_ids=segment_ids,
                        scale=validation.default_scale(scale, q.shape[-1]))


def check_compressed_args(q, k_cmp, v_cmp, cfg, segment_ids):
    validation.check_config(cfg)
    t = getattr(q, "shape", (0, 0))[1] if len(getattr(q, "shape", ())) == 4 else 0
    slots = layout.num_compressed_slots(t, cfg, segment_ids is not None)
    dims = validation.check_qkv(q, k_cmp, v_cmp, key_length=slots, names=("q", "k_cmp", "v_cmp"))
    validation.check_segment_ids(segment_ids, dims.batch, dims.length)
    return dims


def grouped_logits(q_c, k_c, scale):
    """q [B, C, Hq, D] against per-KV-head keys k [B, S, Hkv, D] -> [B, Hkv, G, C, S]."""
    b, c, hq, dk = q_c.shape
    hkv = k_c.shape[2]
    qg = q_c.reshape(b, c, hkv, hq // hkv, dk)
    return jnp.einsum("bchgd,bshd->bhgcs", qg, k_c, precision="highest") * scale


def compressed_attention_xla(q, k_cmp, v_cmp, cfg, *, segment_ids=None, scale, query_offset=None):
    """query_offset: q holds a shard of the queries (`layout.query_layout`)."""
    b, t, hq, _ = q.shape
    cd = compute_dtype(q)
    length = layout.sequence_length(t, segment_ids, query_offset)
    start = layout.compressed_layout(segment_ids, b, length, cfg).start
    queries = layout.query_layout(segment_ids, b, t, query_offset)

    def chunk(xs, shared):
        q_c, pos_c, doc_c = xs
        k_c, v_c, start_c = shared
        logits = grouped_logits(q_c.astype(cd), k_c, scale)
        visible = layout.compressed_visible(start_c, pos_c, doc_c, cfg)[:, None, None]
        probs, lse = normalise(*masked_softmax_stats(logits, visible))
        o = jnp.einsum("bhgcs,bshd->bchgd", probs, v_c, precision="highest")
        return (o.reshape(b, -1, hq, v_c.shape[-1]).astype(q.dtype),
                jnp.moveaxis(lse[..., 0], 3, 1).reshape(b, -1, hq).astype(jnp.float32))

    return map_query_chunks(chunk, (q, *queries), (k_cmp.astype(cd), v_cmp.astype(cd), start))
