"""Synthetic long-context tasks in the byte vocabulary, generated from a numpy Generator.

- passkey / needle retrieval: a sentence stating a random number is hidden in filler at a chosen
  depth; the sequence ends with the question and the number, which is the answer.
- multi-query associative recall (MQAR): a block of key=value pairs (3-letter keys, 3-digit values)
  first, then every key queried once, in random order, at random places in the filler that follows;
  each queried value is an answer.

Filler is shuffled stock sentences without digits or '=' (so needles cannot be confused with it),
or a random window of a caller-supplied `haystack` token array (e.g. a corpus stream) for
needle-in-a-haystack evaluation.
"""
from __future__ import annotations

import dataclasses
import string

import numpy as np

from nsa_jax.data.tokenizer import BOS_ID, tokenize

PASSKEY_DIGITS = 5  # digits of the passkey in training mixes and evaluation grids
_FILLER_SENTENCES = tuple(s.encode() for s in (
    "Rain fell on the quiet harbour. ",
    "A cart rolled slowly up the hill. ",
    "Bread was baking in the oven. ",
    "The old clock ticked in the hall. ",
    "Gulls circled above the fishing boats. ",
    "A candle burned low by the window. ",
    "The river ran wide after the storm. ",
    "Someone whistled a tune in the lane. ",
))
KEY_LETTERS = 3
VALUE_DIGITS = 3
_NUM_KEYS = 26 ** KEY_LETTERS


@dataclasses.dataclass(frozen=True)
class SyntheticExample:
    tokens: np.ndarray  # [L] int32, BOS first
    answer_spans: tuple[tuple[int, int], ...]  # [start, end) of each answer in tokens
    evidence_spans: tuple[tuple[int, int], ...]  # where each answer was stated earlier

    def answer_mask(self) -> np.ndarray:
        mask = np.zeros(self.tokens.size, dtype=bool)
        for start, end in self.answer_spans:
            mask[start:end] = True
        return mask


def filler_tokens(n: int, rng: np.random.Generator, haystack: np.ndarray | None = None) -> np.ndarray:
    """`n` filler tokens: random stock sentences, or a random window of `haystack`."""
    if haystack is None:
        shortest = min(len(s) for s in _FILLER_SENTENCES)
        picks = rng.integers(len(_FILLER_SENTENCES), size=n // shortest + 1)
        return tokenize(b"".join(_FILLER_SENTENCES[i] for i in picks)[:n])
    haystack = np.asarray(haystack).reshape(-1)
    if haystack.size < n:
        raise ValueError(f"haystack has {haystack.size} tokens, the filler needs {n}")
    start = rng.integers(haystack.size - n + 1)
    return haystack[start:start + n]


def _passkey_texts(key: str) -> tuple[bytes, bytes]:
    return (f" The passkey is {key}; keep it in mind. ".encode(),
            f" What was the passkey? The passkey is {key}".encode())


def passkey_min_length(num_digits: int = PASSKEY_DIGITS) -> int:
    needle, question = _passkey_texts("0" * num_digits)
    return 1 + len(needle) + len(question)


def _assemble(pieces: list[bytes | np.ndarray]) -> tuple[np.ndarray, list[int]]:
    """BOS + the pieces; also each piece's start offset."""
    arrays = [np.array([BOS_ID])] + [tokenize(p) if isinstance(p, bytes) else p for p in pieces]
    starts = np.cumsum([0] + [a.size for a in arrays])[1:-1]
    return np.concatenate(arrays).astype(np.int32), [int(s) for s in starts]


def passkey_example(length: int, depth: float, rng: np.random.Generator, *,
                    num_digits: int = PASSKEY_DIGITS, haystack: np.ndarray | None = None
                    ) -> SyntheticExample:
    """`length` tokens; the needle starts after round(depth * F) of the F filler tokens, so depth 0
    puts it right after BOS and depth 1 right before the question."""
    if not 0.0 <= depth <= 1.0:
        raise ValueError(f"depth must be in [0, 1], got {depth!r}")
    if num_digits < 1:
        raise ValueError(f"num_digits must be >= 1, got {num_digits}")
    if length < passkey_min_length(num_digits):
        raise ValueError(f"passkey length must be >= {passkey_min_length(num_digits)} for "
                         f"{num_digits} digits, got {length}")
    key = "".join(str(d) for d in rng.integers(10, size=num_digits))
    needle, question = _passkey_texts(key)
    num_filler = length - passkey_min_length(num_digits)
    filler = filler_tokens(num_filler, rng, haystack)
    before = round(depth * num_filler)
    tokens, starts = _assemble([filler[:before], needle, filler[before:], question])
    evidence = starts[1] + needle.index(key.encode())
    return SyntheticExample(tokens, ((length - num_digits, length),),
                            ((evidence, evidence + num_digits),))


def mqar_min_length(num_pairs: int) -> int:
    pair = KEY_LETTERS + 1 + VALUE_DIGITS + 1  # "abc=123;"
    return 1 + num_pairs * pair + 1 + num_pairs * (pair + 1)  # BOS, pairs, "\n", "\n"-led queries


def _key_text(index: int) -> str:
    letters = []
    for _ in range(KEY_LETTERS):
        index, letter = divmod(index, 26)
        letters.append(string.ascii_lowercase[letter])
    return "".join(letters)


def mqar_example(length: int, num_pairs: int, rng: np.random.Generator, *,
                 haystack: np.ndarray | None = None) -> SyntheticExample:
    """`length` tokens: "abc=123;def=456;...\\n", then filler with "\\ndef=456;" queries inserted."""
    if not 1 <= num_pairs <= _NUM_KEYS:
        raise ValueError(f"num_pairs must be in [1, {_NUM_KEYS}], got {num_pairs}")
    if length < mqar_min_length(num_pairs):
        raise ValueError(f"MQAR length must be >= {mqar_min_length(num_pairs)} for {num_pairs} "
                         f"pairs, got {length}")
    keys = [_key_text(int(i)) for i in rng.choice(_NUM_KEYS, size=num_pairs, replace=False)]
    values = [f"{v:0{VALUE_DIGITS}d}" for v in rng.integers(10 ** VALUE_DIGITS, size=num_pairs)]
    order = rng.permutation(num_pairs)
    num_filler = length - mqar_min_length(num_pairs)
    cuts = np.sort(rng.integers(num_filler + 1, size=num_pairs))
    filler = filler_tokens(num_filler, rng, haystack)
    pairs = "".join(f"{k}={v};" for k, v in zip(keys, values)) + "\n"
    pieces = [pairs.encode()]
    for q, start, end in zip(order, np.concatenate([[0], cuts[:-1]]), cuts):
        pieces += [filler[start:end], f"\n{keys[q]}={values[q]};".encode()]
    tokens, starts = _assemble(pieces + [filler[cuts[-1]:]])
    value_offset = KEY_LETTERS + 1
    pair_len = value_offset + VALUE_DIGITS + 1
    answers = tuple((s + 1 + value_offset, s + 1 + value_offset + VALUE_DIGITS)
                    for s in starts[2::2])
    evidence = tuple((1 + int(q) * pair_len + value_offset,
                      1 + int(q) * pair_len + value_offset + VALUE_DIGITS) for q in order)
    return SyntheticExample(tokens, answers, evidence)
