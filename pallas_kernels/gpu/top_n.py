"""Per-row top-n on GPU (Pallas, Triton lowering), with the rank keys computed in the kernel: one
program holds `block_rows` rows of block scores in registers, turns them into keys with the
caller's `key_fn` (nsa_jax.selection_rule.rank_keys, passed in so that the rule is written once)
and takes n rounds of (largest key, lowest column holding it) - lax.top_k's order. It reads the
scores once and writes only [R, n]; lax.top_k needs the keys materialised first (a second pass
over [R, NB]) and may sort whole rows. experiments/bench_select.py times both.
"""
from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp
import numpy as np
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as pltriton

_TAKEN = np.int32(np.iinfo(np.int32).min)  # a chosen column's key afterwards: the lowest


def _pow2(x: int) -> int:
    return 1 << max(0, (x - 1).bit_length())


def _kernel(scores_ref, pos_ref, values_ref, ids_ref, *, n, key_fn):
    keys = key_fn(scores_ref[...], pos_ref[...])  # [rows, NB] int32
    col = jax.lax.broadcasted_iota(jnp.int32, keys.shape, 1)
    slot = jax.lax.broadcasted_iota(jnp.int32, values_ref.shape, 1)

    def take(i, carry):
        keys, values, ids = carry
        best = jnp.max(keys, axis=1)
        at = jnp.min(jnp.where(keys == best[:, None], col, keys.shape[1]), axis=1)
        values = jnp.where(slot == i, best[:, None], values)
        ids = jnp.where(slot == i, at[:, None], ids)
        return jnp.where(col == at[:, None], _TAKEN, keys), values, ids

    empty = jnp.full(values_ref.shape, _TAKEN, jnp.int32)
    _, values, ids = jax.lax.fori_loop(0, n, take, (keys, empty, jnp.zeros_like(empty)))
    values_ref[...] = values
    ids_ref[...] = ids


def top_n(scores_RN, positions_R, n: int, key_fn, *, block_rows: int | None = None,
          num_warps: int = 4, interpret: bool = False):
    """(keys [R, n], columns [R, n]) int32: the n largest key_fn(scores, positions) per row,
    ties to the lower column, in lax.top_k's order (largest first). Once a row's keys run out
    (n > NB), the remaining slots hold int32 min and an arbitrary column.

    scores_RN [R, NB] float; positions_R [R] int32 (whatever key_fn takes per row, e.g. the
    document-relative query position); key_fn(scores [r, W], positions [r]) -> int32 keys
    [r, W], traceable inside a Pallas kernel. Rows are padded with zero scores to W = NB rounded
    up to a power of 2 (a copy, unless NB is one): key_fn must rank those columns below the real
    ones (rank_keys does, they lie past every query's block). block_rows: rows per program (a
    power of 2 dividing R; default: the largest dividing R and at most max(1, 8192 / W)).
    """
    r, nb = scores_RN.shape
    if positions_R.shape != (r,):
        raise ValueError(f"positions_R must be [R] = [{r}], got {positions_R.shape}")
    if nb != _pow2(nb):
        scores_RN = jnp.pad(scores_RN, ((0, 0), (0, _pow2(nb) - nb)))
        nb = _pow2(nb)
    block_rows = block_rows or math.gcd(r, max(1, 8192 // nb))
    if r % block_rows or block_rows != _pow2(block_rows):
        raise ValueError(f"block_rows ({block_rows}) must be a power of 2 dividing R = {r}")
    width = _pow2(n)
    out = jax.ShapeDtypeStruct((r, width), jnp.int32)
    values, ids = pl.pallas_call(
        functools.partial(_kernel, n=n, key_fn=key_fn),
        grid=(r // block_rows,),
        in_specs=[pl.BlockSpec((block_rows, nb), lambda i: (i, 0)),
                  pl.BlockSpec((block_rows,), lambda i: (i,))],
        out_specs=[pl.BlockSpec((block_rows, width), lambda i: (i, 0))] * 2,
        out_shape=[out, out],
        compiler_params=pltriton.CompilerParams(num_warps=num_warps, num_stages=1),
        interpret=interpret,
        name="nsa_top_n",
    )(scores_RN.astype(jnp.float32), positions_R.astype(jnp.int32))
    return values[:, :n], ids[:, :n]
