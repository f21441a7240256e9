"""Passkey retrieval accuracy on a (context length x needle depth) grid."""
from __future__ import annotations

import numpy as np

from nsa_jax.data import answer_accuracy, passkey_example

NUM_DIGITS = 5


def passkey_grid(logits_fn, lengths, depths, examples: int, batch_size: int,
                 seed: int) -> np.ndarray:
    """[len(lengths), len(depths)] exact-match accuracy of the 5-digit key, `examples` fresh
    examples per cell (filler: the data package's stock sentences, as in training), generated from `seed` so reruns agree."""
    accuracy = np.zeros((len(lengths), len(depths)))
    for i, length in enumerate(lengths):
        for j, depth in enumerate(depths):
            rng = np.random.default_rng([seed, i, j])
            cell = [passkey_example(length, depth, rng, num_digits=NUM_DIGITS)
                    for _ in range(examples)]
            accuracy[i, j] = answer_accuracy(logits_fn, cell, batch_size=batch_size)
    return accuracy
