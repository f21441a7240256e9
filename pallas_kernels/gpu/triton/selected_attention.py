"""NSA selected-block attention on GPU (Pallas, Triton lowering): forward, dQ and a deterministic
dK/dV (no atomics) behind a custom_vjp, with the ops twin's signature.

Blocks are named by their absolute first key position (doc_start[t] + j * l'), so packed documents
need no special case in the kernels: a block of a document may start anywhere in the buffer.

* Forward and dQ, grid (query tile, batch * KV head): a program holds the `qb * gp` rows (qb
  consecutive query positions times the gp padded heads of one KV group; row r is query r // gp)
  and walks the sorted union of the blocks those queries selected, each with a bit mask saying
  which of its queries selected it, with an online softmax. Neighbouring queries mostly select the
  same blocks, so a tile loads each shared block once.
* dK/dV, grid (key tile of l' keys, batch * KV head): a program walks the transpose, "which query
  tiles selected a block overlapping key tile kt", a CSR list per (batch, KV head), gathering
  `entries_per_step` of them per step, and writes its dK/dV tile once: deterministic sums. An
  unaligned block overlaps two l'-aligned key tiles and is listed under both; every (row, key)
  pair stays covered by exactly one entry.
The index tables are built in XLA. Triton tiles must be powers of 2 and dots want >= 16 rows, so
heads per KV group are padded to gp = next power of 2 (zero queries, dropped on the way out), head
dims to powers of 2 (zeros add nothing to dot products), and tiles hold qb >= 16 / gp query
positions. Padding is plain XLA, so its gradient is automatic.
"""
from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl

from nsa_jax import layout
from nsa_jax.config import NSAConfig
from pallas_kernels import check_row_count
from pallas_kernels.gpu.triton import common

_AFTER_ALL = jnp.iinfo(jnp.int32).max  # unused entries sort after every real block start
SELECTED_DTYPES = (jnp.bfloat16, jnp.float32)  # what the selected kernels compute in


@dataclasses.dataclass(frozen=True)
class Tiling:
    """Tile options; None derives the measured default."""
    queries_per_program: int | None = None  # fwd/dQ: a power of 2 <= 16; default 16 / gp, >= 1
    entries_per_step: int | None = None  # dK/dV: query tiles gathered per loop step (power of 2)
    num_warps: int | None = None  # fwd/dQ: 2 for one query per program, else 4
    num_stages: int | None = None  # fwd/dQ: 3 for one query per program, else 2
    bwd_num_warps: int = 8
    bwd_num_stages: int = 2

    def __post_init__(self):
        if self.queries_per_program not in (None, 1, 2, 4, 8, 16):
            raise ValueError(f"queries_per_program must be a power of 2 <= 16, got "
                             f"{self.queries_per_program}")
        if self.entries_per_step is not None:
            common.check_pow2("entries_per_step", self.entries_per_step)


@dataclasses.dataclass(frozen=True)
class Plan:
    """Static layout of the three kernels (hashable: a custom_vjp nondiff argument)."""
    block: int  # l'
    qb: int  # query positions per forward/dQ program
    gp: int  # heads per KV group, padded to a power of 2
    scale: float
    num_kv_heads: int
    num_key_tiles: int  # ceil(T / l')
    aligned: bool  # every block starts at a multiple of l' (no packed documents)
    entries_per_step: int  # dK/dV: query tiles gathered per loop step
    num_warps: int
    num_stages: int
    bwd_num_warps: int
    bwd_num_stages: int
    interpret: bool

    @property
    def rows(self) -> int:
        return self.qb * self.gp


# --- Index tables, built in XLA -------------------------------------------------------------------

