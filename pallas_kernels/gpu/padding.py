"""Padding to Triton-friendly tiles: Triton arrays must have power-of-2 sizes."""
from __future__ import annotations

import jax.numpy as jnp


def pow2(x: int) -> int:
    """Smallest power of 2 >= x (1 for x <= 1)."""
    return 1 << max(0, (x - 1).bit_length())


def pad_to(x, sizes, value=0):
    """Pad x at the end of each axis up to `sizes` (None = keep) with `value`."""
    widths = [(0, 0 if s is None else s - n) for n, s in zip(x.shape, sizes)]
    return jnp.pad(x, widths, constant_values=value) if any(w for _, w in widths) else x
