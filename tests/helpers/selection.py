"""The selection cases of issue 20 item 1 (non-finite block scores) shared by the op and kernel
tests: the issue's setting and cases, and random scores with non-finite values injected."""
from __future__ import annotations

import jax.numpy as jnp
import numpy as np

from nsa_jax import NSAConfig

# The issue's setting: l'=8, n=6, 1 initial + 2 local blocks forced; 80 tokens = 10 blocks.
ISSUE_CFG = NSAConfig(compress_block=8, compress_stride=4, select_block=8, num_selected=6,
                      num_init_blocks=1, num_local_blocks=2, window=16)

ISSUE_CASES = {
    # name: (query t, {block: score} on top of 0.5 everywhere, the rule's selection)
    "plus_inf_keeps_forced": (79, {2: np.inf, 4: np.inf, 6: np.inf, 7: np.inf},
                              [0, 2, 4, 6, 8, 9]),
    "minus_inf_still_selectable": (31, {1: -np.inf}, [0, 1, 2, 3, -1, -1]),
    "nan_below_finite": (79, {3: np.nan, 5: np.nan}, [0, 1, 2, 4, 8, 9]),
    "nan_selectable_when_needed": (47, {3: np.nan, 5: np.nan}, [0, 1, 2, 3, 4, 5]),
    "forced_whatever_the_score": (79, {9: np.nan, **{j: -np.inf for j in range(9)}},
                                  [0, 1, 2, 3, 8, 9]),
}


def issue_scores(values):
    """[1, 80, 1, 10] float32 scores: 0.5, with `values` ({block: score}) in every row."""
    scores = np.full((1, 80, 1, 10), 0.5, np.float32)
    for block, value in values.items():
        scores[..., block] = value
    return jnp.asarray(scores)


def injected_scores(rng, shape):
    """Random float32 scores with +inf, -inf, NaN, -0.0, 0.0 and repeated 0.5 injected."""
    scores = rng.standard_normal(shape).astype(np.float32)
    kind = rng.integers(0, 8, shape)
    for code, value in enumerate((np.inf, -np.inf, np.nan, -0.0, 0.0, 0.5)):
        scores[kind == code] = value
    return scores
