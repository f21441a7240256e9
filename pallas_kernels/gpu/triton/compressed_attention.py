"""NSA compressed-token attention on GPU (Pallas, Triton lowering): flash-style forward, dQ and
dK/dV kernels (no atomics) behind a custom_vjp, with the ops twin's signature.

Slot s (first raw token start[s], -1 for padding; see nsa_jax.layout) is visible to query t iff
doc_start[t] <= start[s] <= t - l + 1: the slot lies in t's document and ends at or before t.

* Forward and dQ, grid (query tile, batch * KV head): a program holds `qb * gp` rows (qb
  consecutive query positions times the gp padded heads of one KV group; row r is query r // gp)
  and walks the compressed-key tiles from the first slot of its first query's document to the
  last slot any of its queries can see.
* dK/dV, grid (key tile, batch * KV head): a program walks the query tiles that can see any slot
  of its key tile and writes its dK/dV tile once.
The tile ranges are computed in XLA (valid slot starts ascend, so a binary search finds them);
they are supersets, the kernels mask exactly. Heads per KV group are padded to a power of 2 (zero
queries, dropped on the way out), head dims to powers of 2, query positions to whole tiles
(documents starting at T: they see nothing) and slots to whole key tiles (start -1: never
visible). Padding is plain XLA, so its gradient is automatic.
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

_AFTER_ALL = jnp.iinfo(jnp.int32).max  # padding slots sort after every real start


@dataclasses.dataclass(frozen=True)
class Tiling:
    """Tile options (all sizes powers of 2)."""
    rows_per_program: int = 128  # query rows (positions x padded group heads) per fwd/dQ program
    key_block: int = 64  # compressed slots per forward/dQ loop step
    bwd_rows: int = 64  # query rows per dK/dV loop step
    bwd_key_block: int = 64  # compressed slots per dK/dV program
    num_warps: int | None = None  # forward: 8 for head dims >= 128, else 4
    num_stages: int = 2
    bwd_num_warps: int = 8
    bwd_num_stages: int = 2

    def __post_init__(self):
        for name in ("rows_per_program", "key_block", "bwd_rows", "bwd_key_block"):
            common.check_pow2(name, getattr(self, name))


@dataclasses.dataclass(frozen=True)
class Plan:
    """Static layout of the three kernels, derived from the Tiling, the config and the shapes
    (hashable: a custom_vjp nondiff argument)."""
    qb: int  # query positions per forward/dQ program
    gp: int  # heads per KV group, padded to a power of 2
    key_block: int  # compressed slots per forward/dQ loop step
    bwd_qb: int  # query positions per dK/dV loop step
    bwd_key_block: int  # compressed slots per dK/dV program
    compress_block: int  # l
    scale: float
    num_kv_heads: int
    num_warps: int
    tiling: Tiling
    interpret: bool

    @property
    def rows(self) -> int:
        return self.qb * self.gp


def query_positions_per_tile(gp: int, rows: int) -> int:
    """Query positions of `rows` rows (at least MIN_ROWS) when each carries gp heads."""
    return max(1, max(rows, common.MIN_ROWS) // gp)


# --- Loop ranges, built in XLA from the slot layout -----------------------------------------------

def _search(side: str, sorted_rows, values):
    """Row-wise jnp.searchsorted: sorted_rows [B, N], values [B, M] -> [B, M] int32."""
    fn = functools.partial(jnp.searchsorted, side=side)
    return jax.vmap(fn)(sorted_rows, values).astype(jnp.int32)


def _ascending(start):
    return jnp.where(start >= 0, start, _AFTER_ALL)


def first_slot_of_document(start, doc):
    """[B, T] index of the first slot at or after each query's document start."""
    return _search("left", _ascending(start), doc)


