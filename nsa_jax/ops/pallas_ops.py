"""Registers the Pallas kernels that exist with the dispatcher (imported lazily, on first use of
implementation="pallas"). Ops without a kernel fall back to xla in `dispatch.run`; off-GPU the
kernels run in Pallas interpret mode (slow: for tests).

A kernel sees whole arrays, so under a device mesh (`jax.set_mesh`) each one runs through
`per_device`: a `jax.shard_map` giving every device its own rows of the batch. The ops are
independent per batch row, so no communication is needed; the xla and reference
implementations need none of this (jit partitions them).
"""
from __future__ import annotations

import jax
from jax.sharding import PartitionSpec as P

from nsa_jax.ops import dispatch, layout


def per_device(kernel, *arrays):
    """kernel(*arrays) with arrays [B, ...] (or None) split by rows over every axis of the current
    mesh; a plain call when there is no mesh or one device."""
    mesh = jax.sharding.get_abstract_mesh()
    if mesh.empty or mesh.size == 1:
        return kernel(*arrays)
    batch = arrays[0].shape[0]
    if batch % mesh.size:
        raise ValueError(f"implementation='pallas' under a mesh of {mesh.size} devices "
                         f"({dict(mesh.shape)}) splits the batch between them: batch size "
                         f"{batch} must be divisible by {mesh.size}")
    rows = P(mesh.axis_names)
    return jax.shard_map(kernel, mesh=mesh, in_specs=(rows,) * len(arrays),
                         out_specs=rows,
                         check_vma=False)(*arrays)


@dispatch.register("selected_attention", "pallas")
def _selected_attention_pallas(q, k, v, indices, cfg, segment_ids, scale):
    from pallas_kernels import gpu

    doc_start = None if segment_ids is None else layout.document_starts(segment_ids, *q.shape[:2])
    kernel = lambda q, k, v, indices, doc_start: gpu.selected_attention(
        q, k, v, indices, cfg, doc_start=doc_start, scale=scale,
        interpret=not dispatch.pallas_backend())
    return per_device(kernel, q, k, v, indices, doc_start)
