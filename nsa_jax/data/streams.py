"""Tokenized corpus splits held in memory: one flat token array per (corpus, split).

Each document is stored as BOS + bytes + EOS and the documents are concatenated, so a window of
the stream is already a packed row; `doc_starts` recovers which document each token came from.
Built once per process (cached in memory, nothing written to disk); the 5 MB Shakespeare and
12 MB stdlib corpora load in well under a second each.
"""
from __future__ import annotations

import dataclasses
import functools
import types

import numpy as np

from nsa_jax.data.corpora import Document, load_documents
from nsa_jax.data.splits import split_documents
from nsa_jax.data.tokenizer import TOKEN_DTYPE, tokenize_document

@dataclasses.dataclass(frozen=True)
class TokenStream:
    tokens: np.ndarray  # [N] uint16, read-only
    doc_starts: np.ndarray  # [D] int64, ascending, doc_starts[0] == 0
    names: tuple[str, ...]  # [D] document names

    def document_index(self, positions: np.ndarray) -> np.ndarray:
        """Index of the document holding each stream position."""
        return np.searchsorted(self.doc_starts, positions, side="right") - 1


def build_stream(documents: list[Document]) -> TokenStream:
    encoded = [tokenize_document(d.data) for d in documents]
    lengths = np.array([e.size for e in encoded], dtype=np.int64)
    tokens = np.concatenate(encoded) if encoded else np.empty(0, TOKEN_DTYPE)
    tokens.flags.writeable = False
    starts = np.concatenate([[0], np.cumsum(lengths)[:-1]]).astype(np.int64)
    starts.flags.writeable = False
    return TokenStream(tokens, starts, tuple(d.name for d in documents))


@functools.lru_cache(maxsize=None)
def corpus_streams(name: str, validation_fraction: float) -> types.MappingProxyType:
    """Read-only {"train": ..., "validation": ...} of the named corpus, tokenized once per process."""
    train, val = split_documents(load_documents(name), validation_fraction)
    return types.MappingProxyType({"train": build_stream(train), "validation": build_stream(val)})
