"""Kernels under a device mesh. A Pallas kernel sees whole arrays, so under a mesh
(`jax.set_mesh`) each one runs through `per_device`: a `jax.shard_map` giving every device its own
rows of the batch. The ops are independent per batch row, so no communication is needed; the xla
and reference implementations need none of this (jit partitions them)."""
from __future__ import annotations

import jax
import numpy as np
from jax.sharding import PartitionSpec as P


def per_device(kernel, *args, **kwargs):
    """kernel(*args, **kwargs) with every array argument [B, ...] split by rows over every axis of
    the current mesh (other arguments passed as they are); a plain call when there is no mesh or
    one device."""
    mesh = jax.sharding.get_abstract_mesh()
    if mesh.empty or mesh.size == 1:
        return kernel(*args, **kwargs)
    leaves, tree = jax.tree.flatten((args, kwargs))
    where = [i for i, x in enumerate(leaves) if isinstance(x, (jax.Array, np.ndarray))]
    batch = leaves[where[0]].shape[0]
    if batch % mesh.size:
        raise ValueError(f"implementation='pallas' under a mesh of {mesh.size} devices "
                         f"({dict(mesh.shape)}) splits the batch between them: batch size "
                         f"{batch} must be divisible by {mesh.size}")

    def on_device(*arrays):
        local = list(leaves)
        for i, x in zip(where, arrays):
            local[i] = x
        local_args, local_kwargs = jax.tree.unflatten(tree, local)
        return kernel(*local_args, **local_kwargs)

    rows = P(mesh.axis_names)
    return jax.shard_map(on_device, mesh=mesh, in_specs=(rows,) * len(where), out_specs=rows,
                         check_vma=False)(*(leaves[i] for i in where))
