"""Softmax attention over an explicit key mask that stays finite when a row sees nothing.

Fully masked rows give output 0, log-sum-exp -inf, and exactly zero gradients: every value that
could become inf or NaN is replaced *before* the operation that would produce it, so no NaN leaks
into the backward pass through an unselected `where` branch.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp


def compute_dtype(*arrays):
    """float32, or float64 when the inputs are float64 (gradient checks run in x64)."""
    return jnp.result_type(jnp.float32, *(a.dtype for a in arrays))


def masked_softmax_stats(logits, mask):
    """Returns (unnormalised probabilities, row sums, row maxima made finite) over the last axis."""
    masked = jnp.where(mask, logits, -jnp.inf)
    row_max = jax.lax.stop_gradient(jnp.max(masked, axis=-1, keepdims=True, initial=-jnp.inf))
    row_max = jnp.where(jnp.isfinite(row_max), row_max, 0.0)
    p = jnp.exp(masked - row_max)
    return p, jnp.sum(p, axis=-1, keepdims=True), row_max


def normalise(p, denom, row_max):
    """Probabilities and log-sum-exp ([..., 1]) from `masked_softmax_stats`; empty rows -> 0, -inf."""
    nonempty = denom > 0
    safe = jnp.where(nonempty, denom, 1.0)
    lse = jnp.where(nonempty, row_max + jnp.log(safe), -jnp.inf)
    return p / safe, lse
