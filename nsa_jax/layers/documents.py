"""Packed documents (`segment_ids` [B, T]; a document is a maximal run of equal consecutive ids):
positions restart at 0 at every document start, which is what makes a packed document see exactly
what it sees alone. Built on the ops' own layout helpers so layers and ops agree on documents."""
import jax.numpy as jnp

from nsa_jax.ops.layout import document_starts
from nsa_jax.ops.validation import check_segment_ids

__all__ = ["check_segment_ids", "document_positions", "same_document_mask"]


def document_positions(segment_ids, batch: int, length: int):
    """[B, T] int32 position of each token inside its document (`arange(T)` without segment_ids)."""
    return jnp.arange(length, dtype=jnp.int32) - document_starts(segment_ids, batch, length)


def same_document_mask(segment_ids):
    """[B, 1, T, T] bool: query and key lie in the same document (the same start index, so a
    repeated id after another document is a new document)."""
    start = document_starts(segment_ids, *segment_ids.shape)
    return (start[:, :, None] == start[:, None, :])[:, None]
