"""Deterministic train/validation split by document.

Documents are ranked by the SHA-256 of their name and the first round(fraction * N) of that ranking
(at least one, at most N - 1) are validation. The rank, not a hash threshold, fixes the validation
size exactly, which matters for a 38-play corpus; the hash makes the choice independent of file
order, machine and process.
"""
from __future__ import annotations

import hashlib
from typing import Sequence

from nsa_jax.data.corpora import Document


def num_validation(num_documents: int, validation_fraction: float) -> int:
    if not 0.0 < validation_fraction < 1.0:
        raise ValueError(f"validation_fraction must be in (0, 1), got {validation_fraction!r}")
    if num_documents < 2:
        raise ValueError(f"a train/validation split needs >= 2 documents, got {num_documents}")
    return min(max(1, round(validation_fraction * num_documents)), num_documents - 1)


def split_documents(documents: Sequence[Document], validation_fraction: float
                    ) -> tuple[list[Document], list[Document]]:
    """(train, validation), each in the input order."""
    n_val = num_validation(len(documents), validation_fraction)
    ranked = sorted(documents, key=lambda d: hashlib.sha256(d.name.encode("utf-8")).digest())
    val_names = {d.name for d in ranked[:n_val]}
    return ([d for d in documents if d.name not in val_names],
            [d for d in documents if d.name in val_names])
