"""NSA selected-block attention on Hopper (Mosaic GPU): forward, dQ and dK/dV, block-outer.

Semantics are exactly `nsa_jax.ops.selected_attention` (paper arXiv 2502.11089, eq. 11-12 and
section 3.3.2): query t attends, with one softmax, to the keys of the blocks its KV group selected,
block j covering tokens doc_start[t] + [j*l', (j+1)*l'), keys after t masked; -1 slots, ids of
blocks that start after t, and repeats of an id count as nothing.

Design (block-outer, as FSA arXiv 2508.18224 and fla PR #961). XLA builds an inverted index: every
(query t, KV head, slot) "entry" is keyed by the 64-key tile of K/V it reads, entries are sorted by
tile and cut into work items of one tile and up to 64 // G positions per compute warpgroup (W
warpgroups per item share the tile). A persistent kernel walks contiguous item ranges: a producer
warpgroup TMA-loads the K/V tile once per item and gathers the G contiguous query-head rows of each
position (one TMA per position), so one wgmma tile multiplies 64 query-head rows of up to 64 // G
positions against the tile, each row masked to its own key range [lo, hi]. A block that straddles
two tiles (l' > 64, or packed documents whose blocks are not 64-aligned) becomes one entry per
tile; every formula below merges pieces of one row's key set, so that is exact.
* Forward writes each item's rows normalised (input dtype) with a float32 logsumexp; an XLA merge
  combines the pieces of a query by logsumexp weights.
* dQ recomputes P = exp(S - lse) per item and writes dQ pieces, summed in XLA.
* dK/dV accumulate in registers while consecutive items read the same tile and write one float32
  partial per (program, tile) run; XLA sums the runs of a tile with a segmented scan.
No atomics; every sum has a fixed order, so results are deterministic.

Cost at the paper shape (T=65,536, Hq=64, Hkv=4, G=16, D=128, l'=64, n=16, bf16, W=2, random
selections), per (position, KV head, slot) "pair"; 4.2M pairs:
* FLOPs: forward 4*T*Hq*n*l'*D = 2.2 TFLOP, dQ 3/2 and dK/dV 2x that (S and dP are recomputed).
* Query-outer (the Triton kernel): 32 KB of K/V per pair from L2 = 137 GB per forward.
* This design, forward: K/V 32 KB per item of 8 positions (4 KB per pair, mostly L2 hits: items
  are tile-sorted), Q rows 4 KB, partial O 4 KB written + 4 KB read by the merge: 16 KB per pair,
  67 GB, about 50 GB of it HBM (Q gathers and partials have no locality under random selections).
  dQ: + dO rows and dQ pieces (24 KB per pair); dK/dV: Q, dO rows + 4 KB K/V per pair, partials
  per run only. At G=4 or G=1 the same 64-row tiles are full, so the cost per (query head, key)
  pair stays that of G=16, while query-outer pays 4x/16x more K/V per pair.
Where the bandwidth of HBM, not L2->SM, limits: the forward at G=16 is bound by ~50 GB of HBM
traffic (~12 ms at 4.3 TB/s), the backward by tensor-core rate. `Tiling` lets the GPU run compare
warpgroup counts and ring depths.

TMA alignment (interpret mode does not check it; the rules: an SMEM destination or source starts
on a multiple of 128 bytes, 1024 for swizzled tiles; a GMEM start on 16 bytes; GMEM strides are
multiples of 16 bytes). Dk and Dv are zero-padded to multiples of 64, so one row of q, dO, K, V,
O or dQ is a multiple of 128 bytes, and every buffer starts on 1 KiB (Mosaic's scratch rule).
* K/V tile [64, D] -> swizzled ring slot: slots are 8 KiB multiples; GMEM rows of Hkv*D*2 bytes.
* meta row [M] int32 -> row 0 or 1 of a [2, M] buffer: M is a multiple of 32 words (128 bytes;
  a 48-byte M crashed the first GPU run with CUDA_ERROR_MISALIGNED_ADDRESS).
* per-row vectors [3 or 2, W, 64] -> ring slot: 256 * W bytes per vector row.
* query / dO rows of one position [G, D] -> rows r*G .. r*G + G - 1 of a warpgroup's [64, D] tile:
  when 8 divides G the tile is swizzled and r*G is a multiple of 8 (whole 1 KiB swizzle atoms);
  otherwise the tile is plain (unswizzled) SMEM, where row r*G starts at r*G*D*2 bytes, a multiple
  of 128 for any G, and the compute warpgroup re-lays it into a swizzled tile for wgmma. The spare
  rows 64 - (64 // G) * G follow the same rule. GMEM: q[b, t, h*G] starts at a multiple of D*2.
* outputs: O / dQ [64, D] from swizzled 8 KiB slices; lse [64] float32 at 256-byte steps; dK/dV
  through a [64, 16] float32 tile per warpgroup (4 KiB steps) into 64-byte GMEM column steps.
`tma_alignment_errors` checks these rules for a shape before any kernel is built.

Interpret mode (CPU, race detection) runs the same kernels; `common.mma` stages register operands
through SMEM there. Everything index-like is int32 and never forms products such as row * T * D:
TMA takes per-dimension coordinates, and XLA gathers use (item, row) pairs.
"""
from __future__ import annotations

import dataclasses
import functools
import math
from typing import NamedTuple

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import mosaic_gpu as plgpu

from nsa_jax import layout
from nsa_jax.config import NSAConfig
from pallas_kernels.gpu.mosaic import common

ROWS = 64  # query-head rows per compute warpgroup: the wgmma M dimension
KEYS = 64  # keys per K/V tile
LOG2E = math.log2(math.e)
SMEM_BYTES = 227 * 1024  # per block on H100/H200
TMA_ALIGN = 128  # bytes: a TMA copy's SMEM start must be a multiple (1024 for swizzled tiles)
# dK/dV partials leave through a narrow float32 SMEM tile: runs end rarely, and the SMEM is
# better spent on ring stages.
FLUSH_COLUMNS = 16
_BIG = jnp.iinfo(jnp.int32).max


