"""Passkey retrieval accuracy on a (context length x needle depth) grid."""
from __future__ import annotations

import numpy as np

from nsa_jax.data import PASSKEY_DIGITS, answer_accuracy, passkey_example


def passkey_cell(length: int, depth: float, examples: int, seed: int) -> list:
    """`examples` passkey examples of `length` tokens with the needle at `depth` (filler: the data
    package's stock sentences, as in training), the same for every model and every grid that
    holds this (length, depth) cell."""
    # abs(): out-of-range values must reach passkey_example's own check, not fail as a seed
    rng = np.random.default_rng([seed, abs(length), abs(round(depth * 1_000_000))])
    return [passkey_example(length, depth, rng, num_digits=PASSKEY_DIGITS) for _ in range(examples)]


def passkey_grid(logits_fn, lengths, depths, examples: int, batch_size: int,
                 seed: int) -> np.ndarray:
    """[len(lengths), len(depths)] exact-match accuracy of the PASSKEY_DIGITS-digit key over the
    `passkey_cell` examples of each cell."""
    accuracy = np.zeros((len(lengths), len(depths)))
    for i, length in enumerate(lengths):
        for j, depth in enumerate(depths):
            cell = passkey_cell(length, depth, examples, seed)
            accuracy[i, j] = answer_accuracy(logits_fn, cell, batch_size=batch_size)
    return accuracy
