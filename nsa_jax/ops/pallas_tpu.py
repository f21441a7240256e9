"""The TPU Pallas kernels (`pallas_kernels.tpu`) behind the functional ops.

`register()` makes them the "pallas" implementation of compressed_attention and
selected_attention; `pallas_ops` calls it only on a TPU backend. The entry points below take the
dispatcher's arguments plus `interpret` and block sizes, so tests can run the kernels on CPU in
TPU interpret mode (interpret=pltpu.InterpretParams(...)). Inputs the kernels do not take
(float64 under x64, float16) run the xla implementation instead.
"""
from __future__ import annotations

import jax.numpy as jnp

from nsa_jax.ops import dispatch, layout
from nsa_jax.ops.per_device import per_device
from pallas_kernels.tpu import compressed, selected

_KERNEL_DTYPES = (jnp.float32, jnp.bfloat16)


def _kernel_dtype(x) -> bool:
    return any(x.dtype == d for d in _KERNEL_DTYPES)


def compressed_attention(q, k_cmp, v_cmp, cfg, segment_ids, scale, *, interpret=False, **blocks):
    if not _kernel_dtype(q):
        return dispatch.run("compressed_attention", "xla", q, k_cmp, v_cmp, cfg, segment_ids, scale)
    b, t = q.shape[:2]
    doc_start = layout.document_starts(segment_ids, b, t)
    slot_start = layout.compressed_layout(segment_ids, b, t, cfg).start
    kernel = lambda q, k_cmp, v_cmp, doc_start, slot_start: compressed.compressed_attention(
        q, k_cmp, v_cmp, doc_start, slot_start, compress_block=cfg.compress_block, scale=scale,
        interpret=interpret, **blocks)
    return per_device(kernel, q, k_cmp, v_cmp, doc_start, slot_start)


def selected_attention(q, k, v, indices, cfg, segment_ids, scale, *, interpret=False, **blocks):
    if not _kernel_dtype(q):
        return dispatch.run("selected_attention", "xla", q, k, v, indices, cfg, segment_ids, scale)
    doc_start = layout.document_starts(segment_ids, *q.shape[:2])
    kernel = lambda q, k, v, indices, doc_start: selected.selected_attention(
        q, k, v, indices, doc_start, select_block=cfg.select_block, scale=scale,
        interpret=interpret, **blocks)
    return per_device(kernel, q, k, v, indices, doc_start)


def register():
    dispatch.register("compressed_attention", "pallas")(compressed_attention)
    dispatch.register("selected_attention", "pallas")(selected_attention)