@dataclasses.dataclass(frozen=True)
class Tiling:
    """Tile options (hashable: a custom_vjp static argument).

    compute_wgs: warpgroups of 64 query-head rows sharing each K/V tile (1 or 2; 2 ping-pongs the
      tensor core like FA3, 1 leaves more registers and SMEM per warpgroup).
    stages: depth of the K/V + query-row ring (None: the deepest that fits in SMEM, at most 3).
    num_programs: persistent blocks, each walking one contiguous range of items (None: 132, the
      H100/H200 SM count; 2 in interpret mode).
    query_chunk: query positions per pass (None: as many as keep the per-pass partial outputs
      under 16 GiB); each pass builds its own index, so memory stays bounded at any T.
    fused_backward: one backward kernel computing dK/dV and dQ from the same gathered rows (half
      the row traffic, more registers live), or a dQ kernel and a dK/dV kernel.
    """
    compute_wgs: int = 2
    stages: int | None = None
    num_programs: int | None = None
    query_chunk: int | None = None
    fused_backward: bool = True

    def __post_init__(self):
        if self.compute_wgs not in (1, 2):
            raise ValueError(f"tiling.compute_wgs must be 1 or 2, got {self.compute_wgs}")
        for name in ("stages", "num_programs", "query_chunk"):
            value = getattr(self, name)
            if value is not None and (not isinstance(value, int) or value < 1):
                raise ValueError(f"tiling.{name} must be a positive int or None, got {value!r}")


