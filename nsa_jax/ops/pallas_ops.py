"""Registers the Pallas kernels that exist with the dispatcher (imported lazily, on first use of
implementation="pallas"). Ops without a kernel fall back to xla in `dispatch.run`; off-GPU the
kernels run in Pallas interpret mode (slow: for tests). Slot layouts and document starts are
built here in XLA, so the kernels never see segment_ids. The window branch uses cuDNN's sliding
window where its constraints hold."""
from __future__ import annotations

import jax
import jax.numpy as jnp

from nsa_jax.ops import dispatch, layout


def _doc_start(segment_ids, q):
    return None if segment_ids is None else layout.document_starts(segment_ids, *q.shape[:2])


@dispatch.register("selected_attention", "pallas")
def _selected_attention_pallas(q, k, v, indices, cfg, segment_ids, scale):
    from pallas_kernels import gpu

    return gpu.selected_attention(q, k, v, indices, cfg, doc_start=_doc_start(segment_ids, q),
                                  scale=scale, interpret=not dispatch.pallas_backend())


@dispatch.register("compressed_attention", "pallas")
def _compressed_attention_pallas(q, k_cmp, v_cmp, cfg, segment_ids, scale):
    from pallas_kernels import gpu

    start = layout.compressed_layout(segment_ids, *q.shape[:2], cfg).start
    return gpu.compressed_attention(q, k_cmp, v_cmp, start, cfg,
                                    doc_start=_doc_start(segment_ids, q), scale=scale,
                                    interpret=not dispatch.pallas_backend())


@dispatch.register("select", "pallas")
def _select_pallas(q, k_cmp, lse, cfg, segment_ids, scale):
    from pallas_kernels import gpu

    stop = jax.lax.stop_gradient
    start = layout.compressed_layout(segment_ids, *q.shape[:2], cfg).start
    return gpu.select_blocks(stop(q), stop(k_cmp), stop(lse), start, cfg,
                             doc_start=_doc_start(segment_ids, q), scale=scale,
                             interpret=not dispatch.pallas_backend())


def _cudnn_window_fits(q, k, v, segment_ids) -> bool:
    """cuDNN's fused attention: GPU, half precision, Dk == Dv a multiple of 8 up to 256, and no
    packed documents (jax.nn.dot_product_attention has no segment ids)."""
    dims = {q.shape[-1], k.shape[-1], v.shape[-1]}
    return (dispatch.pallas_backend() and segment_ids is None
            and q.dtype == k.dtype == v.dtype and q.dtype in (jnp.bfloat16, jnp.float16)
            and len(dims) == 1 and dims.pop() % 8 == 0 and q.shape[-1] <= 256)


@dispatch.register("window_attention", "pallas")
def _window_attention_pallas(q, k, v, cfg, segment_ids, scale):
    if not _cudnn_window_fits(q, k, v, segment_ids):
        return dispatch.run("window_attention", "xla", q, k, v, cfg, segment_ids, scale)
    # is_causal=True is required: a left-only window without it attends to the future on cuDNN.
    return jax.nn.dot_product_attention(q, k, v, scale=scale, is_causal=True,
                                        local_window_size=(cfg.window - 1, 0),
                                        implementation="cudnn")