def _union_of_row(starts, query):
    """Sorted distinct starts of one tile (length L) with the bit mask of the queries using them."""
    length = starts.shape[0]
    # Sorting by (start, query) puts a repeated pair next to its twin, so it is counted once; two
    # sort keys, not one packed start * qb + query, which would overflow int32 at T >= 2**31 / qb.
    start, query = jax.lax.sort((jnp.where(starts >= 0, starts, _AFTER_ALL), query), num_keys=2)
    valid = start != _AFTER_ALL
    earlier = lambda x: jnp.concatenate([jnp.full((1,), -1, x.dtype), x[:-1]])
    new_start = valid & (start != earlier(start))
    new_pair = new_start | (valid & (query != earlier(query)))
    slot = jnp.where(valid, jnp.cumsum(new_start) - 1, length)  # invalid entries: a dump slot
    union = jnp.zeros((length + 1,), jnp.int32).at[slot].set(jnp.where(valid, start, 0))
    qbit = jnp.where(new_pair, jnp.left_shift(1, query), 0)
    bits = jnp.zeros((length + 1,), jnp.int32).at[slot].add(qbit)  # distinct bits: add is OR
    return union[:length], bits[:length], jnp.sum(new_start, dtype=jnp.int32)


def query_tile_union(abs_starts, qb: int):
    """abs_starts [B, Tq, H, n] (Tq a multiple of qb) -> (starts, bits, count).

    starts/bits [B, H, Tq // qb, qb * n] int32, count [B, H, Tq // qb] int32: entry i < count of
    tile c is a block start and the mask of the tile's queries (bit r = query c * qb + r) using it.
    A block listed twice by one query counts once.
    """
    b, tq, h, n = abs_starts.shape
    tiles = abs_starts.reshape(b, tq // qb, qb, h, n).transpose(0, 3, 1, 2, 4)
    tiles = tiles.reshape(b * h * (tq // qb), qb * n)
    query = jnp.repeat(jnp.arange(qb, dtype=jnp.int32), n)
    starts, bits, count = jax.vmap(_union_of_row, in_axes=(0, None))(tiles, query)
    shape = (b, h, tq // qb)
    return starts.reshape(*shape, qb * n), bits.reshape(*shape, qb * n), count.reshape(shape)


def key_tile_entries(starts, bits, count, block: int, num_key_tiles: int, pad: int, aligned: bool):
    """Transpose the query-side union into per-key-tile entry lists.

    Returns (entry_tile, entry_start, entry_bits) [B, H, E + pad] sorted by key tile (query tile
    ascending inside one key tile, so the dK/dV sums run in a fixed order) and offsets
    [B, H, num_key_tiles + 1]: key tile kt owns entries offsets[kt] .. offsets[kt + 1] - 1. The
    `pad` trailing zero entries let a kernel read a whole chunk past the last real one.
    """
    b, h, nqt, length = starts.shape
    valid = jnp.arange(length)[None, None, None, :] < count[..., None]
    first_tile = starts // block
    candidates = [(first_tile, valid)]
    if not aligned:
        second = first_tile + 1
        candidates.append((second, valid & (starts % block != 0) & (second < num_key_tiles)))
    tile_id = jnp.broadcast_to(jnp.arange(nqt, dtype=jnp.int32)[:, None], (nqt, length))
    flat = lambda x: jnp.broadcast_to(x, starts.shape).reshape(b, h, -1)
    key = jnp.concatenate([flat(jnp.where(ok, kt, num_key_tiles)) for kt, ok in candidates], -1)
    order = jnp.argsort(key, axis=-1, stable=True)
    fields = [jnp.concatenate([flat(x)] * len(candidates), -1) for x in (tile_id, starts, bits)]
    fields = [jnp.take_along_axis(x, order, axis=-1) for x in fields]
    fields = [jnp.pad(x, ((0, 0), (0, 0), (0, pad))) for x in fields]
    sorted_key = jnp.take_along_axis(key, order, axis=-1)
    edges = jnp.arange(num_key_tiles + 1, dtype=jnp.int32)
    search = jax.vmap(jax.vmap(lambda row: jnp.searchsorted(row, edges, side="left")))
    offsets = search(sorted_key).astype(jnp.int32)
    return (*fields, offsets)


# --- Kernels --------------------------------------------------------------------------------------

def visible(kpos, start, bits, query_in_tile, query_pos, block: int):
    """Which (row, key) pairs count: the row's query selected the block starting at `start`, the
    key lies in that block and is not in the query's future."""
    chosen = (jnp.right_shift(bits, query_in_tile) & 1) == 1
    return chosen & (kpos >= start) & (kpos < start + block) & (kpos <= query_pos)


def row_coords(plan: Plan):
    """(query index inside the tile, absolute query position) of each row, as [rows, 1]."""
    r = jax.lax.broadcasted_iota(jnp.int32, (plan.rows, 1), 0) // plan.gp
    return r, pl.program_id(0) * plan.qb + r


def _fwd_kernel(starts_ref, bits_ref, count_ref, q_ref, k_ref, v_ref, o_ref, lse_ref, *,
                plan: Plan):
    rows, block = plan.rows, plan.block
    q = q_ref[...].reshape(rows, q_ref.shape[-1])
    query_in_tile, query_pos = row_coords(plan)
    kpos0 = jax.lax.broadcasted_iota(jnp.int32, (1, block), 1)

    def step(i, carry):
        start = starts_ref[i]
        mask = visible(kpos0 + start, start, bits_ref[i], query_in_tile, query_pos, block)
        return common.online_softmax_step(carry, q, k_ref[pl.ds(start, block), :],
                                          v_ref[pl.ds(start, block), :], mask, plan.scale)

    carry = jax.lax.fori_loop(0, count_ref[...], step, common.empty_softmax(rows, v_ref.shape[-1]))
    o, lse = common.softmax_result(*carry)
    o_ref[...] = o.astype(o_ref.dtype).reshape(o_ref.shape)
    lse_ref[...] = lse.reshape(rows)


def _dq_kernel(starts_ref, bits_ref, count_ref, q_ref, k_ref, v_ref, do_ref, lse_ref, delta_ref,
               dq_ref, *, plan: Plan):
    rows, block = plan.rows, plan.block
    q = q_ref[...].reshape(rows, q_ref.shape[-1])
    do = do_ref[...].reshape(rows, do_ref.shape[-1])
    lse, delta = lse_ref[...][:, None], delta_ref[...][:, None]
    query_in_tile, query_pos = row_coords(plan)
    kpos0 = jax.lax.broadcasted_iota(jnp.int32, (1, block), 1)

    def step(i, dq):
        start = starts_ref[i]
        k = k_ref[pl.ds(start, block), :]
        mask = visible(kpos0 + start, start, bits_ref[i], query_in_tile, query_pos, block)
        _, ds = common.recomputed_grads(q, k, v_ref[pl.ds(start, block), :], do, lse, delta,
                                        mask, plan.scale)
        return dq + jnp.dot(ds.astype(k.dtype), k, preferred_element_type=jnp.float32)

    dq = jax.lax.fori_loop(0, count_ref[...], step, jnp.zeros(q.shape, jnp.float32))
    dq_ref[...] = (dq * plan.scale).astype(dq_ref.dtype).reshape(dq_ref.shape)


def _dkv_kernel(tile_ref, start_ref, bits_ref, offsets_ref, q_ref, do_ref, lse_ref, delta_ref,
                k_ref, v_ref, dk_ref, dv_ref, *, plan: Plan):
    qb, gp, block = plan.qb, plan.gp, plan.block
    per_step = plan.entries_per_step
    rows = per_step * qb * gp
    kt = pl.program_id(0)
    begin, end = offsets_ref[kt], offsets_ref[kt + 1]
    k, v = k_ref[...], v_ref[...]
    kpos = kt * block + jax.lax.broadcasted_iota(jnp.int32, (1, block), 1)
    row = jax.lax.broadcasted_iota(jnp.int32, (rows,), 0)
    query_in_tile = (row // gp) % qb
    tok = jax.lax.broadcasted_iota(jnp.int32, (per_step * qb,), 0)

    def step(i, carry):
        dk, dv = carry
        first = begin + i * per_step
        entry = first + row // (qb * gp)
        bits = jnp.where(entry < end, bits_ref[entry], 0)
        query_pos = tile_ref[entry] * qb + query_in_tile
        mask = visible(kpos, start_ref[entry][:, None], bits[:, None], query_in_tile[:, None],
                       query_pos[:, None], block)
        tokens = tile_ref[first + tok // qb] * qb + tok % qb
        q = q_ref[tokens].reshape(rows, q_ref.shape[-1])
        do = do_ref[tokens].reshape(rows, do_ref.shape[-1])
        row_id = query_pos * gp + row % gp
        p, ds = common.recomputed_grads(q, k, v, do, lse_ref[row_id][:, None],
                                        delta_ref[row_id][:, None], mask, plan.scale)
        return (dk + common.transposed_dot(ds.astype(q.dtype), q),
                dv + common.transposed_dot(p.astype(do.dtype), do))

    init = (jnp.zeros(k.shape, jnp.float32), jnp.zeros(v.shape, jnp.float32))
    dk, dv = jax.lax.fori_loop(0, pl.cdiv(end - begin, per_step), step, init)
    dk_ref[...] = (dk * plan.scale).astype(dk_ref.dtype)
    dv_ref[...] = dv.astype(dv_ref.dtype)


# --- pallas_calls ---------------------------------------------------------------------------------

def query_tile_specs(plan: Plan, q_shape):
    """BlockSpecs of the (starts, bits, count, q, k, v) inputs and the row-shaped outputs on the
    (query tile, batch * KV head) grid; q-like arrays are [B, Tq, H, gp, D]."""
    h, qb, gp = plan.num_kv_heads, plan.qb, plan.gp
    tile_idx = lambda c, bh: (bh // h, bh % h, c, 0)
    q_idx = lambda c, bh: (bh // h, c, bh % h, 0, 0)
    whole_kv = lambda c, bh: (bh // h, 0, bh % h, 0)
    return dict(
        union=lambda length: pl.BlockSpec((None, None, None, length), tile_idx),
        count=pl.BlockSpec((None, None, None), lambda c, bh: (bh // h, bh % h, c)),
        q=lambda dim: pl.BlockSpec((None, qb, None, gp, dim), q_idx),
        kv=lambda t_kv, dim: pl.BlockSpec((None, t_kv, None, dim), whole_kv),
        rows=pl.BlockSpec((None, None, qb * gp), lambda c, bh: (bh // h, bh % h, c)),
        grid=(q_shape[1] // qb, q_shape[0] * h),
    )


def _forward(plan: Plan, q5, k, v, starts, bits, count):
    """q5 [B, Tq, H, gp, Dk], k/v [B, Tkv, H, D] -> (o5 [B, Tq, H, gp, Dv], lse [B, H, Tq * gp],
    -inf where a row saw nothing)."""
    b, tq, h, gp, dk = q5.shape
    dv, t_kv = v.shape[-1], k.shape[1]
    specs = query_tile_specs(plan, q5.shape)
    return pl.pallas_call(
        functools.partial(_fwd_kernel, plan=plan),
        grid=specs["grid"],
        in_specs=[specs["union"](starts.shape[-1]), specs["union"](starts.shape[-1]),
                  specs["count"], specs["q"](dk), specs["kv"](t_kv, dk), specs["kv"](t_kv, dv)],
        out_specs=[specs["q"](dv), specs["rows"]],
        out_shape=[jax.ShapeDtypeStruct((b, tq, h, gp, dv), v.dtype),
                   jax.ShapeDtypeStruct((b, h, tq * gp), jnp.float32)],
        compiler_params=common.compiler_params(plan.num_warps, plan.num_stages),
        interpret=plan.interpret,
        name="nsa_selected_fwd",
    )(starts, bits, count, q5, k, v)


def _bwd_params(plan: Plan):
    return common.compiler_params(plan.bwd_num_warps, plan.bwd_num_stages)


def _dq(plan: Plan, q5, k, v, do5, lse, delta, starts, bits, count):
    """dQ [B, Tq, H, gp, Dk] on the forward grid."""
    dk, dv, t_kv = q5.shape[-1], v.shape[-1], k.shape[1]
    specs = query_tile_specs(plan, q5.shape)
    union = specs["union"](starts.shape[-1])
    return pl.pallas_call(
        functools.partial(_dq_kernel, plan=plan),
        grid=specs["grid"],
        in_specs=[union, union, specs["count"], specs["q"](dk), specs["kv"](t_kv, dk),
                  specs["kv"](t_kv, dv), specs["q"](dv), specs["rows"], specs["rows"]],
        out_specs=specs["q"](dk),
        out_shape=jax.ShapeDtypeStruct(q5.shape, q5.dtype),
        compiler_params=_bwd_params(plan),
        interpret=plan.interpret,
        name="nsa_selected_dq",
    )(starts, bits, count, q5, k, v, do5, lse, delta)


def _dkv(plan: Plan, q5, k, v, do5, lse, delta, entries):
    """dK, dV [B, num_key_tiles * l', H, D] from the key-tile entry lists."""
    b, tq, h, gp, dk = q5.shape
    dv, block = v.shape[-1], plan.block
    t_out = plan.num_key_tiles * block
    per_bh = lambda c, bh: (bh // h, bh % h, 0)
    whole_q = lambda dim: pl.BlockSpec((None, tq, None, gp, dim),
                                       lambda c, bh: (bh // h, 0, bh % h, 0, 0))
    key_tile = lambda dim: pl.BlockSpec((None, block, None, dim),
                                        lambda c, bh: (bh // h, c, bh % h, 0))
    entry_spec = pl.BlockSpec((None, None, entries[0].shape[-1]), per_bh)
    rows_spec = pl.BlockSpec((None, None, tq * gp), per_bh)
    return pl.pallas_call(
        functools.partial(_dkv_kernel, plan=plan),
        grid=(plan.num_key_tiles, b * h),
        in_specs=[entry_spec] * 3 + [pl.BlockSpec((None, None, plan.num_key_tiles + 1), per_bh),
                                     whole_q(dk), whole_q(dv), rows_spec, rows_spec,
                                     key_tile(dk), key_tile(dv)],
        out_specs=[key_tile(dk), key_tile(dv)],
        out_shape=[jax.ShapeDtypeStruct((b, t_out, h, dk), k.dtype),
                   jax.ShapeDtypeStruct((b, t_out, h, dv), v.dtype)],
        compiler_params=_bwd_params(plan),
        interpret=plan.interpret,
        name="nsa_selected_dkv",
    )(*entries, q5, do5, lse, delta, k, v)


# --- custom_vjp -----------------------------------------------------------------------------------

@functools.partial(jax.custom_vjp, nondiff_argnums=(0,))
def _selected(plan, q5, k, v, starts, bits, count):
    return _forward(plan, q5, k, v, starts, bits, count)[0]


def _selected_fwd(plan, q5, k, v, starts, bits, count):
    o5, lse = _forward(plan, q5, k, v, starts, bits, count)
    return o5, (q5, k, v, starts, bits, count, o5, lse)


def _selected_bwd(plan, res, do5):
    q5, k, v, starts, bits, count, o5, lse = res
    b, tq, h, gp, _ = q5.shape
    delta = jnp.sum(o5.astype(jnp.float32) * do5.astype(jnp.float32), axis=-1)
    delta = delta.transpose(0, 2, 1, 3).reshape(b, h, tq * gp)
    lse = jnp.where(jnp.isfinite(lse), lse, 0.0)  # such rows see nothing: p is masked to 0
    dq = _dq(plan, q5, k, v, do5, lse, delta, starts, bits, count)
    entries = key_tile_entries(starts, bits, count, plan.block, plan.num_key_tiles,
                               plan.entries_per_step, plan.aligned)
    dk, dv = _dkv(plan, q5, k, v, do5, lse, delta, entries)
    rows_kv = (None, k.shape[1], None, None)
    return dq, common.pad_to(dk, rows_kv), common.pad_to(dv, rows_kv), None, None, None


_selected.defvjp(_selected_fwd, _selected_bwd)


# --- Entry point ----------------------------------------------------------------------------------

def _check_inputs(q, k, v, indices):
    layout.check_token_kv(q, k, v)
    b, t, hq, dk = q.shape
    hkv = k.shape[2]
    common.check_dtypes("q, k, v", (q, k, v), SELECTED_DTYPES)
    if indices.ndim != 4 or indices.shape[:3] != (b, t, hkv) or indices.dtype != jnp.int32:
        raise ValueError(f"indices must be int32 [B, T, Hkv, n] = [{b}, {t}, {hkv}, n]; got "
                         f"{indices.dtype} {indices.shape}")


def _plan(q, k, v, cfg: NSAConfig, scale, interpret: bool, tiling: Tiling, aligned: bool) -> Plan:
    b, t, hq, dk = q.shape
    hkv, dkp, dvp = k.shape[2], common.pow2(dk), common.pow2(v.shape[3])
    gp = common.pow2(hq // hkv)
    qb = tiling.queries_per_program or max(1, common.MIN_ROWS // gp)
    # dK/dV gathers q and dO rows per step; float32 needs extra staging for its TF32 dots. On an
    # H100, 128 f32 rows of D=128 asked for 355 KiB of the 227 KiB of shared memory, and 128 bf16
    # rows of D=128 ran 3% faster than 256.
    budget = 2**16 if q.dtype.itemsize == 2 else 2**15
    bwd_rows = max(common.MIN_ROWS, common.pow2(budget // ((dkp + dvp) * q.dtype.itemsize) + 1) // 2)
    # Measured on an H100: one query per program is fastest with 2 warps and 3 stages; a tile of
    # several queries (G < 16, or a shared selection) with 4 and 2 (2 warps spill at 128 rows).
    return Plan(block=cfg.select_block, qb=qb, gp=gp,
                scale=float(dk ** -0.5 if scale is None else scale), num_kv_heads=hkv,
                num_key_tiles=cfg.num_blocks(t), aligned=aligned,
                entries_per_step=tiling.entries_per_step or max(1, bwd_rows // (qb * gp)),
                num_warps=tiling.num_warps or (2 if qb == 1 else 4),
                num_stages=tiling.num_stages or (3 if qb == 1 else 2),
                bwd_num_warps=tiling.bwd_num_warps, bwd_num_stages=tiling.bwd_num_stages,
                interpret=interpret)


def selected_attention(q, k, v, indices, cfg: NSAConfig, *, segment_ids=None, scale=None,
                       interpret=False, tiling: Tiling | None = None):
    """Attention of each query over the l'-token blocks its KV group selected: the semantics of
    nsa_jax.ops.selected_attention (nsa_spec.md §2.3).

    q [B, T, Hq, Dk], k [B, T, Hkv, Dk], v [B, T, Hkv, Dv] in one dtype of SELECTED_DTYPES;
    indices [B, T, Hkv, n] int32 block ids counted from the query's document start (-1 = none; a
    repeated id counts once); segment_ids [B, T] int or None. Block j of query t covers the keys
    doc_start[t] + j*l' ... + l' - 1, keys after t masked; a query with no visible key gets 0.
    Returns o [B, T, Hq, Dv] in q's dtype; softmax and sums in float32; scale defaults to
    1/sqrt(Dk). Raises ValueError for shapes or dtypes the kernels do not take.
    """
    _check_inputs(q, k, v, indices)
    b, t, hq, dk = q.shape
    hkv, dv, block = k.shape[2], v.shape[3], cfg.select_block
    g = hq // hkv
    plan = _plan(q, k, v, cfg, scale, interpret, tiling or Tiling(), segment_ids is None)
    tq = -(-t // plan.qb) * plan.qb
    check_row_count(tq, plan.gp)
    # An unaligned block may run up to l' - 1 keys past the last aligned tile.
    t_kv = plan.num_key_tiles * block + (0 if plan.aligned else block)
    q5 = common.pad_to(q.reshape(b, t, hkv, g, dk), (None, tq, None, plan.gp, common.pow2(dk)))
    kp = common.pad_to(k, (None, t_kv, None, common.pow2(dk)))
    vp = common.pad_to(v, (None, t_kv, None, common.pow2(dv)))
    starts = layout.selected_block_starts(indices, layout.positions(b, t)[:, :, None],
                                          layout.document_starts(segment_ids, b, t)[:, :, None],
                                          block)
    starts = jnp.pad(starts, ((0, 0), (0, tq - t), (0, 0), (0, 0)), constant_values=-1)
    o5 = _selected(plan, q5, kp, vp, *query_tile_union(starts, plan.qb))
    return o5[:, :t, :, :g, :dv].reshape(b, t, hq, dv)
