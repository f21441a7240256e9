"""Shared input handling of the GPU kernels: padding to Triton-friendly tiles (Triton arrays must
have power-of-2 sizes) and the layout-argument checks."""
from __future__ import annotations

import jax.numpy as jnp


def pow2(x: int) -> int:
    """Smallest power of 2 >= x (1 for x <= 1)."""
    return 1 << max(0, (x - 1).bit_length())


def pad_to(x, sizes, value=0):
    """Pad x at the end of each axis up to `sizes` (None = keep) with `value`."""
    widths = [(0, 0 if s is None else s - n) for n, s in zip(x.shape, sizes)]
    return jnp.pad(x, widths, constant_values=value) if any(w for _, w in widths) else x


def check_layout(start, doc_start, batch: int, length: int, slots: int) -> None:
    """The compressed-slot starts [B, Tc] and document starts [B, T] (or None) the compressed and
    select kernels take: int32, of the right shapes."""
    if start.shape != (batch, slots) or start.dtype != jnp.int32:
        raise ValueError(f"start must be int32 [B, Tc] = [{batch}, {slots}]; got {start.dtype} "
                         f"{start.shape}")
    if doc_start is not None and (doc_start.shape != (batch, length)
                                  or doc_start.dtype != jnp.int32):
        raise ValueError(f"doc_start must be int32 [B, T] = [{batch}, {length}]; got "
                         f"{doc_start.dtype} {doc_start.shape}")
