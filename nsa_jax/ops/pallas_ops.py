"""Registers the Pallas kernels that exist with the dispatcher (imported lazily, on first use of
implementation="pallas"). Ops without a kernel fall back to xla in `dispatch.run`; off-GPU the
kernels run in Pallas interpret mode (slow: for tests)."""
from __future__ import annotations

from nsa_jax.ops import decode_pallas  # noqa: F401  (registers nsa_decode_attention)
from nsa_jax.ops import dispatch, layout


@dispatch.register("selected_attention", "pallas")
def _selected_attention_pallas(q, k, v, indices, cfg, segment_ids, scale):
    from pallas_kernels import gpu

    doc_start = None if segment_ids is None else layout.document_starts(segment_ids, *q.shape[:2])
    return gpu.selected_attention(q, k, v, indices, cfg, doc_start=doc_start, scale=scale,
                                  interpret=not dispatch.pallas_backend())