class Shape(NamedTuple):
    """Static sizes of one call (hashable)."""
    batch: int
    length: int
    kv_heads: int
    group: int
    dk: int  # padded to a multiple of 64
    dv: int
    pieces: int  # K/V tiles one selected block can touch
    scale: float
    wgs: int
    programs: int
    interpret: bool

    @property
    def per_wg(self) -> int:  # positions per compute warpgroup tile
        return ROWS // self.group

    @property
    def tiles(self) -> int:
        return -(-self.length // KEYS)

    @property
    def aligned_rows(self) -> bool:  # G-row groups start on 8-row swizzle tiles
        return self.group % 8 == 0


class Items(NamedTuple):
    """The inverted index of one pass (int32 throughout).

    work [programs + 1]: program p owns items work[p] .. work[p + 1] - 1.
    meta [I, M]: (batch * Hkv + KV head, K/V tile, the positions of the W * 64 // G entries).
    rows [I, 3, W, 64]: per query-head row its visible keys lo..hi (relative to the tile; lo > hi
      for padding rows), and the dK/dV segment the item closes (-1: none), broadcast.
    ent_item, ent_row [B, Hkv, Tq, n * pieces]: where each entry's G rows went (item -1: nowhere).
    seg_key [S]: the tile (batch * Hkv + KV head) * tiles + tile of each dK/dV segment.
    """
    work: jax.Array
    meta: jax.Array
    rows: jax.Array
    ent_item: jax.Array
    ent_row: jax.Array
    seg_key: jax.Array


def _first_occurrence(ids):
    """[..., n] bool: the slot's id does not appear in an earlier slot."""
    n = ids.shape[-1]
    earlier = jnp.tril(jnp.ones((n, n), bool), k=-1)
    return ~jnp.any((ids[..., :, None] == ids[..., None, :]) & earlier, axis=-1)


def _entries(indices, doc_start, t0: int, block: int, pieces: int):
    """Per entry [B, Hkv, Tq, n, pieces]: tile key part, visible key range relative to the tile,
    validity, and absolute query position. int32-safe: an id is compared with the query's own
    block before it is multiplied by l'."""
    tq = indices.shape[1]
    pos = t0 + jnp.arange(tq, dtype=jnp.int32)[None, None, :, None]
    ds = doc_start[:, None, :, None]
    ids = jnp.moveaxis(indices, 2, 1)  # [B, Hkv, Tq, n]
    valid = (ids >= 0) & (ids <= (pos - ds) // block) & _first_occurrence(ids)
    start = ds + jnp.where(valid, ids, 0) * block  # <= pos
    last = jnp.minimum(start + (block - 1), pos)
    tile = (start // KEYS)[..., None] + jnp.arange(pieces, dtype=jnp.int32)
    ok = valid[..., None] & (tile * KEYS <= last[..., None])
    lo = jnp.maximum(start[..., None] - tile * KEYS, 0)
    hi = jnp.minimum(last[..., None] - tile * KEYS, KEYS - 1)
    return tile, lo, hi, ok, jnp.broadcast_to(pos[..., None], ok.shape)


def build_items(indices, doc_start, t0: int, block: int, shape: Shape) -> Items:
    """The inverted index (see `Items`) for queries t0 .. t0 + Tq - 1 of indices [B, Tq, Hkv, n]
    and doc_start [B, Tq] int32."""
    b, tq, hkv, n = indices.shape
    nkt, per_item = shape.tiles, shape.wgs * shape.per_wg
    tile, lo, hi, ok, pos = _entries(indices, doc_start, t0, block, shape.pieces)
    bh = jnp.arange(b * hkv, dtype=jnp.int32).reshape(b, hkv, 1, 1, 1)
    key = jnp.where(ok, bh * nkt + tile, _BIG).reshape(-1)
    order = jnp.argsort(key, stable=True).astype(jnp.int32)  # tile-major, then position
    key = key[order]
    item, slot, opens, count = _pack(key, per_item)
    runs = min(key.shape[0], b * hkv * nkt)  # distinct tiles
    num_items = -(-key.shape[0] // per_item) + runs
    dest = jnp.where(item >= 0, item, num_items)  # out of range: dropped (-1 would wrap)
    per_entry = lambda x, fill=0: jnp.full((num_items, per_item), fill, jnp.int32).at[
        dest, slot].set(x.reshape(-1)[order], mode="drop")
    head = jnp.full((num_items,), _BIG, jnp.int32).at[jnp.where(opens, item, num_items)].set(
        key, mode="drop")  # the item's tile key
    meta = jnp.zeros((num_items, _meta_width(shape)), jnp.int32)
    meta = meta.at[:, 2:2 + per_item].set(per_entry(pos))
    used = head != _BIG
    meta = meta.at[:, 0].set(jnp.where(used, head // nkt, 0))
    meta = meta.at[:, 1].set(jnp.where(used, head % nkt, 0))
    per = -(-count // shape.programs)
    work = jnp.minimum(jnp.arange(shape.programs + 1, dtype=jnp.int32) * per, count)
    seg, seg_key = _segments(head, per, min(num_items, shape.programs + runs))
    rows = jnp.stack([_spread(per_entry(lo, KEYS), shape, KEYS),
                      _spread(per_entry(hi, -1), shape, -1),
                      jnp.broadcast_to(seg[:, None, None], (num_items,) + (shape.wgs, ROWS))], 1)
    unsort = lambda x: jnp.zeros(key.shape, jnp.int32).at[order].set(x).reshape(
        b, hkv, tq, n * shape.pieces)
    row = (slot // shape.per_wg) * ROWS + (slot % shape.per_wg) * shape.group
    return Items(work, meta, rows, unsort(item), unsort(row), seg_key)


def _pack(key, per_item: int):
    """Cut the sorted entries into items of up to `per_item` entries of one tile: each entry's
    item (-1 for dead entries) and slot in it, which entries open an item, and the item count."""
    live = key != _BIG
    first = jnp.concatenate([jnp.ones((1,), bool), key[1:] != key[:-1]])
    i = jnp.arange(key.shape[0], dtype=jnp.int32)
    slot = (i - lax.cummax(jnp.where(first, i, 0))) % per_item
    opens = live & (slot == 0)
    item = jnp.where(live, jnp.cumsum(opens, dtype=jnp.int32) - 1, -1)
    return item, slot, opens, jnp.sum(opens, dtype=jnp.int32)


def _spread(per_entry, shape: Shape, fill: int):
    """[I, W * 64 // G] per entry -> [I, W, 64] per query-head row (padding rows get `fill`)."""
    x = jnp.repeat(per_entry.reshape(per_entry.shape[0], shape.wgs, shape.per_wg), shape.group, 2)
    return jnp.pad(x, ((0, 0), (0, 0), (0, ROWS - x.shape[2])), constant_values=fill)


def _segments(head, per, max_segments: int):
    """dK/dV runs: consecutive items of one program reading one tile (head [I]: the items' tile
    keys, _BIG past the last item). Per item, the segment it closes (-1 if none); per segment,
    its tile key (_BIG if unused)."""
    live = head != _BIG
    i = jnp.arange(head.shape[0], dtype=jnp.int32)
    opens = live & ((i % jnp.maximum(per, 1) == 0) | (head != jnp.roll(head, 1)))
    seg = jnp.cumsum(opens, dtype=jnp.int32) - 1
    closes = live & jnp.roll(opens | ~live, -1).at[-1].set(True)
    seg_key = jnp.full((max_segments,), _BIG, jnp.int32).at[
        jnp.where(opens, seg, max_segments)].set(head, mode="drop")
    return jnp.where(closes, seg, -1), seg_key


# ------------------------------------------------------------------------------------------------
# The item pipeline: one producer warpgroup feeds W compute warpgroups through a ring of `stages`
# slots; each slot holds one item's K/V tile, the gathered rows of its positions and its per-row
# vectors. The three kernels differ only in what they gather and in `compute`.

class _Kind(NamedTuple):
    name: str
    gathered: int  # row tensors gathered per position: q (forward) or q and dO
    vectors: int  # per-row vector inputs: rows (lo, hi, segment) and, backward, (lse, delta)


FWD, DQ, DKV = _Kind("fwd", 1, 1), _Kind("dq", 2, 2), _Kind("dkv", 2, 2)
BWD = _Kind("bwd", 2, 2)  # dK/dV and dQ in one pass over the items


def _buffer_bytes(shape_, dtype) -> int:
    return -(-math.prod(shape_) * jnp.dtype(dtype).itemsize // 1024) * 1024  # 1 KiB aligned


def _smem_bytes(kind: _Kind, shape: Shape, dtype, stages: int) -> int:
    """SMEM the compiled kernel allocates (the interpret-only staging buffer excluded)."""
    w, dims = shape.wgs, (shape.dk, shape.dv)
    total = sum(_buffer_bytes((stages, KEYS, d), dtype) for d in dims)
    total += sum(_buffer_bytes((stages, w, ROWS, d), dtype) for d in dims[:kind.gathered])
    total += _buffer_bytes((stages, 3, w, ROWS), jnp.int32)
    total += _buffer_bytes((stages, 2, w, ROWS), jnp.float32) * (kind.vectors - 1)
    total += _buffer_bytes((2, _meta_width(shape)), jnp.int32)
    if not shape.aligned_rows:
        total += sum(_buffer_bytes((w, ROWS, d), dtype) for d in dims[:kind.gathered])
    if kind is FWD:
        total += _buffer_bytes((w, ROWS, shape.dv), dtype) + _buffer_bytes((w, ROWS), jnp.float32)
    if kind in (DKV, BWD):
        total += _buffer_bytes((w, ROWS, FLUSH_COLUMNS), jnp.float32)
    if kind is BWD:
        total += _buffer_bytes((w, KEYS, ROWS), dtype)
    return total + 1024  # barriers


def _meta_width(shape: Shape) -> int:
    """int32 words per `Items.meta` row, a multiple of TMA_ALIGN bytes: row 1 of the producer's
    two-deep SMEM copy must start on a TMA-aligned address (row 1 at 48 bytes was the
    misaligned-address crash of the first GPU run)."""
    words = TMA_ALIGN // 4
    return -(-(2 + shape.wgs * shape.per_wg) // words) * words


def tma_alignment_errors(shape: Shape, dtype) -> list[str]:
    """The TMA alignment rules of the module docstring that `shape` breaks (empty: none)."""
    size = jnp.dtype(dtype).itemsize
    errors = [f"Dk={shape.dk}, Dv={shape.dv}: rows of {d * size} bytes, not a multiple of "
              f"{TMA_ALIGN}" for d in (shape.dk, shape.dv) if d * size % TMA_ALIGN]
    if _meta_width(shape) * 4 % TMA_ALIGN:
        errors.append(f"meta rows of {_meta_width(shape) * 4} bytes")
    return errors


def ring_depth(kind: _Kind, shape: Shape, dtype, stages: int | None) -> int:
    """`stages`, or the deepest ring (<= 3) whose buffers fit in SMEM; ValueError if none does."""
    fits = [s for s in (1, 2, 3) if _smem_bytes(kind, shape, dtype, s) <= SMEM_BYTES]
    if stages is None and fits:
        return fits[-1]
    if stages is not None and _smem_bytes(kind, shape, dtype, stages) <= SMEM_BYTES:
        return stages
    need = _smem_bytes(kind, shape, dtype, stages or 1)
    raise ValueError(
        f"selected_attention {kind.name}: {stages or 1} stage(s) of Dk={shape.dk}, "
        f"Dv={shape.dv}, compute_wgs={shape.wgs} need {need} bytes of SMEM "
        f"(limit {SMEM_BYTES}); use fewer stages or tiling.compute_wgs=1")


class _Bufs(NamedTuple):
    tiles: tuple  # [stages, 64, D] tiled, K then V
    rows: tuple  # [stages, W, 64, D], q (then dO); tiled when G-row groups are 8-aligned
    vectors: tuple  # [stages, 3, W, 64] int32 (then [stages, 2, W, 64] float32)
    meta: object  # [2, M] int32, the producer's own two-deep prefetch
    relayout: tuple  # [W, 64, D] tiled copies of `rows` (unaligned G only)
    staging: object  # [W, 64, 64], interpret mode only (common.mma)
    out: tuple  # kernel-specific output staging
    loaded: object
    consumed: object
    meta_ready: object


def _produce(shape: Shape, stages: int, srcs, bufs: _Bufs):
    """The producer warpgroup: for each item of this program, TMA its K/V tile, vectors and the G
    query-head rows of each of its positions into the next free ring slot."""
    plgpu.set_max_registers(40, action="decrease")
    work, meta_ref, tile_srcs, row_srcs, vector_srcs = srcs
    cta = lax.axis_index("cta")
    first, n = work[cta], work[cta + 1] - work[cta]
    g, pw = shape.group, shape.per_wg

    @pl.when(n > 0)
    def _():
        plgpu.copy_gmem_to_smem(meta_ref.at[first], bufs.meta.at[0], bufs.meta_ready.at[0])

    @pl.loop(0, n)
    def _(j):
        parity, slot = lax.rem(j, 2), lax.rem(j, stages)

        @pl.when(j + 1 < n)
        def _():
            plgpu.commit_smem()  # our reads of this buffer (item j - 1) precede the TMA write
            plgpu.copy_gmem_to_smem(meta_ref.at[first + j + 1], bufs.meta.at[1 - parity],
                                    bufs.meta_ready.at[1 - parity])

        plgpu.barrier_wait(bufs.meta_ready.at[parity])

        @pl.when(j >= stages)
        def _():
            plgpu.barrier_wait(bufs.consumed.at[slot])

        head = bufs.meta[parity, 0]
        b, h = lax.div(head, shape.kv_heads), lax.rem(head, shape.kv_heads)
        loaded = bufs.loaded.at[slot]
        keys = pl.ds(bufs.meta[parity, 1] * KEYS, KEYS)
        for src, dst in zip(tile_srcs, bufs.tiles):
            plgpu.copy_gmem_to_smem(src.at[b, keys, h], dst.at[slot], loaded)
        for src, dst in zip(vector_srcs, bufs.vectors):
            plgpu.copy_gmem_to_smem(src.at[first + j], dst.at[slot], loaded)
        heads = pl.ds(h * g, g)

        def gather(e, w, r):  # entry e = position r of warpgroup w's rows
            t = bufs.meta[parity, 2 + e]
            for src, dst in zip(row_srcs, bufs.rows):
                plgpu.copy_gmem_to_smem(src.at[b, t, heads], dst.at[slot, w, pl.ds(r * g, g)],
                                        loaded)

        if shape.aligned_rows:  # few entries, static (8-row aligned) offsets into swizzled tiles
            for e in range(shape.wgs * pw):
                gather(e, *divmod(e, pw))
        else:  # up to 128 entries: a loop keeps the kernel small; plain SMEM takes any offset
            pl.loop(0, shape.wgs * pw)(lambda e: gather(e, lax.div(e, pw), lax.rem(e, pw)))
        spare = ROWS - pw * g  # rows no position owns: any finite data (their keys are masked)
        for w in range(shape.wgs if spare else 0):
            for src, dst in zip(row_srcs, bufs.rows):
                plgpu.copy_gmem_to_smem(src.at[b, 0, pl.ds(0, spare)],
                                        dst.at[slot, w, pl.ds(pw * g, spare)], loaded)

    @pl.loop(jnp.maximum(n - stages, 0), n)  # observe every release, as barriers require
    def _(j):
        plgpu.barrier_wait(bufs.consumed.at[lax.rem(j, stages)])


def _copies_per_item(kind: _Kind, shape: Shape) -> int:
    spare = ROWS - shape.per_wg * shape.group
    return 2 + kind.vectors + kind.gathered * shape.wgs * (shape.per_wg + (spare > 0))


def _consume(shape: Shape, stages: int, work, bufs: _Bufs, compute, init):
    """A compute warpgroup: `compute(item, rows, tiles, vectors, carry, release) -> carry` for
    each item of this program, on this warpgroup's 64 rows, from carry = init()."""
    plgpu.set_max_registers(232 if shape.wgs == 2 else 240, action="increase")
    cta, wg = lax.axis_index("cta"), lax.axis_index("wg")
    first, n = work[cta], work[cta + 1] - work[cta]

    def step(j, carry):
        slot = lax.rem(j, stages)
        plgpu.barrier_wait(bufs.loaded.at[slot])
        rows = [src.at[slot, wg] for src in bufs.rows]
        if not shape.aligned_rows:  # wgmma reads 8-row swizzled tiles: re-lay the gathered rows
            for src, dst in zip(rows, bufs.relayout):
                dst[wg] = src[...]
            plgpu.commit_smem()
            rows = [dst.at[wg] for dst in bufs.relayout]
        tiles = [src.at[slot] for src in bufs.tiles]
        vectors = [src.at[slot, :, wg] for src in bufs.vectors]
        release = lambda: plgpu.barrier_arrive(bufs.consumed.at[slot])
        return compute(first + j, rows, tiles, vectors, carry, release)

    lax.fori_loop(0, n, step, init())
    plgpu.wait_smem_to_gmem(0)


def _launch(kind: _Kind, shape: Shape, stages: int, inputs, vectors, work, meta, compute_for,
            out_type, out_scratch, init=lambda: None):
    """Run the pipeline. inputs: (q[, dO], k, v); vectors: the per-item row vectors;
    compute_for(out_refs, out_bufs, staging) -> compute."""
    dtype = inputs[0].dtype
    w, dims = shape.wgs, (shape.dk, shape.dv)
    row_buffer = common.tiled_smem if shape.aligned_rows else plgpu.SMEM
    scratch = _Bufs(
        tiles=tuple(common.tiled_smem((stages, KEYS, d), dtype) for d in dims),
        rows=tuple(row_buffer((stages, w, ROWS, d), dtype) for d in dims[:kind.gathered]),
        vectors=tuple(plgpu.SMEM((stages,) + x.shape[1:], x.dtype) for x in vectors),
        meta=plgpu.SMEM((2, meta.shape[1]), jnp.int32),
        relayout=() if shape.aligned_rows else tuple(
            common.tiled_smem((w, ROWS, d), dtype) for d in dims[:kind.gathered]),
        staging=common.tiled_smem((w, ROWS, KEYS), dtype) if shape.interpret else None,
        out=out_scratch,
        loaded=plgpu.Barrier(num_arrivals=_copies_per_item(kind, shape), num_barriers=stages),
        consumed=plgpu.Barrier(num_arrivals=w, num_barriers=stages),
        meta_ready=plgpu.Barrier(num_arrivals=1, num_barriers=2))
    num_in = len(inputs) + len(vectors) + 2

    def body(*refs):
        ins, outs, bufs = refs[:num_in], refs[num_in:-1], refs[-1]
        rows_in, (k_ref, v_ref) = ins[:kind.gathered], ins[kind.gathered:kind.gathered + 2]
        vec_in, (work_ref, meta_ref) = ins[kind.gathered + 2:-2], ins[-2:]
        wg = lax.axis_index("wg")

        @pl.when(wg == w)
        def _():
            _produce(shape, stages, (work_ref, meta_ref, (k_ref, v_ref), rows_in, vec_in), bufs)

        @pl.when(wg < w)
        def _():
            _consume(shape, stages, work_ref, bufs, compute_for(outs, bufs.out, bufs.staging),
                     init)

    return plgpu.kernel(
        body, out_type=out_type, scratch_types=[scratch], grid=(shape.programs,),
        grid_names=("cta",), num_threads=w + 1, thread_name="wg",
        compiler_params=plgpu.CompilerParams(approx_math=True),
        interpret=common.interpret_params() if shape.interpret else False,
    )(*inputs, *vectors, work, meta)


# ------------------------------------------------------------------------------------------------
# The three computations on one item (64 query-head rows x 64 keys of one warpgroup).

def _row_vector(ref, transposed: bool, shape2):
    """A per-row vector [64] from SMEM, broadcast to the [rows, keys] (or transposed) tile."""
    x = plgpu.load(ref, layout=plgpu.Layout.WGMMA.reduce(0 if transposed else 1))
    return lax.broadcast_in_dim(x, shape2, [1 if transposed else 0])


def _visible(rows_vec, transposed: bool):
    """[64, 64] bool: the key (tile column) lies in the row's range lo..hi."""
    shape2 = (KEYS, ROWS) if transposed else (ROWS, KEYS)
    key = plgpu.broadcasted_iota(jnp.int32, shape2, 0 if transposed else 1,
                                 layout=plgpu.Layout.WGMMA)
    lo = _row_vector(rows_vec.at[0], transposed, shape2)
    hi = _row_vector(rows_vec.at[1], transposed, shape2)
    return (key >= lo) & (key <= hi)


def _probabilities(shape: Shape, q, k, rows_vec, stats_vec, transposed: bool):
    """P = exp(S - lse) on the visible keys (0 elsewhere), S = scale * q k^T; transposed: P^T."""
    if transposed:
        s = common.matmul(k, q.transpose((1, 0)), (KEYS, ROWS))
    else:
        s = common.matmul(q, k.transpose((1, 0)), (ROWS, KEYS))
    lse = _row_vector(stats_vec.at[0], transposed, s.shape)
    p = jnp.exp2(s * (shape.scale * LOG2E) - lse * LOG2E)
    return jnp.where(_visible(rows_vec, transposed), p, 0.0)


def _zeros(rows: int, cols: int):
    return plgpu.layout_cast(jnp.zeros((rows, cols), jnp.float32), plgpu.Layout.WGMMA)


def _forward_compute(shape: Shape, dtype):
    def compute_for(outs, out_bufs, staging):
        o_ref, lse_ref = outs
        o_stage, lse_stage = out_bufs
        wg = lax.axis_index("wg")
        stage = None if staging is None else staging.at[wg]

        def compute(item, rows, tiles, vectors, carry, release):
            (q,), (k, v), (rows_vec,) = rows, tiles, vectors
            s = common.matmul(q, k.transpose((1, 0)), (ROWS, KEYS)) * (shape.scale * LOG2E)
            s = jnp.where(_visible(rows_vec, False), s, -jnp.inf)
            m = s.max(axis=1)
            m = jnp.where(m == -jnp.inf, 0.0, m)  # a row with nothing visible: p = 0, o = 0
            p = jnp.exp2(s - lax.broadcast_in_dim(m, s.shape, [0]))
            total = p.sum(axis=1)
            o = common.mma(_zeros(ROWS, shape.dv), p.astype(dtype), v,
                           interpret=shape.interpret, staging=stage)
            release()
            seen = total > 0
            inv = jnp.where(seen, 1.0 / jnp.where(seen, total, 1.0), 0.0)
            o = o * lax.broadcast_in_dim(inv, o.shape, [0])
            lse = jnp.where(seen, (m + jnp.log2(jnp.where(seen, total, 1.0))) / LOG2E, -jnp.inf)
            plgpu.wait_smem_to_gmem(0, wait_read_only=True)  # the previous item's stores
            o_stage[wg] = o.astype(dtype)
            lse_stage[wg] = lse
            plgpu.commit_smem()
            plgpu.copy_smem_to_gmem(o_stage.at[wg], o_ref.at[item, wg])
            plgpu.copy_smem_to_gmem(lse_stage.at[wg], lse_ref.at[item, wg])
            return carry

        return compute
    return compute_for


def _dq_compute(shape: Shape, dtype):
    def compute_for(outs, out_bufs, staging):
        (dq_ref,) = outs
        wg = lax.axis_index("wg")
        stage = None if staging is None else staging.at[wg]

        def compute(item, rows, tiles, vectors, carry, release):
            (q, do), (k, v), (rows_vec, stats_vec) = rows, tiles, vectors
            p = _probabilities(shape, q, k, rows_vec, stats_vec, False)
            dp = common.matmul(do, v.transpose((1, 0)), (ROWS, KEYS))
            ds = p * (dp - _row_vector(stats_vec.at[1], False, p.shape))
            dq = common.mma(_zeros(ROWS, shape.dk), ds.astype(dtype), k,
                            interpret=shape.interpret, staging=stage)
            _store_rows(dq * shape.scale, q, dq_ref.at[item, wg])
            release()
            return carry

        return compute
    return compute_for


def _dkv_compute(shape: Shape, dtype, with_dq: bool):
    """dK/dV (transposed: keys x rows) accumulated over a run of items; with_dq also writes each
    item's dQ = dS K, through dS^T staged in SMEM (read back transposed as the wgmma A operand)."""
    def compute_for(outs, out_bufs, staging):
        flush_stage, *ds_stage = out_bufs
        dk_ref, dv_ref = outs[-2:]
        wg = lax.axis_index("wg")
        stage = None if staging is None else staging.at[wg]

        def compute(item, rows, tiles, vectors, carry, release):
            (q, do), (k, v), (rows_vec, stats_vec) = rows, tiles, vectors
            dk, dv = carry
            segment = rows_vec[2, 0]
            pt = _probabilities(shape, q, k, rows_vec, stats_vec, True)
            dpt = common.matmul(v, do.transpose((1, 0)), (KEYS, ROWS))
            dst = (pt * (dpt - _row_vector(stats_vec.at[1], True, pt.shape))).astype(dtype)
            dv = common.mma(dv, pt.astype(dtype), do, interpret=shape.interpret, staging=stage)
            dk = common.mma(dk, dst, q, interpret=shape.interpret, staging=stage)
            if with_dq:
                ds_stage[0][wg] = dst
                plgpu.commit_smem()
                dq = common.matmul(ds_stage[0].at[wg].transpose((1, 0)), k, (ROWS, shape.dk))
                _store_rows(dq * shape.scale, q, outs[0].at[item, wg])
            release()

            @pl.when(segment >= 0)
            def _():
                for acc, ref in ((dk, dk_ref), (dv, dv_ref)):
                    _flush(acc, ref.at[segment, wg], flush_stage.at[wg])

            keep = jnp.where(segment >= 0, 0.0, 1.0)
            return dk * keep, dv * keep

        return compute
    return compute_for


def _store_rows(x, stage, dst):
    """Write float32 rows x [64, D] to GMEM in the input dtype through `stage` (the item's query
    rows, no longer needed), and wait until the copy has read it: the slot is then free."""
    stage[...] = x.astype(stage.dtype)
    plgpu.commit_smem()
    plgpu.copy_smem_to_gmem(stage, dst)
    plgpu.wait_smem_to_gmem(0, wait_read_only=True)


def _flush(acc, dst, stage):
    """Write a float32 [64, D] accumulator to GMEM through a [64, FLUSH_COLUMNS] SMEM tile."""
    width = stage.shape[-1]
    for c in range(acc.shape[1] // width):
        plgpu.wait_smem_to_gmem(0, wait_read_only=True)
        stage[...] = acc[:, c * width:(c + 1) * width]
        plgpu.commit_smem()
        plgpu.copy_smem_to_gmem(stage, dst.at[:, pl.ds(c * width, width)])


# ------------------------------------------------------------------------------------------------
# XLA around the kernels: merging the pieces of each query, and the custom_vjp.

def _entry_rows(x, items: Items, group: int):
    """Item-ordered rows x [I, W, 64, ...] -> [B, Hkv, Tq, n * pieces, G, ...] per entry, and
    which entries exist. Gathers by (item, row) pairs, so no flat index can overflow."""
    flat = x.reshape(x.shape[0], -1, *x.shape[3:])
    live = items.ent_item >= 0
    item = jnp.where(live, items.ent_item, 0)[..., None]
    return flat[item, items.ent_row[..., None] + jnp.arange(group, dtype=jnp.int32)], live


def _to_query_heads(x):
    """[B, Hkv, Tq, G, ...] -> [B, Tq, Hkv * G, ...]."""
    x = jnp.moveaxis(x, 1, 2)
    return x.reshape(*x.shape[:2], x.shape[2] * x.shape[3], *x.shape[4:])


def _merge_forward(o_items, lse_items, items: Items, group: int):
    """Combine each query's pieces (softmax over disjoint key sets) by logsumexp weights:
    o [B, Tq, Hq, Dv] float32 and lse [B, Tq, Hq] (-inf and o = 0 where nothing is visible)."""
    o, live = _entry_rows(o_items, items, group)
    lse, _ = _entry_rows(lse_items, items, group)
    lse = jnp.where(live[..., None], lse, -jnp.inf)
    top = jnp.max(lse, axis=3, keepdims=True)
    top = jnp.where(jnp.isfinite(top), top, 0.0)
    weight = jnp.exp(lse - top)  # [B, Hkv, Tq, S, G]
    total = jnp.sum(weight, axis=3)
    seen = total > 0
    out = jnp.sum(weight[..., None] * o.astype(jnp.float32), axis=3)  # fuses with the gather
    out = out / jnp.where(seen, total, 1.0)[..., None]
    lse = jnp.where(seen, jnp.log(jnp.where(seen, total, 1.0)) + top[:, :, :, 0], -jnp.inf)
    return _to_query_heads(out), _to_query_heads(lse)


def _row_stats(items: Items, shape: Shape, lse, delta):
    """Per item row [I, 2, W, 64] float32: the query-head row's final lse (-inf -> 0: such a row
    sees nothing) and delta = rowsum(dO * O)."""
    pw, g = shape.per_wg, shape.group
    head = items.meta[:, 0]
    b, h = head // shape.kv_heads, head % shape.kv_heads
    r = jnp.arange(ROWS, dtype=jnp.int32)
    entry = jnp.minimum(r // g, pw - 1)
    pos = items.meta[:, 2:2 + shape.wgs * pw].reshape(-1, shape.wgs, pw)[:, :, entry]
    q_head = h[:, None, None] * g + r % g
    rows = lambda x: x[b[:, None, None], pos, q_head]
    lse = jnp.where(jnp.isfinite(lse), lse, 0.0)
    return jnp.stack([rows(lse), rows(delta)], axis=1)


def _reduce_segments(part, seg_key, num_keys: int):
    """Sum the dK/dV partials [S, W, 64, D] of each tile key (segments sorted by key) with a
    segmented scan, so the order of every sum is fixed: [num_keys, 64, D] float32."""
    live = seg_key != _BIG
    x = jnp.where(live[:, None, None], part.sum(axis=1), 0.0)
    starts = jnp.concatenate([jnp.ones((1,), bool), seg_key[1:] != seg_key[:-1]])

    def combine(a, b):
        return a[0] | b[0], jnp.where(b[0][:, None, None], b[1], a[1] + b[1])

    _, prefix = lax.associative_scan(combine, (starts, x))
    keys = jnp.arange(num_keys, dtype=jnp.int32)
    last = jnp.clip(jnp.searchsorted(seg_key, keys, side="right") - 1, 0, None)
    found = seg_key[last] == keys
    return jnp.where(found[:, None, None], prefix[last], 0.0)


def _forward_pass(shape: Shape, tiling: Tiling, q, k, v, items: Items):
    dtype, w = q.dtype, shape.wgs
    num_items = items.meta.shape[0]
    out_type = (jax.ShapeDtypeStruct((num_items, w, ROWS, shape.dv), dtype),
                jax.ShapeDtypeStruct((num_items, w, ROWS), jnp.float32))
    out_scratch = (common.tiled_smem((w, ROWS, shape.dv), dtype),
                   plgpu.SMEM((w, ROWS), jnp.float32))
    stages = ring_depth(FWD, shape, dtype, tiling.stages)
    o_items, lse_items = _launch(FWD, shape, stages, (q, k, v), (items.rows,), items.work,
                                 items.meta, _forward_compute(shape, dtype), out_type,
                                 out_scratch)
    return _merge_forward(o_items, lse_items, items, shape.group)


def _backward_pass(shape: Shape, tiling: Tiling, q, k, v, do, lse, delta, items: Items):
    """dQ of the pass's queries [B, Tq, Hq, Dk] and its float32 dK, dV over all keys: one fused
    kernel, or (tiling.fused_backward=False) a dQ kernel then a dK/dV kernel."""
    dtype, w = q.dtype, shape.wgs
    num_items, num_segments = items.meta.shape[0], items.seg_key.shape[0]
    args = ((q, do, k, v), (items.rows, _row_stats(items, shape, lse, delta)), items.work,
            items.meta)
    dq_type = jax.ShapeDtypeStruct((num_items, w, ROWS, shape.dk), dtype)
    dkv_type = tuple(jax.ShapeDtypeStruct((num_segments, w, ROWS, d), jnp.float32)
                     for d in (shape.dk, shape.dv))
    flush_stage = plgpu.SMEM((w, ROWS, FLUSH_COLUMNS), jnp.float32)
    init = lambda: (_zeros(KEYS, shape.dk), _zeros(KEYS, shape.dv))
    if tiling.fused_backward:
        stages = ring_depth(BWD, shape, dtype, tiling.stages)
        dq_items, dk, dv = _launch(BWD, shape, stages, *args, _dkv_compute(shape, dtype, True),
                                   (dq_type, *dkv_type),
                                   (flush_stage, common.tiled_smem((w, KEYS, ROWS), dtype)), init)
    else:
        stages = ring_depth(DQ, shape, dtype, tiling.stages)
        (dq_items,) = _launch(DQ, shape, stages, *args, _dq_compute(shape, dtype), (dq_type,), ())
        stages = ring_depth(DKV, shape, dtype, tiling.stages)
        dk, dv = _launch(DKV, shape, stages, *args, _dkv_compute(shape, dtype, False), dkv_type,
                         (flush_stage,), init)
    dq, live = _entry_rows(dq_items, items, shape.group)
    dq = jnp.sum(jnp.where(live[..., None, None], dq.astype(jnp.float32), 0.0), axis=3)
    num_keys = shape.batch * shape.kv_heads * shape.tiles
    per_key = lambda x: jnp.moveaxis(_reduce_segments(x, items.seg_key, num_keys).reshape(
        shape.batch, shape.kv_heads, shape.tiles * KEYS, -1), 1, 2)
    return _to_query_heads(dq), per_key(dk) * shape.scale, per_key(dv)


def _run_forward(shape, tiling, q, k, v, passes):
    parts = [_forward_pass(shape, tiling, q, k, v, items) for items in passes]
    o = jnp.concatenate([o for o, _ in parts], axis=1).astype(q.dtype)
    return o, jnp.concatenate([lse for _, lse in parts], axis=1)


@functools.partial(jax.custom_vjp, nondiff_argnums=(0, 1))
def _attention(shape: Shape, tiling: Tiling, q, k, v, passes):
    return _run_forward(shape, tiling, q, k, v, passes)[0]


def _attention_fwd(shape, tiling, q, k, v, passes):
    o, lse = _run_forward(shape, tiling, q, k, v, passes)
    return o, (q, k, v, passes, o, lse)


def _attention_bwd(shape, tiling, res, do):
    q, k, v, passes, o, lse = res
    do = do.astype(q.dtype)
    delta = jnp.sum(o.astype(jnp.float32) * do.astype(jnp.float32), axis=-1)
    dq, dk, dv = [], 0.0, 0.0
    for items in passes:
        dq_c, dk_c, dv_c = _backward_pass(shape, tiling, q, k, v, do, lse, delta, items)
        dq, dk, dv = dq + [dq_c], dk + dk_c, dv + dv_c
    dq = jnp.concatenate(dq, axis=1).astype(q.dtype)
    return dq, dk.astype(k.dtype), dv.astype(v.dtype), None


_attention.defvjp(_attention_fwd, _attention_bwd)


# ------------------------------------------------------------------------------------------------
# Public entry points.

def _check_inputs(q, k, v, indices, cfg, doc_start, tiling):
    if not isinstance(cfg, NSAConfig):
        raise ValueError(f"cfg must be an NSAConfig, got {type(cfg).__name__}")
    if tiling is not None and not isinstance(tiling, Tiling):
        raise ValueError(f"tiling must be a selected_attention.Tiling or None, got {tiling!r}")
    layout.check_token_kv(q, k, v)
    b, t, hq, dk = q.shape
    hkv = k.shape[2]
    if hq // hkv > ROWS:
        raise ValueError(f"at most {ROWS} query heads per KV head; got {hq} over {hkv}")
    if not (q.dtype == k.dtype == v.dtype) or q.dtype not in (jnp.bfloat16, jnp.float16):
        raise ValueError(f"q, k, v must share one 16-bit dtype (bfloat16 or float16; float32 runs "
                         f"on the Triton or xla paths); got {q.dtype}, {k.dtype}, {v.dtype}")
    if indices.ndim != 4 or indices.shape[:3] != (b, t, hkv) or indices.dtype != jnp.int32:
        raise ValueError(f"indices must be int32 [B, T, Hkv, n] = [{b}, {t}, {hkv}, n]; got "
                         f"{indices.dtype} {indices.shape}")
    if doc_start is not None and (doc_start.shape != (b, t) or doc_start.dtype != jnp.int32):
        raise ValueError(f"doc_start must be int32 [B, T] = [{b}, {t}]; got {doc_start.dtype} "
                         f"{doc_start.shape}")


def _round_up(x: int, m: int) -> int:
    return -(-x // m) * m


def _query_chunk(tiling: Tiling, b: int, t: int, hq: int, n: int, pieces: int, d: int,
                 itemsize: int) -> int:
    """Query positions per pass: every pass's partial outputs stay under 16 GiB."""
    if tiling.query_chunk is not None:
        return min(tiling.query_chunk, t)
    per_position = b * hq * n * pieces * d * itemsize
    return min(t, max(KEYS, (2**34 // per_position) // KEYS * KEYS))


def selected_attention(q, k, v, indices, cfg: NSAConfig, *, doc_start=None, scale=None,
                       interpret: bool = False, tiling: Tiling | None = None):
    """Attention of each query over the l'-token blocks its KV group selected (NSA eq. 11-12).

    q [B, T, Hq, Dk], k [B, T, Hkv, Dk], v [B, T, Hkv, Dv], bfloat16 or float16 (one dtype);
    indices [B, T, Hkv, n] int32 block ids counted from the query's document start: block j of
    query t covers keys doc_start[t] + j*l' .. + l' - 1, keys after t masked. -1 slots, ids of
    blocks starting after t (e.g. >= the number of blocks) and repeats of an id count as nothing;
    a query with no visible key gets exactly 0. doc_start [B, T] int32: first token of each
    token's document (None: one document per row), e.g.
    nsa_jax.ops.layout.document_starts(segment_ids, B, T). scale: softmax scale (None:
    1/sqrt(Dk)). interpret: run in Mosaic GPU interpret mode (CPU). tiling: `Tiling` options.

    Returns o [B, T, Hq, Dv] in q's dtype; softmax, merges and dK/dV sums in float32. Any group
    size G = Hq / Hkv <= 64 and any Dk, Dv (zero-padded to multiples of 64). Differentiable in
    q, k, v (custom_vjp: the dQ and dK/dV kernels). Raises ValueError on bad shapes or dtypes
    (float32 is refused: it runs on the Triton or xla paths) and when the tiles do not fit in SMEM.
    """
    _check_inputs(q, k, v, indices, cfg, doc_start, tiling)
    tiling = tiling or Tiling()
    b, t, hq, dk = q.shape
    hkv, dv, block = k.shape[2], v.shape[3], cfg.select_block
    aligned = doc_start is None and (block % KEYS == 0 or KEYS % block == 0)
    pieces = -(-block // KEYS) + (0 if aligned else 1)
    dkp, dvp = _round_up(dk, 64), _round_up(dv, 64)
    programs = tiling.num_programs or (2 if interpret else 132)
    shape = Shape(b, t, hkv, hq // hkv, dkp, dvp, pieces,
                  float(dk ** -0.5 if scale is None else scale), tiling.compute_wgs, programs,
                  bool(interpret))
    assert not tma_alignment_errors(shape, q.dtype), tma_alignment_errors(shape, q.dtype)
    for kind in (FWD, BWD) if tiling.fused_backward else (FWD, DQ, DKV):  # fail early
        ring_depth(kind, shape, q.dtype, tiling.stages)
    pad = lambda x, rows, d: jnp.pad(x, ((0, 0), (0, rows - x.shape[1]), (0, 0),
                                         (0, d - x.shape[3])))
    tk = shape.tiles * KEYS  # whole K/V tiles, so every TMA load stays in bounds
    qp, kp, vp = pad(q, t, dkp), pad(k, tk, dkp), pad(v, tk, dvp)
    if doc_start is None:
        doc_start = jnp.zeros((b, t), jnp.int32)
    chunk = _query_chunk(tiling, b, t, hq, indices.shape[3], pieces, max(dkp, dvp),
                         q.dtype.itemsize)
    passes = tuple(build_items(indices[:, c:c + chunk], doc_start[:, c:c + chunk], c, block,
                               shape) for c in range(0, t, chunk))
    return _attention(shape, tiling, qp, kp, vp, passes)[..., :dv]


# ------------------------------------------------------------------------------------------------
# The ops' entry point (nsa_jax.ops.dispatch, "selected_attention" on Hopper).

def supports(q, k, v, indices, cfg, *args, **kwargs) -> bool:
    """Whether `selected_attention_op` takes these arguments: q, k, v in one 16-bit dtype,
    Hq a multiple of Hkv with G = Hq / Hkv <= 64, and the default tiles' rings fitting in SMEM
    (Dk, Dv up to 256 once padded to multiples of 64)."""
    if not (q.dtype == k.dtype == v.dtype) or q.dtype not in (jnp.bfloat16, jnp.float16):
        return False
    hq, hkv = q.shape[2], k.shape[2]
    if hq % hkv or hq // hkv > ROWS:
        return False
    shape = Shape(q.shape[0], q.shape[1], hkv, hq // hkv, _round_up(q.shape[3], 64),
                  _round_up(v.shape[3], 64), 2, 1.0, Tiling().compute_wgs, 132, False)
    try:
        for kind in (FWD, BWD):
            ring_depth(kind, shape, q.dtype, None)
    except ValueError:
        return False
    return True


def selected_attention_op(q, k, v, indices, cfg: NSAConfig, *, segment_ids=None, scale=None,
                          interpret: bool = False, tiling: Tiling | None = None):
    """nsa_jax.ops.selected_attention on Hopper (paper eq. 11-12; nsa_spec.md §2.3): q
    [B, T, Hq, Dk], k [B, T, Hkv, Dk], v [B, T, Hkv, Dv] in one 16-bit dtype, indices
    [B, T, Hkv, n] int32 document-relative block ids, segment_ids [B, T] or None -> o
    [B, T, Hq, Dv] in q's dtype. Raises ValueError for the inputs `supports` rejects."""
    if not supports(q, k, v, indices, cfg):
        raise ValueError(
            f"the Mosaic selected-attention kernels need q, k, v in one of bfloat16/float16 "
            f"(got {q.dtype}, {k.dtype}, {v.dtype}), Hq a multiple of Hkv with at most {ROWS} "
            f"query heads per KV head (got Hq={q.shape[2]}, Hkv={k.shape[2]}) and head dims "
            f"whose tiles fit in SMEM (got Dk={q.shape[3]}, Dv={v.shape[3]})")
    doc_start = None
    if segment_ids is not None:
        doc_start = layout.document_starts(segment_ids, q.shape[0], q.shape[1])
    return selected_attention(q, k, v, indices.astype(jnp.int32), cfg, doc_start=doc_start,
                              scale=scale, interpret=interpret, tiling=tiling)


def reference(q, k, v, indices, cfg: NSAConfig, *, doc_start=None, scale=None):
    """Dense-mask float32 oracle of `selected_attention` (O(T^2) memory; small T only)."""
    b, t, hq, dk = q.shape
    hkv = k.shape[2]
    ds = jnp.zeros((b, t), jnp.int32) if doc_start is None else doc_start
    key_block = (jnp.arange(t) - ds) // cfg.select_block  # [B, Tk], in the key's own document
    ids = jnp.where(_first_occurrence(indices), indices, -1)
    chosen = jnp.any(ids[..., None] == key_block[:, None, None, None, :], axis=-2)
    causal = jnp.arange(t)[None, :] <= jnp.arange(t)[:, None]
    same_doc = ds[:, :, None] == ds[:, None, :]
    mask = chosen & (causal & same_doc)[:, :, None, :]  # [B, Tq, Hkv, Tk]
    qg = q.astype(jnp.float32).reshape(b, t, hkv, hq // hkv, dk)
    logits = jnp.einsum("bqhgd,bkhd->bqhgk", qg, k.astype(jnp.float32), precision="highest")
    logits = jnp.where(mask[:, :, :, None], logits * (dk ** -0.5 if scale is None else scale),
                       -jnp.inf)
    top = jnp.max(logits, axis=-1, keepdims=True)
    p = jnp.exp(logits - jnp.where(jnp.isfinite(top), top, 0.0))
    p = p / jnp.maximum(p.sum(-1, keepdims=True), 1e-30)
    o = jnp.einsum("bqhgk,bkhd->bqhgd", p, v.astype(jnp.float32), precision="highest")
    return o.reshape(b, t, hq, -1)
