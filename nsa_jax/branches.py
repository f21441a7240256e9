"""NSA's three branches, in the order every gate tensor uses, and their gated sum (paper eq. 5):
out = g_cmp * o_cmp + g_slc * o_slc + g_win * o_win. Pure jnp, so the ops, the decode kernels and
the layers share it."""
from __future__ import annotations

import jax.numpy as jnp

BRANCHES = ("cmp", "slc", "win")  # compressed, selected, sliding window


def combine_branches(gates, outputs, dtype):
    """gates [..., 3] in BRANCHES order, outputs (o_cmp, o_slc, o_win) [..., Dv] -> [..., Dv] in
    `dtype`: each output rounded to `dtype` first (as a branch op returns it), the sum in float32
    (float64 under x64)."""
    g = gates.astype(jnp.result_type(jnp.float32, *(o.dtype for o in outputs)))
    out = sum(g[..., i, None] * o.astype(dtype).astype(g.dtype) for i, o in enumerate(outputs))
    return out.astype(dtype)
