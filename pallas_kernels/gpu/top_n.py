"""Per-row top-n on GPU (Pallas, Triton lowering), with the rank keys computed in the kernel: one
program holds `block_rows` rows of scores, turns them into int32 keys with the caller's `key_fn`
(nsa_jax.selection_rule.rank_keys, passed in so that the rule is written once) and returns the
n largest keys per row with their columns, ties to the lower column: lax.top_k's set and order.
It reads the scores once and writes only [rows, n]; lax.top_k needs the keys materialised first
(a second pass over the scores) and may sort whole rows. experiments/bench_select.py times both.

Two schemes, the same result:
- "rounds": n rounds of (largest key, lowest column holding it, remove it) over the whole row:
  per row ~n * W * 6 integer operations (W columns), compute-bound (3.0 ms for the 262144 rows
  x 1024 columns of T=64k, paper shape, on an H200, against ~0.25 ms to read the scores once).
- "groups" (default): the columns are cut into W/g groups of g; a group's key is its largest
  key. The n best columns lie in the n best groups, ordered by (group key desc, group index
  asc): if column x (in group G) is among the n best, the groups ranked above G each hold a
  column better than G's best (their best: larger key, or an equal key at a lower column, as
  groups are contiguous), hence better than x; so fewer than n groups rank above G. The kernel
  takes the m = n (rounded up to a power of 2) best groups by rounds over the W/g group keys,
  gathers their m*g columns again (from L1/L2: the program has just read them) and takes the n
  best by rounds over those. Per row ~W * 16 (keys) + 6n * (W/g + m*g) operations, minimal at
  g ~ sqrt(W/m): 2.6x fewer than "rounds" at W=1024, n=16, g=8. Groups whose key is the
  invisible key (int32 min) are dropped (their columns can only fill slots that come out -1).

Widths: `width_of(rows_end)` (optional) bounds the columns rows [0, rows_end) may rank above
the invisible key, e.g. (first position + rows_end - 1) // l' + 1 for causal block scores: the
rows are cut into segments at multiples of 64, each read only to its power-of-2 width, so a
causal row costs its visible prefix (~0.67 of the whole width on average at T=64k).
"""
from __future__ import annotations

import functools
import math
from typing import Callable

import jax
import jax.numpy as jnp
import numpy as np
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as pltriton

_TAKEN = np.int32(np.iinfo(np.int32).min)  # a chosen column's key afterwards: the lowest
SCHEMES = ("groups", "rounds")
_SEGMENT_ROWS = 64  # width segments start on multiples of this many rows
_MIN_WIDTH = 16


def _pow2(x: int) -> int:
    return 1 << max(0, (x - 1).bit_length())


def default_group(width: int, n: int) -> int | None:
    """Columns per group for the "groups" scheme (~sqrt(width / m), a power of 2), or None where
    grouping saves nothing (a row no wider than ~2m)."""
    m = _pow2(n)
    group = 1 << max(0, round(math.log2(math.sqrt(width / m))))
    return group if group >= 2 and width // group > m else None


def _rounds(keys, cols, n: int, width: int):
    """(values, ids) [rows, width] int32: the n largest keys per row and their `cols` entry, ties
    to the lower entry, largest first; slots past n hold _TAKEN and 0. cols [rows, W] >= 0 are
    distinct per row among keys above _TAKEN (entries keyed _TAKEN may repeat a column: they
    are only ever returned with the key _TAKEN)."""
    big = jnp.iinfo(jnp.int32).max
    slot = jax.lax.broadcasted_iota(jnp.int32, (keys.shape[0], width), 1)

    def take(i, carry):
        keys, values, ids = carry
        best = jnp.max(keys, axis=1)
        at = jnp.min(jnp.where(keys == best[:, None], cols, big), axis=1)
        values = jnp.where(slot == i, best[:, None], values)
        ids = jnp.where(slot == i, at[:, None], ids)
        return jnp.where(cols == at[:, None], _TAKEN, keys), values, ids

    empty = jnp.full((keys.shape[0], width), _TAKEN, jnp.int32)
    _, values, ids = jax.lax.fori_loop(0, n, take, (keys, empty, jnp.zeros_like(empty)))
    return values, ids


def _kernel(scores_ref, pos_ref, values_ref, ids_ref, *, n, key_fn, group, num_columns):
    rows, width = scores_ref.shape
    out_width = values_ref.shape[1]
    col = jax.lax.broadcasted_iota(jnp.int32, (rows, width), 1)
    if width > num_columns:  # the block runs past the array's columns
        scores = pltriton.load(scores_ref, mask=col < num_columns, other=0.0)
    else:
        scores = scores_ref[...]
    pos = pos_ref[...]
    keys = key_fn(scores, pos, col)  # [rows, width] int32
    if group is None:
        values, ids = _rounds(keys, col, n, out_width)
    else:
        m = _pow2(n)
        groups = width // group
        group_keys = jnp.max(keys.reshape(rows, groups, group), axis=2)
        group_ids = jax.lax.broadcasted_iota(jnp.int32, (rows, groups), 1)
        best, chosen = _rounds(group_keys, group_ids, m, m)  # [rows, m]
        live = (best != _TAKEN)[:, :, None]  # groups holding a column above the invisible key
        member = jax.lax.broadcasted_iota(jnp.int32, (rows, m, group), 2)
        cand = chosen[:, :, None] * group + member  # [rows, m, g] distinct columns
        row = jax.lax.broadcasted_iota(jnp.int32, (rows, m, group), 0)
        gathered = scores_ref[row, jnp.where(live & (cand < num_columns), cand, 0)]
        cand = cand.reshape(rows, m * group)
        cand_keys = key_fn(gathered.reshape(rows, m * group), pos, cand)
        live = jnp.broadcast_to(live, (rows, m, group)).reshape(rows, m * group)
        cand_keys = jnp.where(live, cand_keys, _TAKEN)
        values, ids = _rounds(cand_keys, cand, n, out_width)
    values_ref[...] = values
    ids_ref[...] = ids


