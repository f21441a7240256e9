"""Packed documents (`segment_ids` [B, T]; a document is a maximal run of equal consecutive ids) as
the layers see them, built on nsa_jax.layout so layers and ops agree on documents."""

from nsa_jax.layout import document_positions, document_starts
from nsa_jax.ops.validation import check_segment_ids

__all__ = ["check_segment_ids", "document_positions", "same_document_mask"]


def same_document_mask(segment_ids):
    """[B, 1, T, T] bool: query and key lie in the same document (the same start index, so a
    repeated id after another document is a new document)."""
    start = document_starts(segment_ids, *segment_ids.shape)
    return (start[:, :, None] == start[:, None, :])[:, None]
