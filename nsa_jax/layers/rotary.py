"""Rotary position embedding (half-split pairs: feature j rotates with feature j + D/2)."""
import jax.numpy as jnp


def rope_angles(positions, dim: int, theta: float):
    """[..., dim/2] float32 angles position * theta^(-2j/dim)."""
    inv_freq = theta ** (-jnp.arange(0, dim, 2, dtype=jnp.float32) / dim)
    return positions.astype(jnp.float32)[..., None] * inv_freq


def apply_rope(x, positions, theta: float):
    """Rotates x [B, T, H, D] by the angles of `positions` [B, T]; computed in float32, returned in
    x's dtype. Rotating at position p then taking dot products makes scores depend on p_q - p_k."""
    angles = rope_angles(positions, x.shape[-1], theta)[:, :, None, :]
    cos, sin = jnp.cos(angles), jnp.sin(angles)
    x1, x2 = jnp.split(x.astype(jnp.float32), 2, axis=-1)
    rotated = jnp.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin], axis=-1)
    return rotated.astype(x.dtype)
