"""Byte-level tokenizer: token ids 0-255 are the UTF-8 bytes, then three specials.

Every document is stored as BOS, its bytes, EOS. BOS is never a training target (it is only ever
predicted across a document boundary, which the loss mask removes), so it is a free "start here"
signal; EOS is a target, so a sampler can learn where documents end. PAD fills rows that carry no
data (validation tail, right-padded evaluation batches) and always has loss weight 0.
"""
from __future__ import annotations

import numpy as np

PAD_ID = 256
BOS_ID = 257
EOS_ID = 258
VOCAB_SIZE = 259  # models usually round this up (e.g. to 384) for matmul-friendly shapes

TOKEN_DTYPE = np.uint16  # storage dtype of tokenized corpora; batches are int32


def tokenize(text: str | bytes) -> np.ndarray:
    """UTF-8 bytes of `text` as token ids (uint16), no specials added."""
    data = text.encode("utf-8") if isinstance(text, str) else bytes(text)
    return np.frombuffer(data, dtype=np.uint8).astype(TOKEN_DTYPE)


def tokenize_document(text: str | bytes) -> np.ndarray:
    """BOS + bytes + EOS: the form in which every corpus document is stored."""
    body = tokenize(text)
    out = np.empty(body.size + 2, dtype=TOKEN_DTYPE)
    out[0], out[1:-1], out[-1] = BOS_ID, body, EOS_ID
    return out


def detokenize(ids) -> str:
    """Text of the byte tokens in `ids`; specials are dropped and invalid UTF-8 (possible in model
    samples) becomes U+FFFD, so detokenize(tokenize(s)) == s for every str s."""
    ids = np.asarray(ids).reshape(-1)
    if ids.size and (ids.min() < 0 or ids.max() >= VOCAB_SIZE):
        raise ValueError(f"token ids must lie in [0, {VOCAB_SIZE}), got range "
                         f"[{ids.min()}, {ids.max()}]")
    return ids[ids < 256].astype(np.uint8).tobytes().decode("utf-8", errors="replace")
