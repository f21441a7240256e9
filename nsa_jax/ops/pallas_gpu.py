"""The GPU Pallas kernels (`pallas_kernels.gpu`, Triton lowering) behind the functional ops.

`register()` makes them the "pallas" implementation of compressed_attention, select (fused block
scoring + top-n), selected_attention, window_attention (cuDNN's sliding window where its
constraints hold, xla otherwise) and nsa_decode (`decode_pallas.py`); `pallas_ops` calls it on
every backend but TPU. Off-GPU the kernels run in Pallas interpret mode (slow: for tests).
Document starts and slot layouts are built here in XLA, so the kernels never see segment_ids.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp

from nsa_jax.ops import dispatch, layout
from nsa_jax.ops.per_device import per_device


def on_gpu() -> bool:
    return jax.default_backend() == "gpu"


def _doc_start(segment_ids, q):
    return None if segment_ids is None else layout.document_starts(segment_ids, *q.shape[:2])


def _slot_start(segment_ids, q, cfg):
    return layout.compressed_layout(segment_ids, *q.shape[:2], cfg).start


def selected_attention(q, k, v, indices, cfg, segment_ids, scale):
    from pallas_kernels import gpu

    kernel = lambda q, k, v, indices, doc_start: gpu.selected_attention(
        q, k, v, indices, cfg, doc_start=doc_start, scale=scale, interpret=not on_gpu())
    return per_device(kernel, q, k, v, indices, _doc_start(segment_ids, q))


def compressed_attention(q, k_cmp, v_cmp, cfg, segment_ids, scale):
    from pallas_kernels import gpu

    kernel = lambda q, k_cmp, v_cmp, slots, doc_start: gpu.compressed_attention(
        q, k_cmp, v_cmp, slots, cfg, doc_start=doc_start, scale=scale, interpret=not on_gpu())
    return per_device(kernel, q, k_cmp, v_cmp, _slot_start(segment_ids, q, cfg),
                      _doc_start(segment_ids, q))


def select(q, k_cmp, lse, cfg, segment_ids, scale):
    from pallas_kernels import gpu

    stop = jax.lax.stop_gradient
    kernel = lambda q, k_cmp, lse, slots, doc_start: gpu.select_blocks(
        q, k_cmp, lse, slots, cfg, doc_start=doc_start, scale=scale, interpret=not on_gpu())
    return per_device(kernel, stop(q), stop(k_cmp), stop(lse), _slot_start(segment_ids, q, cfg),
                      _doc_start(segment_ids, q))


def _cudnn_window_fits(q, k, v, segment_ids) -> bool:
    """cuDNN's fused attention: GPU, half precision, Dk == Dv a multiple of 8 up to 256, and no
    packed documents (jax.nn.dot_product_attention has no segment ids)."""
    dims = {q.shape[-1], k.shape[-1], v.shape[-1]}
    return (on_gpu() and segment_ids is None and q.dtype in (jnp.bfloat16, jnp.float16)
            and len(dims) == 1 and q.shape[-1] % 8 == 0 and q.shape[-1] <= 256)


def window_attention(q, k, v, cfg, segment_ids, scale):
    if not _cudnn_window_fits(q, k, v, segment_ids):
        return dispatch.run("window_attention", "xla", q, k, v, cfg, segment_ids, scale)
    # is_causal=True is required: a left-only window without it attends to the future on cuDNN.
    kernel = lambda q, k, v: jax.nn.dot_product_attention(
        q, k, v, scale=scale, is_causal=True, local_window_size=(cfg.window - 1, 0),
        implementation="cudnn")
    return per_device(kernel, q, k, v)


def register():
    from nsa_jax.ops.decode_pallas import nsa_decode

    for op, fn in (("nsa_decode", nsa_decode), ("selected_attention", selected_attention),
                   ("compressed_attention", compressed_attention), ("select", select),
                   ("window_attention", window_attention)):
        dispatch.register(op, "pallas")(fn)