def _segments(num_rows: int, num_columns: int, width_of, n: int):
    """[(first row, end row, width)]: rows cut at multiples of _SEGMENT_ROWS into runs of one
    power-of-2 width (at least _MIN_WIDTH, at most num_columns rounded up to a power of 2)."""
    full = _pow2(num_columns)
    if width_of is None:
        return [(0, num_rows, full)]
    clamp = lambda w: min(full, max(_MIN_WIDTH, _pow2(max(1, w))))
    ends = list(range(_SEGMENT_ROWS, num_rows, _SEGMENT_ROWS)) + [num_rows]
    out = []
    first = 0
    for end in ends:
        width = clamp(width_of(end))
        if out and out[-1][2] == width:
            out[-1] = (out[-1][0], end, width)
        else:
            out.append((first, end, width))
        first = end
    return out


def top_n(scores_PCN, positions_PC, n: int, key_fn, *, width_of: Callable[[int], int] | None
          = None, scheme: str = "groups", group: int | None = None, block_elems: int = 8192,
          num_warps: int = 4, interpret: bool = False):
    """(keys [P, C, n], columns [P, C, n]) int32: the n largest key_fn(...) per row (p, c), ties
    to the lower column, in lax.top_k's order (largest first). Once a row's keys run out
    (n > NB) or only the invisible key (int32 min) is left, the remaining slots hold int32 min
    and an arbitrary column.

    scores_PCN [P, C, NB] float32 (P independent planes, e.g. batch x KV heads, of C rows);
    positions_PC [P, C] int32 (whatever key_fn takes per row, e.g. the document-relative query
    position); key_fn(scores [r, W], positions [r], columns [r, W] int32) -> int32 keys [r, W],
    traceable inside a Pallas kernel, where columns are each score's column. Columns read past
    NB (widths are powers of 2) hold score 0: key_fn must rank them below the real ones
    (rank_keys does: they lie past every query's block). width_of: see the module docstring;
    columns at or past width_of(rows_end) must be keyed int32 min for those rows.
    scheme: "groups" or "rounds" (module docstring); group: columns per group (a power of 2;
    default `default_group`); block_elems: rows x width per program (rows a power of 2 up to 64).
    """
    if scheme not in SCHEMES:
        raise ValueError(f"scheme must be one of {SCHEMES}, got {scheme!r}")
    p, c, nb = scores_PCN.shape
    if positions_PC.shape != (p, c):
        raise ValueError(f"positions_PC must be [P, C] = {(p, c)}, got {positions_PC.shape}")
    if group is not None and (group < 1 or group != _pow2(group)):
        raise ValueError(f"group must be a power of 2, got {group}")
    scores_PCN = scores_PCN.astype(jnp.float32)
    positions_PC = positions_PC.astype(jnp.int32)
    out_width = _pow2(n)
    keys, ids = [], []
    for first, end, width in _segments(c, nb, width_of, n):
        rows = end - first
        block_rows = min(_SEGMENT_ROWS, max(1, block_elems // width), rows & -rows)
        g = None
        if scheme == "groups":
            g = default_group(width, n) if group is None else group
            if g is not None and (g >= width or width // g <= _pow2(n)):
                g = None  # every group would be taken: plain rounds
        blocks_before = first // block_rows
        out = jax.ShapeDtypeStruct((p, rows, out_width), jnp.int32)
        part = pl.pallas_call(
            functools.partial(_kernel, n=n, key_fn=key_fn, group=g, num_columns=nb),
            grid=(p, rows // block_rows),
            in_specs=[pl.BlockSpec((None, block_rows, width),
                                   lambda i, j: (i, blocks_before + j, 0)),
                      pl.BlockSpec((None, block_rows), lambda i, j: (i, blocks_before + j))],
            out_specs=[pl.BlockSpec((None, block_rows, out_width), lambda i, j: (i, j, 0))] * 2,
            out_shape=[out, out],
            compiler_params=pltriton.CompilerParams(num_warps=num_warps, num_stages=1),
            interpret=interpret,
            name=f"nsa_top_n_{scheme}",
        )(scores_PCN, positions_PC)
        keys.append(part[0])
        ids.append(part[1])
    keys = keys[0] if len(keys) == 1 else jnp.concatenate(keys, axis=1)
    ids = ids[0] if len(ids) == 1 else jnp.concatenate(ids, axis=1)
    return keys[..., :n], ids[..., :n]
