"""Context parallelism: one long sequence split over the `context` axis of the device mesh.

Under `jax.set_mesh(mesh)` with an axis named CONTEXT_AXIS of N > 1 devices, nsa_attention runs
through `shard_queries`: a `jax.shard_map` in which every device keeps its own queries and
all-gathers the keys and values over the context axis (NSA has few KV heads, so the gathered K/V
are small next to the queries that stay put), then computes its queries with the ordinary
single-device ops, told where its queries lie (`query_offset`, `layout.query_layout`). The
transpose of the all-gather makes the backward pass reduce-scatter dK/dV. Rows of the batch are
split over the mesh's other axes. MDY's flash_nsa shards the sequence the same way (all-gather,
not ring passes, because selection reaches any earlier block).

Layouts of the sequence axis over the N devices (`device_chunks`):
  "plain":  N chunks, device i holds chunk i. Under causal attention the last device has about
            2N - 1 times the (query, key) pairs of the first.
  "zigzag": 2N chunks, device i holds chunks i and 2N - 1 - i, one early and one late, which
            evens out causal work (docs/scaling.md counts both).
An array in the zigzag layout holds its tokens in `layout_order` order along the sequence axis:
`to_layout` permutes a natural-order array into it, `from_layout` back.
"""
from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import PartitionSpec as P

CONTEXT_AXIS = "context"
LAYOUTS = ("plain", "zigzag")


def check_layout(context_layout) -> str:
    if context_layout not in LAYOUTS:
        raise ValueError(f"context_layout must be one of {LAYOUTS}, got {context_layout!r}")
    return context_layout


def context_size() -> int:
    """Devices on the context axis of the current mesh: 1 without one, and inside a shard_map
    that has already split it."""
    mesh = jax.sharding.get_abstract_mesh()
    if mesh.empty or CONTEXT_AXIS not in mesh.axis_names or CONTEXT_AXIS in mesh.manual_axes:
        return 1
    return mesh.shape[CONTEXT_AXIS]


def device_chunks(context_layout: str, devices: int) -> tuple[tuple[int, ...], ...]:
    """The chunks of the sequence that each device holds, in order: "plain" cuts it in N chunks
    and device i holds (i,); "zigzag" cuts it in 2N and device i holds (i, 2N - 1 - i)."""
    if check_layout(context_layout) == "plain":
        return tuple((i,) for i in range(devices))
    return tuple((i, 2 * devices - 1 - i) for i in range(devices))


def chunk_length(length: int, context_layout: str, devices: int) -> int:
    """Tokens per chunk; raises ValueError unless the chunks divide the sequence evenly."""
    chunks = sum(map(len, device_chunks(context_layout, devices)))
    if length % chunks:
        raise ValueError(f"context parallelism over {devices} devices with context_layout="
                         f"{context_layout!r} cuts the sequence in {chunks} chunks: its length "
                         f"{length} must be divisible by {chunks}")
    return length // chunks


def layout_order(length: int, context_layout: str, devices: int) -> np.ndarray:
    """[T] int: the natural index of the token at each place of the layout's sequence axis
    (device 0's tokens first); the identity for "plain" and for one device."""
    size = chunk_length(length, context_layout, devices)
    return np.concatenate([np.arange(c * size, (c + 1) * size)
                           for chunks in device_chunks(context_layout, devices) for c in chunks])


def to_layout(x, context_layout: str, devices: int, axis: int = 1):
    """x with its natural-order sequence axis `axis` permuted into the layout."""
    return jnp.take(x, layout_order(x.shape[axis], context_layout, devices), axis=axis)


def from_layout(x, context_layout: str, devices: int, axis: int = 1):
    """x with its sequence axis `axis` permuted from the layout back to natural order."""
    return jnp.take(x, np.argsort(layout_order(x.shape[axis], context_layout, devices)),
                    axis=axis)


def _natural_order(x, chunks):
    """A gathered [B, T, ...] array (every device's chunks, device 0 first) in natural order."""
    flat = [c for held in chunks for c in held]
    if flat == sorted(flat):
        return x
    parts = jnp.split(x, len(flat), axis=1)
    return jnp.concatenate([parts[flat.index(c)] for c in range(len(flat))], axis=1)


def _check_split(queries, mesh, rows: tuple, context_layout: str) -> None:
    batch, length = jax.tree.leaves(queries)[0].shape[:2]
    row_devices = math.prod(mesh.shape[a] for a in rows)
    if batch % row_devices:
        raise ValueError(f"context parallelism splits the batch over the mesh's other axes "
                         f"{dict((a, mesh.shape[a]) for a in rows)}: batch size {batch} must be "
                         f"divisible by {row_devices}")
    chunk_length(length, context_layout, mesh.shape[CONTEXT_AXIS])


def shard_queries(fn, queries, keys, whole, *, context_layout: str):
    """fn on every device of the context axis of the current mesh, each with its own queries.

    queries: a pytree of [B, T, ...] arrays, one row per query (q, gates), and keys: a pytree of
    [B, T, ...] arrays (k, v, segment_ids; None leaves allowed), both with the sequence axis in
    `context_layout` and split over CONTEXT_AXIS; whole: a pytree of [B, ...] arrays every device
    needs whole (compressed K/V). Every device calls fn(own queries, keys, whole, query_offset)
    once per chunk it holds, with that chunk's queries [B', Tq, ...] at natural positions
    query_offset .. query_offset + Tq - 1 (a traced int32) and the all-gathered keys [B', T, ...]
    in natural order; fn returns a pytree of [B', Tq, ...] arrays. Returns that pytree for all
    queries, [B, T, ...] in `context_layout`. B' = B / the devices of the mesh's other axes, which
    split the rows. Raises ValueError when B or T does not split evenly.
    """
    mesh = jax.sharding.get_abstract_mesh()
    devices = mesh.shape[CONTEXT_AXIS]
    rows = tuple(a for a in mesh.axis_names if a != CONTEXT_AXIS)
    _check_split(queries, mesh, rows, context_layout)
    chunks = device_chunks(context_layout, devices)

    def on_device(queries, keys, whole):
        gather = lambda x: jax.lax.all_gather(x, CONTEXT_AXIS, axis=1, tiled=True)
        keys = jax.tree.map(lambda x: _natural_order(gather(x), chunks), keys)
        held = jnp.asarray(chunks, jnp.int32)[jax.lax.axis_index(CONTEXT_AXIS)]
        pieces = [jnp.split(x, len(chunks[0]), axis=1) for x in jax.tree.leaves(queries)]
        tree = jax.tree.structure(queries)
        outs = []
        for i in range(len(chunks[0])):
            own = jax.tree.unflatten(tree, [p[i] for p in pieces])
            outs.append(fn(own, keys, whole, held[i] * pieces[0][i].shape[1]))
        return jax.tree.map(lambda *xs: jnp.concatenate(xs, axis=1), *outs)

    split = P(rows or None, CONTEXT_AXIS)
    return jax.shard_map(on_device, mesh=mesh, in_specs=(split, split, P(rows or None)),
                         out_specs=split)(queries, keys, whole)
