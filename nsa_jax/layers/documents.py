"""Packed documents: a document is a maximal run of equal consecutive `segment_ids`, so the same id
may come back later as a different document. Positions restart at 0 at every document start, which
is what makes a packed document see exactly what it sees alone."""
import jax
import jax.numpy as jnp


def _document_starts(segment_ids):
    """[B, T] bool, True where a document begins (always at t = 0)."""
    changed = segment_ids[:, 1:] != segment_ids[:, :-1]
    return jnp.concatenate([jnp.ones_like(segment_ids[:, :1], dtype=bool), changed], axis=1)


def document_ids(segment_ids):
    """[B, T] int32 running document index (0, 1, 2, ...), unique per run of equal ids."""
    return jnp.cumsum(_document_starts(segment_ids), axis=1, dtype=jnp.int32) - 1


def document_positions(segment_ids, batch: int, length: int):
    """[B, T] int32 position of each token inside its document (`arange(T)` without segment_ids)."""
    t = jnp.broadcast_to(jnp.arange(length, dtype=jnp.int32), (batch, length))
    if segment_ids is None:
        return t
    start = jax.lax.cummax(jnp.where(_document_starts(segment_ids), t, 0), axis=1)
    return t - start


def check_segment_ids(segment_ids, batch: int, length: int) -> None:
    if segment_ids is not None and tuple(segment_ids.shape) != (batch, length):
        raise ValueError(f"segment_ids must have shape [B, T] = {(batch, length)}, got "
                         f"{tuple(segment_ids.shape)}")
