"""Registers the Pallas kernels that exist with the dispatcher (imported lazily, on first use of
implementation="pallas"). Ops without a kernel fall back to xla in `dispatch.run`; off-GPU the
kernels run in Pallas interpret mode (slow: for tests). Slot layouts and document starts are
built here in XLA, so the kernels never see segment_ids."""
from __future__ import annotations

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
