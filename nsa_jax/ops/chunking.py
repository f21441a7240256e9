"""Query chunking for the xla implementations: work on `chunk` queries at a time so memory grows
with T * (keys per query), never T^2, in the forward pass and in the backward pass (each chunk is
rematerialised instead of storing its scores)."""
from __future__ import annotations

import jax
import jax.numpy as jnp

QUERY_CHUNK = 256


def map_query_chunks(fn, per_query, shared, chunk: int = QUERY_CHUNK):
    """fn(per_query_chunk, shared) over chunks of axis 1 of every array in `per_query` (a tuple of
    [B, T, ...] arrays); returns fn's outputs (a tuple of [B, C, ...]) joined back to [B, T, ...]."""
    length = per_query[0].shape[1]
    chunk = min(chunk, length)
    num = -(-length // chunk)
    pad = num * chunk - length

    def split(x):
        x = jnp.pad(x, [(0, 0), (0, pad)] + [(0, 0)] * (x.ndim - 2))
        return jnp.moveaxis(x.reshape(x.shape[0], num, chunk, *x.shape[2:]), 1, 0)

    def join(y):
        y = jnp.moveaxis(y, 0, 1)
        return y.reshape(y.shape[0], num * chunk, *y.shape[3:])[:, :length]

    body = jax.checkpoint(fn)
    outs = jax.lax.map(lambda xs: body(xs, shared), tuple(split(x) for x in per_query))
    return tuple(join(y) for y in outs)

