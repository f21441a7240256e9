"""The GPU Pallas kernels (`pallas_kernels.gpu`, Triton lowering) behind the functional ops.

`register()` makes them the "pallas" implementation of the ops they cover; `pallas_ops` calls it
on every backend but TPU. Off-GPU they run in Pallas interpret mode (slow: for tests). Document
starts and slot layouts are built here in XLA, so the kernels never see segment_ids.
"""
from __future__ import annotations

import jax

from nsa_jax.ops import dispatch, layout


def _interpret() -> bool:
    return jax.default_backend() != "gpu"


def _doc_start(segment_ids, q):
    return None if segment_ids is None else layout.document_starts(segment_ids, *q.shape[:2])


def selected_attention(q, k, v, indices, cfg, segment_ids, scale):
    from pallas_kernels import gpu

    return gpu.selected_attention(q, k, v, indices, cfg, doc_start=_doc_start(segment_ids, q),
                                  scale=scale, interpret=_interpret())


def register():
    dispatch.register("selected_attention", "pallas")(selected_attention)
