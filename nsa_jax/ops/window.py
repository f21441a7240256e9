"""Sliding-window branch: each query attends to the w keys [t - w + 1, t] of its document."""
from __future__ import annotations

import jax
import jax.numpy as jnp

from nsa_jax import layout
from nsa_jax.config import NSAConfig
from nsa_jax.ops import dispatch, validation
from nsa_jax.ops.chunking import QUERY_CHUNK, map_query_chunks
from nsa_jax.ops.compression import grouped_logits
from nsa_jax.ops.masked_softmax import compute_dtype, masked_softmax_stats, normalise
from nsa_jax.ops.per_device import per_device


def window_attention(q, k, v, cfg: NSAConfig, *, segment_ids=None, scale=None,
                     implementation=None):
    """Causal sliding-window attention over keys [t - w + 1, t] (w = cfg.window keys, the query's
    own token included) of the query's document: [B, T, Hq, Dv] (nsa_spec.md §2.4). scale
    defaults to 1/sqrt(Dk).

    implementation: "reference", "xla", "pallas" (cuDNN's sliding window on GPU and Hopper for
    unpacked 16-bit inputs with Dk == Dv a multiple of 8 up to 256; on Hopper otherwise the Mosaic
    GPU range-attention kernels for 16-bit inputs with Dk, Dv in {64, 128} (packed documents
    included); xla for everything else and on CPU and TPU) or None (pallas on GPU/TPU, xla on
    CPU); ops.dispatch.TABLE. Raises ValueError for bad arguments.
    """
    validation.check_config(cfg)
    dims = validation.check_qkv(q, k, v)
    validation.check_segment_ids(segment_ids, dims.batch, dims.length)
    return dispatch.run("window_attention", implementation, q, k, v, cfg, segment_ids=segment_ids,
                        scale=validation.default_scale(scale, dims.dk))


def window_attention_cudnn(q, k, v, cfg, *, segment_ids=None, scale):
    """cuDNN's fused sliding window (jax.nn.dot_product_attention), per device under a mesh like
    the Pallas kernels; no packed documents."""
    del segment_ids  # dispatch.cudnn_window_fits: only unpacked inputs come here
    # is_causal=True is required: a left-only window without it attends to the future on cuDNN.
    kernel = lambda q, k, v: jax.nn.dot_product_attention(
        q, k, v, scale=scale, is_causal=True, local_window_size=(cfg.window - 1, 0),
        implementation="cudnn")
    return per_device(kernel, q, k, v)


def window_attention_xla(q, k, v, cfg, *, segment_ids=None, scale, query_offset=None):
    """query_offset: q holds a shard of the queries (`layout.query_layout`); k and v the whole
    sequence."""
    b, tq, hq, _ = q.shape
    w = min(cfg.window, k.shape[1])
    chunk = min(QUERY_CHUNK, tq)
    span = chunk + w - 1  # keys any query of a chunk can see
    cd = compute_dtype(q)
    # the last chunk's keys end at query_offset + (whole chunks) * chunk <= T + this tail
    tail = -(-tq // chunk) * chunk - tq
    pad = [(0, 0), (w - 1, tail), (0, 0), (0, 0)]
    k_p, v_p = (jnp.pad(x.astype(cd), pad) for x in (k, v))

    def fn(xs, shared):
        q_c, pos_c, doc_c = xs
        k_all, v_all = shared
        first = pos_c[0, 0]  # chunks start at multiples of `chunk`; padding only at the end
        k_c = jax.lax.dynamic_slice_in_dim(k_all, first, span, axis=1)
        v_c = jax.lax.dynamic_slice_in_dim(v_all, first, span, axis=1)
        key = first - (w - 1) + jnp.arange(span)
        query = pos_c[:, :, None]
        visible = (key <= query) & (key > query - w) & (key >= doc_c[:, :, None])
        logits = grouped_logits(q_c.astype(cd), k_c, scale)
        probs, _ = normalise(*masked_softmax_stats(logits, visible[:, None, None]))
        o = jnp.einsum("bhgcs,bshd->bchgd", probs, v_c, precision="highest")
        return (o.reshape(b, -1, hq, v.shape[-1]).astype(q.dtype),)

    queries = layout.query_layout(segment_ids, b, tq, query_offset)
    return map_query_chunks(fn, (q, *queries), (k_p, v_p), chunk=chunk)[0]