def key_tiles_per_query_tile(start, doc, qb: int, key_block: int, compress_block: int):
    """start [B, Tcp], doc [B, Tq] (Tq a multiple of qb) -> (lo, hi) [B, Tq // qb]: the key tiles
    holding any slot visible to a query of the tile."""
    tq = doc.shape[1]
    key = _ascending(start)
    lo = _search("left", key, doc[:, ::qb])
    last_query = jnp.arange(qb - 1, tq, qb, dtype=jnp.int32)
    hi = _search("right", key, jnp.broadcast_to(last_query - compress_block + 1, lo.shape))
    lo_tile = lo // key_block
    return lo_tile, jnp.where(hi > lo, -(-hi // key_block), lo_tile)


def query_tiles_per_key_tile(start, doc, qb: int, key_block: int, compress_block: int):
    """start [B, Tcp] (Tcp a multiple of key_block), doc [B, T] -> (lo, hi) [B, Tcp // key_block]:
    the query tiles of qb positions that may see a slot of the key tile. A slot is seen from its
    last token to the end of its document."""
    b, tcp = start.shape
    tiles = start.reshape(b, tcp // key_block, key_block)
    first, last = tiles[..., 0], tiles.max(axis=-1)
    valid = first >= 0
    last_doc = jnp.take_along_axis(doc, jnp.maximum(last, 0), axis=1)
    end = _search("right", doc, last_doc)  # one past the last query of that document
    lo = (first + compress_block - 1) // qb
    hi = -(-end // qb)
    return jnp.where(valid, lo, 0), jnp.where(valid & (hi > lo), hi, jnp.where(valid, lo, 0))


# --- Kernels --------------------------------------------------------------------------------------

def row_bounds(doc, first_query, qb: int, gp: int, compress_block: int):
    """[rows, 1] smallest and largest visible slot start of each row, from the doc_start [qb] of
    qb consecutive queries starting at `first_query`."""
    rows = qb * gp
    lowest = jnp.broadcast_to(doc[:, None], (qb, gp)).reshape(rows, 1)
    pos = first_query + jax.lax.broadcasted_iota(jnp.int32, (rows, 1), 0) // gp
    return lowest, pos - compress_block + 1


def slot_visible(start, lowest, highest):
    """[rows, slots]: padding slots (start -1) fail `start >= lowest` since lowest >= 0."""
    start = start[None, :]
    return (start >= lowest) & (start <= highest)


def _fwd_kernel(lo_ref, hi_ref, doc_ref, start_ref, q_ref, k_ref, v_ref, o_ref, lse_ref, *,
                plan: Plan):
    rows, kb = plan.rows, plan.key_block
    q = q_ref[...].reshape(rows, q_ref.shape[-1])
    lowest, highest = row_bounds(doc_ref[...], pl.program_id(0) * plan.qb, plan.qb, plan.gp,
                                 plan.compress_block)

    def step(j, carry):
        first = pl.multiple_of(j * kb, kb)
        mask = slot_visible(start_ref[pl.ds(first, kb)], lowest, highest)
        return common.online_softmax_step(carry, q, k_ref[pl.ds(first, kb), :],
                                          v_ref[pl.ds(first, kb), :], mask, plan.scale)

    carry = jax.lax.fori_loop(lo_ref[...], hi_ref[...], step,
                              common.empty_softmax(rows, v_ref.shape[-1]))
    o, lse = common.softmax_result(*carry)
    o_ref[...] = o.astype(o_ref.dtype).reshape(o_ref.shape)
    lse_ref[...] = lse.reshape(rows)


def _dq_kernel(lo_ref, hi_ref, doc_ref, start_ref, q_ref, k_ref, v_ref, do_ref, lse_ref,
               delta_ref, dq_ref, *, plan: Plan):
    rows, kb = plan.rows, plan.key_block
    q = q_ref[...].reshape(rows, q_ref.shape[-1])
    do = do_ref[...].reshape(rows, do_ref.shape[-1])
    lse, delta = lse_ref[...][:, None], delta_ref[...][:, None]
    lowest, highest = row_bounds(doc_ref[...], pl.program_id(0) * plan.qb, plan.qb, plan.gp,
                                 plan.compress_block)

    def step(j, dq):
        first = pl.multiple_of(j * kb, kb)
        k = k_ref[pl.ds(first, kb), :]
        mask = slot_visible(start_ref[pl.ds(first, kb)], lowest, highest)
        _, ds = common.recomputed_grads(q, k, v_ref[pl.ds(first, kb), :], do, lse, delta, mask,
                                        plan.scale)
        return dq + jnp.dot(ds.astype(k.dtype), k, preferred_element_type=jnp.float32)

    dq = jax.lax.fori_loop(lo_ref[...], hi_ref[...], step, jnp.zeros(q.shape, jnp.float32))
    dq_ref[...] = (dq * plan.scale).astype(dq_ref.dtype).reshape(dq_ref.shape)


def _dkv_kernel(lo_ref, hi_ref, doc_ref, start_ref, q_ref, do_ref, lse_ref, delta_ref, k_ref,
                v_ref, dk_ref, dv_ref, *, plan: Plan):
    qb, gp = plan.bwd_qb, plan.gp
    rows = qb * gp
    k, v = k_ref[...], v_ref[...]
    start = start_ref[...]

    def step(c, carry):
        dk, dv = carry
        first = pl.multiple_of(c * qb, qb)
        q = q_ref[pl.ds(first, qb)].reshape(rows, q_ref.shape[-1])
        do = do_ref[pl.ds(first, qb)].reshape(rows, do_ref.shape[-1])
        lse = lse_ref[pl.ds(first * gp, rows)][:, None]
        delta = delta_ref[pl.ds(first * gp, rows)][:, None]
        lowest, highest = row_bounds(doc_ref[pl.ds(first, qb)], first, qb, gp,
                                     plan.compress_block)
        mask = slot_visible(start, lowest, highest)
        p, ds = common.recomputed_grads(q, k, v, do, lse, delta, mask, plan.scale)
        return (dk + common.transposed_dot(ds.astype(q.dtype), q),
                dv + common.transposed_dot(p.astype(do.dtype), do))

    init = (jnp.zeros(k.shape, jnp.float32), jnp.zeros(v.shape, jnp.float32))
    dk, dv = jax.lax.fori_loop(lo_ref[...], hi_ref[...], step, init)
    dk_ref[...] = (dk * plan.scale).astype(dk_ref.dtype)
    dv_ref[...] = dv.astype(dv_ref.dtype)


# --- pallas_calls ---------------------------------------------------------------------------------

def query_tile_specs(plan: Plan, q_shape, num_slots: int):
    """BlockSpecs on the (query tile, batch * KV head) grid; q-like arrays are
    [B, Tq, H, gp, D], k/v [B, Tcp, H, D], per-row arrays [B, H, Tq * gp]."""
    h, qb, gp = plan.num_kv_heads, plan.qb, plan.gp
    return dict(
        tile=pl.BlockSpec((None, None), lambda c, bh: (bh // h, c)),
        doc=pl.BlockSpec((None, qb), lambda c, bh: (bh // h, c)),
        start=pl.BlockSpec((None, num_slots), lambda c, bh: (bh // h, 0)),
        q=lambda dim: pl.BlockSpec((None, qb, None, gp, dim), lambda c, bh: (bh // h, c, bh % h,
                                                                             0, 0)),
        kv=lambda dim: pl.BlockSpec((None, num_slots, None, dim), lambda c, bh: (bh // h, 0,
                                                                                 bh % h, 0)),
        rows=pl.BlockSpec((None, None, qb * gp), lambda c, bh: (bh // h, bh % h, c)),
        grid=(q_shape[1] // qb, q_shape[0] * h),
    )


def _forward(plan: Plan, q5, k, v, start, doc, lo, hi):
    """q5 [B, Tq, H, gp, Dk], k/v [B, Tcp, H, D], start [B, Tcp], doc [B, Tq], lo/hi [B, Tq/qb]
    key-tile ranges -> (o5 [B, Tq, H, gp, Dv], lse [B, H, Tq * gp] float32, -inf = nothing seen)."""
    b, tq, h, gp, dk = q5.shape
    dv = v.shape[-1]
    specs = query_tile_specs(plan, q5.shape, k.shape[1])
    return pl.pallas_call(
        functools.partial(_fwd_kernel, plan=plan),
        grid=specs["grid"],
        in_specs=[specs["tile"], specs["tile"], specs["doc"], specs["start"], specs["q"](dk),
                  specs["kv"](dk), specs["kv"](dv)],
        out_specs=[specs["q"](dv), specs["rows"]],
        out_shape=[jax.ShapeDtypeStruct((b, tq, h, gp, dv), v.dtype),
                   jax.ShapeDtypeStruct((b, h, tq * gp), jnp.float32)],
        compiler_params=common.compiler_params(plan.num_warps, plan.tiling.num_stages),
        interpret=plan.interpret,
        name="nsa_compressed_fwd",
    )(lo, hi, doc, start, q5, k, v)


def _bwd_params(plan: Plan):
    return common.compiler_params(plan.tiling.bwd_num_warps, plan.tiling.bwd_num_stages)


def _dq(plan: Plan, q5, k, v, do5, lse, delta, start, doc, lo, hi):
    """dQ [B, Tq, H, gp, Dk] on the forward grid (lse: finite stand-in 0 where -inf)."""
    dk, dv = q5.shape[-1], v.shape[-1]
    specs = query_tile_specs(plan, q5.shape, k.shape[1])
    return pl.pallas_call(
        functools.partial(_dq_kernel, plan=plan),
        grid=specs["grid"],
        in_specs=[specs["tile"], specs["tile"], specs["doc"], specs["start"], specs["q"](dk),
                  specs["kv"](dk), specs["kv"](dv), specs["q"](dv), specs["rows"],
                  specs["rows"]],
        out_specs=specs["q"](dk),
        out_shape=jax.ShapeDtypeStruct(q5.shape, q5.dtype),
        compiler_params=_bwd_params(plan),
        interpret=plan.interpret,
        name="nsa_compressed_dq",
    )(lo, hi, doc, start, q5, k, v, do5, lse, delta)


def _dkv(plan: Plan, q5, k, v, do5, lse, delta, start, doc, lo, hi):
    """dK, dV [B, Tcp, H, D]; lo/hi [B, Tcp / bwd_key_block] query-tile ranges per key tile."""
    b, tq, h, gp, dk = q5.shape
    dv, kb, t_kv = v.shape[-1], plan.bwd_key_block, k.shape[1]
    per_b = lambda c, bh: (bh // h, 0)
    whole_q = lambda dim: pl.BlockSpec((None, tq, None, gp, dim),
                                       lambda c, bh: (bh // h, 0, bh % h, 0, 0))
    key_tile = lambda dim: pl.BlockSpec((None, kb, None, dim), lambda c, bh: (bh // h, c, bh % h,
                                                                              0))
    rows_spec = pl.BlockSpec((None, None, tq * gp), lambda c, bh: (bh // h, bh % h, 0))
    tile = pl.BlockSpec((None, None), lambda c, bh: (bh // h, c))
    return pl.pallas_call(
        functools.partial(_dkv_kernel, plan=plan),
        grid=(t_kv // kb, b * h),
        in_specs=[tile, tile, pl.BlockSpec((None, tq), per_b),
                  pl.BlockSpec((None, kb), lambda c, bh: (bh // h, c)), whole_q(dk), whole_q(dv),
                  rows_spec, rows_spec, key_tile(dk), key_tile(dv)],
        out_specs=[key_tile(dk), key_tile(dv)],
        out_shape=[jax.ShapeDtypeStruct(k.shape, k.dtype), jax.ShapeDtypeStruct(v.shape, v.dtype)],
        compiler_params=_bwd_params(plan),
        interpret=plan.interpret,
        name="nsa_compressed_dkv",
    )(lo, hi, doc, start, q5, do5, lse, delta, k, v)


# --- custom_vjp -----------------------------------------------------------------------------------

@functools.partial(jax.custom_vjp, nondiff_argnums=(0,))
def _compressed(plan, q5, k, v, start, doc):
    lo, hi = key_tiles_per_query_tile(start, doc, plan.qb, plan.key_block, plan.compress_block)
    return _forward(plan, q5, k, v, start, doc, lo, hi)


def _compressed_fwd(plan, q5, k, v, start, doc):
    o5, lse = _compressed(plan, q5, k, v, start, doc)
    return (o5, lse), (q5, k, v, start, doc, o5, lse)


def _compressed_bwd(plan, res, cotangents):
    q5, k, v, start, doc, o5, lse = res
    do5, dlse = cotangents
    b, tq, h, gp, _ = q5.shape
    delta = jnp.sum(o5.astype(jnp.float32) * do5.astype(jnp.float32), axis=-1)
    # d lse / d logits = p, so the LSE cotangent enters as a shift of delta.
    delta = delta.transpose(0, 2, 1, 3).reshape(b, h, tq * gp) - dlse
    lse = jnp.where(jnp.isfinite(lse), lse, 0.0)  # such rows see nothing: p is masked to 0
    lo, hi = key_tiles_per_query_tile(start, doc, plan.qb, plan.key_block, plan.compress_block)
    dq = _dq(plan, q5, k, v, do5, lse, delta, start, doc, lo, hi)
    lo, hi = query_tiles_per_key_tile(start, doc, plan.bwd_qb, plan.bwd_key_block,
                                      plan.compress_block)
    dk, dv = _dkv(plan, q5, k, v, do5, lse, delta, start, doc, lo, hi)
    return dq, dk, dv, None, None


_compressed.defvjp(_compressed_fwd, _compressed_bwd)


# --- Entry point ----------------------------------------------------------------------------------

def group_queries(q, num_kv_heads: int, length: int):
    """q [B, T, Hq, D] -> [B, length, Hkv, gp, pow2(D)], zero padded. ValueError if length * gp
    rows would overflow the kernels' int32 row index."""
    b, t, hq, d = q.shape
    g = hq // num_kv_heads
    check_row_count(length, common.pow2(g))
    return common.pad_to(q.reshape(b, t, num_kv_heads, g, d),
                         (None, length, None, common.pow2(g), common.pow2(d)))


def padded_documents(segment_ids, batch: int, length: int, padded_length: int):
    """Document starts [B, padded_length]; padded queries form a document starting at T, so they
    see nothing."""
    return common.pad_to(layout.document_starts(segment_ids, batch, length), (None, padded_length),
                         value=length)


def rows_to_heads(rows, batch: int, length: int, q_heads: int):
    """Per-row values [B, Hkv, Tq * gp] -> [B, T, Hq]."""
    _, hkv, n = rows.shape
    gp = common.pow2(q_heads // hkv)
    x = rows.reshape(batch, hkv, n // gp, gp).transpose(0, 2, 1, 3)
    return x[:, :length, :, :q_heads // hkv].reshape(batch, length, q_heads)


def check_compressed_keys(q, k_cmp, cfg: NSAConfig, segment_ids, names: str):
    """k_cmp [B, Tc, Hkv, Dk] in the slot layout of nsa_jax.layout for q [B, T, Hq, Dk]."""
    if q.ndim != 4 or k_cmp.ndim != 4:
        raise ValueError(f"{names} must be [B, T, H, D]; got shapes {q.shape}, {k_cmp.shape}")
    b, t, hq, dk = q.shape
    tc = layout.num_compressed_slots(t, cfg, segment_ids is not None)
    hkv = k_cmp.shape[2]
    if k_cmp.shape != (b, tc, hkv, dk) or hq % hkv:
        raise ValueError(f"k_cmp must be [B, Tc, Hkv, Dk] = [{b}, {tc}, Hkv, {dk}] with Hkv "
                         f"dividing Hq={hq} for q {q.shape}; got {k_cmp.shape}")


def compressed_attention(q, k_cmp, v_cmp, cfg: NSAConfig, *, segment_ids=None, scale=None,
                         interpret=False, tiling: Tiling | None = None):
    """Attention of every query over the compressed tokens it may see, with its float32 LSE: the
    semantics of nsa_jax.ops.compressed_attention (nsa_spec.md §2.1).

    q [B, T, Hq, Dk], k_cmp [B, Tc, Hkv, Dk], v_cmp [B, Tc, Hkv, Dv] in one dtype of
    common.DTYPES, slots laid out as nsa_jax.layout says; segment_ids [B, T] int or None.
    Returns (o [B, T, Hq, Dv] in q's dtype, lse [B, T, Hq] float32); a query that sees nothing
    gets o = 0, lse = -inf and zero gradients. scale defaults to 1/sqrt(Dk). Raises ValueError for
    shapes or dtypes the kernels do not take.
    """
    check_compressed_keys(q, k_cmp, cfg, segment_ids, "q, k_cmp")
    if v_cmp.ndim != 4 or v_cmp.shape[:3] != k_cmp.shape[:3]:
        raise ValueError(f"v_cmp must be [B, Tc, Hkv, Dv] matching k_cmp {k_cmp.shape}; got "
                         f"{v_cmp.shape}")
    common.check_dtypes("q, k_cmp, v_cmp", (q, k_cmp, v_cmp))
    tiling = tiling or Tiling()
    b, t, hq, dk = q.shape
    tc, hkv, dv = k_cmp.shape[1], k_cmp.shape[2], v_cmp.shape[3]
    gp = common.pow2(hq // hkv)
    dkp, dvp = common.pow2(dk), common.pow2(dv)
    plan = Plan(qb=query_positions_per_tile(gp, tiling.rows_per_program), gp=gp,
                key_block=tiling.key_block,
                bwd_qb=query_positions_per_tile(gp, tiling.bwd_rows),
                bwd_key_block=tiling.bwd_key_block, compress_block=cfg.compress_block,
                scale=float(dk ** -0.5 if scale is None else scale), num_kv_heads=hkv,
                num_warps=tiling.num_warps or (8 if max(dkp, dvp) >= 128 else 4), tiling=tiling,
                interpret=interpret)
    step = max(plan.qb, plan.bwd_qb)
    tq = -(-t // step) * step
    slots = max(plan.key_block, plan.bwd_key_block)
    tcp = -(-max(tc, 1) // slots) * slots
    start = layout.compressed_layout(segment_ids, b, t, cfg).start
    o5, lse = _compressed(plan, group_queries(q, hkv, tq),
                          common.pad_to(k_cmp, (None, tcp, None, dkp)),
                          common.pad_to(v_cmp, (None, tcp, None, dvp)),
                          common.pad_to(start, (None, tcp), value=-1),
                          padded_documents(segment_ids, b, t, tq))
    o = o5[:, :t, :, :hq // hkv, :dv].reshape(b, t, hq, dv)
    return o, rows_to_heads(lse, b, t, hq)
