"""The selection rule: which n blocks a query takes from its block scores, the same in every
implementation (reference, xla, Pallas kernels, decoding). nsa_spec.md, selection; paper eq. 10-11;
issue 20 item 1 for non-finite scores.

For a query whose document-relative position lies in block J = local_pos // l', block j is
- invisible if j > J (it lies after the query, or past the sequence): never selected;
- forced if visible and j < num_init_blocks or j > J - num_local_blocks: always selected,
  whatever its score (forced blocks count toward n);
- otherwise ranked by its float32 score: +inf above every finite score, finite scores in float
  order (-0.0 == +0.0), -inf and NaN below every finite score but still selectable, so a query
  that sees at most n blocks selects all of them.
Ties go to the lower block id. Slots that only find invisible blocks are -1; the ids come sorted
ascending with the -1 slots last.

The rule is one total order, written as int32 rank keys (larger = better) so that any top-k
(lax.top_k, a sort, a kernel's running top-n) that breaks ties toward the lower index gives the
same set bit for bit.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from nsa_jax.config import NSAConfig

KEY_FORCED = np.int32(np.iinfo(np.int32).max)
KEY_INVISIBLE = np.int32(np.iinfo(np.int32).min)
# The key of -inf in the float order below; NaN shares it.
KEY_NON_FINITE_LOW = np.int32(np.float32(-np.inf).view(np.int32) ^ 0x7FFFFFFF)


def ordered_bits(x):
    """float32 -> int32 that orders like the floats (-inf lowest, +inf highest; -0.0 and +0.0
    equal). NaN is not handled here."""
    x = jnp.where(x == 0, jnp.float32(0), x)  # -0.0 -> +0.0: equal scores tie
    bits = jax.lax.bitcast_convert_type(x, jnp.int32)
    return jnp.where(bits >= 0, bits, bits ^ np.int32(0x7FFFFFFF))


def block_classes(num_blocks: int, local_pos, cfg: NSAConfig, blocks=None):
    """(visible, forced) bool [..., NB] for document-relative positions `local_pos` [...] and
    block ids `blocks` (int, broadcastable to [..., NB]; default 0 .. NB-1)."""
    block = jnp.arange(num_blocks, dtype=jnp.int32) if blocks is None else blocks
    current = (jnp.asarray(local_pos, jnp.int32) // cfg.select_block)[..., None]
    visible = block <= current
    forced = visible & ((block < cfg.num_init_blocks) | (block > current - cfg.num_local_blocks))
    return visible, forced


def rank_keys(scores, local_pos, cfg: NSAConfig, blocks=None):
    """int32 rank keys [..., NB] of block scores [..., NB] (any float dtype, compared as
    float32) for queries at document-relative positions `local_pos` (int, broadcastable to
    scores.shape[:-1]): KEY_FORCED for forced blocks, KEY_INVISIBLE for blocks after the
    query's own, else the score's float order with -inf and NaN at KEY_NON_FINITE_LOW. Columns
    past the sequence's last block are invisible by position, so padded widths are fine.
    `blocks`: the block id of each score (int, broadcastable to scores.shape), for scores
    gathered out of order; default: column j holds block j."""
    x = jnp.asarray(scores).astype(jnp.float32)
    visible, forced = block_classes(x.shape[-1], local_pos, cfg, blocks)
    ranked = jnp.where(jnp.isnan(x) | (x == -jnp.inf), KEY_NON_FINITE_LOW, ordered_bits(x))
    return jnp.where(forced, KEY_FORCED, jnp.where(visible, ranked, KEY_INVISIBLE))


def sorted_block_ids(ids):
    """Block ids (-1 = none) in ascending order along the last axis, the -1 slots last."""
    big = jnp.iinfo(jnp.int32).max
    ids = jnp.sort(jnp.where(ids < 0, big, ids.astype(jnp.int32)), axis=-1)
    return jnp.where(ids == big, -1, ids)


def chosen_blocks(top_keys, top_ids):
    """A top-n of rank keys (keys and block ids [..., n], as lax.top_k returns them) -> the
    selection: ids ascending, -1 for slots that found only invisible blocks, -1 slots last."""
    return sorted_block_ids(jnp.where(top_keys == KEY_INVISIBLE, -1, top_ids))


def top_n_of_keys(keys, n: int):
    """The n best blocks of rank keys [..., NB] by (key desc, block id asc), as chosen_blocks."""
    short = n - keys.shape[-1]
    if short > 0:
        pad = [(0, 0)] * (keys.ndim - 1) + [(0, short)]
        keys = jnp.pad(keys, pad, constant_values=KEY_INVISIBLE)
    return chosen_blocks(*jax.lax.top_k(keys, n))  # equal keys: the lower index first


def select_top_n(scores, local_pos, cfg: NSAConfig):
    """The selected blocks [..., n] int32 of block scores [..., NB] for queries at
    document-relative positions `local_pos` (see the module docstring for the rule)."""
    return top_n_of_keys(rank_keys(scores, local_pos, cfg), cfg.num_selected)
