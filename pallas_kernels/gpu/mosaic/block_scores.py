"""Selection-block scores on Hopper (Mosaic GPU): the compressed branch's probabilities, recomputed
from its LSE, mapped onto selection blocks by chunk overlap and summed over each KV head's group,
in float32 and exact up to float32 rounding (nsa_spec.md, block scores; paper eq. 8-9).

score[b, h, t, j] = sum over the G query heads g of KV head h and over the compressed slots i of
t's document visible to t (i*d + l - 1 <= t - doc_start[t]) of
overlap(i, j) * exp(s[t, g, i] * scale - lse[t, g]), overlap(i, j) = the number of stride-d chunks
that compressed token i ([i*d, i*d + l)) shares with block j ([j*l', (j+1)*l')): 1,2,2,2,1 for
l=32, d=16, l'=64. Block ids count from the query's document start.

Kernel (FA3's structure, as JAX's pallas/ops/gpu/attention_mgpu.py): one program per
(64 query positions, KV head, batch); two compute warpgroups and one TMA producer warpgroup.
- Rows are query positions, so the sum over the G heads is a register add: for each head g the
  producer streams the [64, Dk] tile q[b, t0:t0+64, h*G + g] into a ring both compute warpgroups
  read; each computes S = Q_g K_tileᵀ on wgmma and adds p = exp2(S*scale*log2e - lse*log2e) into
  its running sum `psum` [64, kb + X].
- The compressed slots are walked in sub-tiles of kb = `Tiling.slots` slots (nb = kb*d/l'
  selection blocks); warpgroup w takes sub-tiles w, w+2, w+4, ... (one K ring per warpgroup).
  A sub-tile loads the kb slots whose first chunk lies in its blocks plus the X slots before
  them (X = l/d - 1 rounded up to 16, pad slots in front of k_cmp keep the first load in bounds):
  their chunks spill into its first block, so sub-tiles need no carry.
- After the G heads, block scores [64, nb] = psum @ W with W the constant [kb + X, nb] overlap
  matrix, on wgmma and exact: psum is split by bit masking into three bfloat16-exact pieces
  (hi = psum with the low 16 bits cleared, mid likewise of psum - hi, lo = the rest) and the three
  products (small-integer weights, exact in bf16) accumulate in float32. Unlike a round trip
  through astype(bfloat16), a bit mask cannot be folded away by a compiler's excess-precision
  rewrite, so the split stays exact compiled and interpreted.
- Packed documents: a program's 64 positions may span documents; it loops over the documents
  present (usually one) with the other rows' lse set to +inf (p = 0), adding into the same psum:
  every row belongs to one document and column c is document-relative slot i0 + c for all of
  them, so the sum is exact. Masks (causality, slots before the document) apply only to
  sub-tiles that some row does not fully see.
- Columns past a program's last needed sub-tile are written as zeros (no slot is visible there),
  so the output equals nsa_jax.ops.block_scores, transposed to [B, Hkv, T, NB]. When the needed
  sub-tiles are odd in number, warpgroup 1 skips its surplus one (barriers only).
- K layout: the TMA of an (8, 64)-tiled SMEM tile must start on a row multiple of 8, so k_cmp is
  re-laid out with every document's slot 0 on such a row (`aligned_rows`; unpacked: a pad).

Precision: S in float32 on wgmma (exact bf16 products); p = exp2(S*c - lse2) with c and
lse2 = lse*log2(e) rounded to float32 and ex2.approx (2 ulp): relative error of p ~ |log2 p| *
2^-24 + 2^-22.5; the group and overlap sums accumulate in float32. Scores match the float64
definition to ~1e-7 relative (tests: 1e-5 vs the float32 oracle, exact top-n at 1e-6 near-ties).

Cost on paper, paper shape (B=1, T=64k, Hq=64, Hkv=4, Dk=128, l=32, d=16, l'=64): visible
(position, head, slot) pairs ~ Hq*T^2/(2d) = 8.6e9, so the recomputed Q·K_cmpᵀ is
2*pairs*Dk = 2.2e12 FLOP: 367 TFLOP/s for the 6 ms target if nothing else took
time, ~440 TFLOP/s with ~1 ms left for the top-n. Per S element an SM spends 2*Dk = 256 FLOP
on wgmma (~4096 dense bf16 FLOP/clk: 16 elements/clk) and one ex2 on the SFU (16/clk): the
tensor cores and the SFU carry equal loads (FA3's forward has 512 FLOP per exp2). With the
work inflation below (~9.9e9 elements) that is ~2.7 ms on each unit at a sustained 1.75 GHz,
plus ~0.7 ms of FMA/add issue (one FMA and one add per element on the fast path).
Measured on the H200 (2026-11-30, 64k, paper): 6.19 ms with free-running warpgroups, i.e.
matmul and exp2 ran one after the other (2.7 + 2.7 + 0.7): each warpgroup waits for its
matmul before its exp2, and two free-running warpgroups fall into step. The first ping-pong
(one rendezvous per head step, after issuing the matmul) keeps them in step on purpose:
6.85 ms. Overlap needs `Tiling.schedule` "alternate" (FA3's two-phase ping-pong: one
warpgroup's matmul while the other's exp2; per head step max(MMA, SFU) instead of their sum)
or "pipeline" (each warpgroup issues head h+1's matmul before head h's exp2; 1 in G exp2s not
overlapped, 216 registers per thread at kb=128, or kb=64 with 25% spill work and 120
registers). Either predicts ~3.5-4 ms at 64k (paper) if the units overlap fully, ~5 ms if
half; experiments/bench_select.py times all four schedules.
Work inflation: X/kb = 12.5% recomputed spill slots (kb=128) and ~kb/2 slots per row at the
causal edge (~3% of an average row's visible slots at 64k, ~25% at 8k).
Alternatives, per the same count:
- Grouped rows (position x head in wgmma's M, Q resident, as the range-attention kernel): the
  group sum then crosses rows, and mapping each (position, head) row to blocks before summing
  costs 3*2*(kb+X)*nb FLOP per row and sub-tile, 0.84x the Q·Kᵀ work (nb=32, Dk=128).
- Rows = positions with the two warpgroups on different positions sharing one K tile: Q_g is
  re-read per (sub-tile, head) at kb FLOP/byte = 128: 17 GB of Q reads at 64k over a 66 MB
  working set (132 programs x 512 KB), more than the 50 MB L2, i.e. HBM-bound (~4 ms). Sharing Q
  between the warpgroups (chosen) halves that: 256 FLOP/byte, 8.6 GB, a 33 MB working set.
- The overlap mapping per head instead of after the group sum: G times the 3-piece matmul
  (3*nb/Dk = 0.75x the Q·Kᵀ work at G=16, nb=32); after the sum it is 5% (G=16), 21% (G=4).
- Output: [B, Hkv, T, NB] float32 is 1 GiB at 64k (68 GiB at 512k): callers bound memory by
  scoring query chunks (`query_start`, `num_queries`) and selecting per chunk.

Registers per compute thread: psum (kb+X)/2 = 72 and S 72 float32 at kb=128, within FA3's 232
(schedule "pipeline": a second S, 216).
SMEM (Dk=128, G=16): Q ring 3 x 16 KiB, K rings 2 x 2 x 36 KiB, W 9 KiB, lse 4 KiB, output
staging 16 KiB = 221 KiB of 227 (`Tiling.smem_bytes`, `Tiling.for_shape`).
"""
from __future__ import annotations

import dataclasses
import functools
import math

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import mosaic_gpu as plgpu

from nsa_jax import layout, selection_rule
from nsa_jax.config import NSAConfig
from pallas_kernels.gpu import top_n
from pallas_kernels.gpu.mosaic import common

BLOCK_ROWS = 64  # query positions per program: wgmma's M
COMPUTE_WGS = 2
SMEM_BYTES = 227 * 1024  # per thread block on H100 / H200
LOG2E = math.log2(math.e)
WGMMA = plgpu.Layout.WGMMA
ROW = plgpu.Layout.WGMMA.reduce(1)  # one value per accumulator row
SUPPORTED_DTYPES = (jnp.dtype(jnp.bfloat16), jnp.dtype(jnp.float16))
_HIGH_HALF = np.int32(-65536)  # 0xFFFF0000: sign, exponent and the 7 mantissa bits bf16 keeps
SCHEDULES = ("free", "ping_pong", "alternate", "pipeline")  # Tiling.schedule


# ----------------------------------------------------------------------------- tile options


@dataclasses.dataclass(frozen=True)
class Tiling:
    """slots: compressed slots per warpgroup sub-tile (kb, a multiple of 16 and of l'/d);
    q_stages: depth of the shared Q ring; k_stages: depth of each warpgroup's K ring;
    schedule: how the two compute warpgroups' matmuls and exp2s interleave (SCHEDULES):
    - "free" (default): no coordination; each warpgroup waits for its matmul, then runs exp2.
      Fastest on the H200 (2026-11-30) at T=64k: paper shape 6.19 ms, small-group 4.66 ms.
    - "ping_pong": one rendezvous per head step, right after issuing the matmul (6.85 and
      5.45 ms at 64k): both warpgroups then wait for their matmuls and run exp2 in the same
      phase, so it mostly serialises them.
    - "alternate": FA3's ping-pong, two rendezvous per head step (after the matmul completes
      and after the exp2s), warpgroup 1 one phase behind: one warpgroup's matmul runs while
      the other's exp2 does, so the tensor cores and the SFU overlap.
    - "pipeline": each warpgroup issues head h+1's matmul before the exp2 of head h (two S
      tiles live: ~3 * width / 2 registers of float32 per thread, 216 at 144 columns)."""

    slots: int = 128
    q_stages: int = 3
    k_stages: int = 2
    schedule: str = "free"

    def __post_init__(self):
        if self.slots < 16 or self.slots % 16:
            raise ValueError(f"Tiling.slots must be a positive multiple of 16, got "
                             f"{self.slots}")
        if self.q_stages < 2 or self.k_stages < 1:
            raise ValueError(f"Tiling needs q_stages >= 2 and k_stages >= 1, got "
                             f"{self.q_stages}, {self.k_stages}")
        if self.schedule not in SCHEDULES:
            raise ValueError(f"Tiling.schedule must be one of {SCHEDULES}, got "
                             f"{self.schedule!r}")

    def smem_bytes(self, cfg: NSAConfig, dk: int, group: int, dtype) -> int:
        """Shared memory of one program, in bytes."""
        geo = Geometry.of(cfg, self.slots)
        size = jnp.dtype(dtype).itemsize
        return (self.q_stages * BLOCK_ROWS * dk * size
                + COMPUTE_WGS * self.k_stages * geo.width * dk * size
                + geo.width * geo.blocks * 2 + group * BLOCK_ROWS * 4
                + COMPUTE_WGS * BLOCK_ROWS * geo.blocks * 4)

    @classmethod
    def for_shape(cls, cfg: NSAConfig, dk: int, group: int, dtype, slots: int = 128,
                  schedule: str = "free"):
        """The deepest rings (Q first, then K) of `slots`-slot sub-tiles that fit in SMEM, else
        of half as many slots (e.g. Dk = 256)."""
        options = [(s, q, k) for s in (slots, slots // 2) for q, k in ((3, 2), (2, 2), (2, 1))]
        for option in options:
            tiling = cls(*option, schedule=schedule)
            if tiling.smem_bytes(cfg, dk, group, dtype) <= SMEM_BYTES:
                return tiling
        return cls(slots, 2, 1, schedule=schedule)  # check() names the shortfall


@dataclasses.dataclass(frozen=True)
class Geometry:
    """Where a sub-tile's slots and blocks lie (all in stride-d chunks of the document)."""

    slots: int  # kb: slots whose first chunk lies in the sub-tile's blocks
    blocks: int  # nb = kb / ratio
    ratio: int  # r = l' / d: chunks per selection block
    spill: int  # E = l / d - 1: chunks a slot reaches past its first one
    extra: int  # X: E rounded up to wgmma's K step (16), the slots loaded before the sub-tile

    @classmethod
    def of(cls, cfg: NSAConfig, slots: int) -> Geometry:
        ratio = cfg.select_block // cfg.compress_stride
        spill = cfg.compress_block // cfg.compress_stride - 1
        return cls(slots=slots, blocks=slots // ratio, ratio=ratio, spill=spill,
                   extra=-(-spill // 16) * 16)

    @property
    def width(self) -> int:
        """Columns of S and psum: the X spill slots, then the kb own slots."""
        return self.extra + self.slots

    def overlap_matrix(self):
        """W [width, nb] bfloat16: chunks shared by column c (document-relative slot
        i0 + c, i0 = s*kb - X for sub-tile s) and the sub-tile's block jj (exact small ints)."""
        first = np.arange(self.width)[:, None] - self.extra  # slot's first chunk, sub-tile-relative
        block = np.arange(self.blocks)[None, :] * self.ratio
        shared = (np.minimum(first + self.spill, block + self.ratio - 1)
                  - np.maximum(first, block) + 1)
        return jnp.asarray(np.maximum(shared, 0), jnp.bfloat16)


def check(cfg: NSAConfig, tiling: Tiling, dk: int, group: int, dtype) -> Geometry:
    """The sub-tile geometry, or ValueError if this kernel cannot run the shape (the dispatcher
    then falls back to the Triton or xla path)."""
    if jnp.dtype(dtype) not in SUPPORTED_DTYPES:
        raise ValueError(f"q must be bfloat16 or float16 for the Mosaic block-score kernel, got "
                         f"{jnp.dtype(dtype)}")
    if dk % 64:
        raise ValueError(f"Dk must be a multiple of 64 (128-byte swizzled rows for wgmma), got "
                         f"{dk}")
    geo = Geometry.of(cfg, tiling.slots)
    if tiling.slots % geo.ratio or geo.blocks % 16:
        raise ValueError(
            f"Tiling.slots ({tiling.slots}) must be a multiple of 16 * l'/d = "
            f"{16 * geo.ratio} (whole selection blocks; W's rows of nb bf16 must be a 32-byte "
            f"swizzle at least)")
    if geo.width > 256:
        raise ValueError(f"Tiling.slots + spill slots = {geo.width} exceeds wgmma's N of 256; "
                         f"use fewer slots (l/d = {geo.spill + 1})")
    if group > 256:
        raise ValueError(f"group size Hq/Hkv must be <= 256 (one TMA box of lse), got {group}")
    used = tiling.smem_bytes(cfg, dk, group, dtype)
    if used > SMEM_BYTES:
        raise ValueError(f"{tiling} needs {used} bytes of shared memory for Dk={dk}, G={group}; "
                         f"H100/H200 have {SMEM_BYTES}. Use fewer slots or stages.")
    return geo


# ----------------------------------------------------------------------------- layout


def aligned_rows(slot_start_BTc, doc_start_BT, cfg: NSAConfig, geo: Geometry):
    """Where k_cmp's slots go in the kernel's K layout, whose every document starts on a row
    multiple of 8 (the TMA of an (8, 64)-tiled SMEM tile starts on a whole tile of rows):
    (row of each slot [B, Tc] int32, -1 for padding slots; the number of rows, static).

    Slot s holds a compressed token starting at raw token slot_start[s] (-1: padding, last); a
    document's slots are contiguous and in order (nsa_jax.layout.compressed_layout), so its
    slot i is slot first + i. In the K layout it sits on row X + base + i, base = the sum of the
    earlier documents' slot counts, each rounded up to 8; X zero rows in front and kb + E behind
    keep every sub-tile's load in bounds.
    """
    b, tc = slot_start_BTc.shape
    length = doc_start_BT.shape[1]
    valid = slot_start_BTc >= 0
    owner = jnp.take_along_axis(doc_start_BT, jnp.maximum(slot_start_BTc, 0), axis=1)
    index = jnp.where(valid, (slot_start_BTc - owner) // cfg.compress_stride, -1)
    after = jnp.concatenate([index[:, 1:], jnp.full((b, 1), -1, index.dtype)], axis=1)
    last = valid & (after <= 0)  # the next slot starts another document or is padding
    pad = jnp.where(last, -(index + 1) % 8, 0)
    shift = jnp.cumsum(pad, axis=1) - pad  # pads of the documents before each slot
    row = jnp.where(valid, geo.extra + jnp.arange(tc) + shift, -1).astype(jnp.int32)
    documents = min(tc, length // cfg.compress_block)  # each needs l tokens for a slot
    rows = geo.extra + tc + 7 * documents + geo.slots + geo.spill
    return row, -(-rows // 8) * 8


def aligned_k(k_cmp, row_BTc, rows: int):
    """k_cmp [B, Tc, Hkv, Dk] laid out on its aligned rows: [B, rows, Hkv, Dk], zeros between."""
    b = k_cmp.shape[0]
    target = jnp.where(row_BTc >= 0, row_BTc, rows)  # padding slots are dropped
    out = jnp.zeros((b, rows) + k_cmp.shape[2:], k_cmp.dtype)
    return out.at[jnp.arange(b)[:, None], target].set(k_cmp, mode="drop")


def row_tables(slot_start_BTc, doc_start_BT, row_BTc, cfg: NSAConfig, geo: Geometry):
    """Per position [B, 3, Tp] int32, Tp = T rounded up to 64: (document start, visible slots of
    the document, base = K-layout row of the document's slot -X); padding positions have
    document -1 and see nothing. Position t sees its document's slots 0 .. visible-1,
    visible = max(0, (t - doc - l + 1) // d + 1) (paper eq. 7, document-relative)."""
    b, length = doc_start_BT.shape
    doc = doc_start_BT.astype(jnp.int32)
    # The document's first slot = the number of slots starting before it (slots are in order):
    # a histogram of slot starts and its exclusive prefix sum (no binary search, which XLA runs
    # as a loop of small kernels).
    at = jnp.where(slot_start_BTc >= 0, slot_start_BTc, length).astype(jnp.int32)
    starting = jnp.zeros((b, length + 1), jnp.int32).at[jnp.arange(b)[:, None], at].add(1)
    first = jnp.take_along_axis(jnp.cumsum(starting, axis=1) - starting, doc, axis=1)
    ends = jnp.concatenate([row_BTc, jnp.full((b, 1), -1, jnp.int32)], axis=1)
    # The row after the last valid slot, rounded up: where a document with no slots would start.
    tail = -(-(jnp.max(ends, axis=1, keepdims=True) + 1 - geo.extra) // 8) * 8 + geo.extra
    ends = jnp.where(ends >= 0, ends, jnp.maximum(tail, geo.extra))
    base = jnp.take_along_axis(ends, first, axis=1) - geo.extra
    local = jnp.arange(length, dtype=jnp.int32) - doc
    visible = jnp.maximum((local - cfg.compress_block + 1) // cfg.compress_stride + 1, 0)
    table = jnp.stack([doc, visible, base.astype(jnp.int32)], axis=1)
    pad = -length % BLOCK_ROWS
    fill = jnp.broadcast_to(jnp.array([-1, 0, 0], jnp.int32)[None, :, None], (b, 3, pad))
    return jnp.concatenate([table, fill], axis=2)


def tile_tables(rows_B3R, geo: Geometry):
    """Per 64-position tile of a row table [B, 3, R]: (leaders [B, R/64, 64] int32, the in-tile
    offsets of the first position of each document present, in order; counts [B, 2, R/64]
    int32: documents present, sub-tiles needed = max over positions of
    ceil((visible + E) / kb), the last slot any block of the tile's positions draws on)."""
    b, _, r = rows_B3R.shape
    doc = rows_B3R[:, 0].reshape(b, r // BLOCK_ROWS, BLOCK_ROWS)
    visible = rows_B3R[:, 1].reshape(b, r // BLOCK_ROWS, BLOCK_ROWS)
    before = jnp.concatenate([jnp.full_like(doc[..., :1], -2), doc[..., :-1]], axis=-1)
    leads = (doc != before) & (doc >= 0)
    leaders = jnp.argsort(~leads, axis=-1, stable=True).astype(jnp.int32)
    need = jnp.where(visible > 0, (visible + geo.spill + geo.slots - 1) // geo.slots, 0)
    counts = jnp.stack([leads.sum(-1, dtype=jnp.int32), need.max(-1).astype(jnp.int32)], axis=1)
    return leaders, counts


def lse_tiles(lse_BTH, num_kv_heads: int, rows: int):
    """lse [B, T, Hq] (natural log) -> [B, Hkv, G, rows] float32 in base 2, +inf where the
    compressed branch saw nothing (-inf) or lse is not finite, so those rows add p = 0."""
    b, t, hq = lse_BTH.shape
    lse = lse_BTH.astype(jnp.float32)
    lse2 = jnp.where(jnp.isfinite(lse), lse * LOG2E, jnp.inf)
    lse2 = jnp.pad(lse2, ((0, 0), (0, rows - t), (0, 0)), constant_values=jnp.inf)
    return lse2.reshape(b, rows, num_kv_heads, hq // num_kv_heads).transpose(0, 2, 3, 1)


# ----------------------------------------------------------------------------- kernel pieces


def _truncate_to_bf16(x):
    """x float32 with the low 16 bits cleared: exactly representable in bfloat16."""
    bits = lax.bitcast_convert_type(x, jnp.int32) & _HIGH_HALF
    return lax.bitcast_convert_type(bits, jnp.float32)


def split_bf16x3(x):
    """x float32 -> (hi, mid, lo) bfloat16 with hi + mid + lo == x exactly (each piece holds 8 of
    x's 24 significant bits; the float32 subtractions are exact)."""
    hi = _truncate_to_bf16(x)
    rest = x - hi
    mid = _truncate_to_bf16(rest)
    return tuple(piece.astype(jnp.bfloat16) for piece in (hi, mid, rest - mid))


def _sync(barrier):
    """Rendezvous of both compute warpgroups (FA3's schedule barrier: their wgmmas alternate)."""
    plgpu.barrier_arrive(barrier)
    plgpu.barrier_wait(barrier)


@dataclasses.dataclass(frozen=True)
class _Static:
    """Everything the kernel body needs at trace time."""

    geo: Geometry
    tiling: Tiling
    group: int
    num_kv_heads: int
    num_tiles: int
    k_rows: int  # rows of the aligned K layout
    out_tiles: int  # output column tiles of nb blocks
    logit_scale: float  # scale * log2(e)
    interpret: bool


def _document(leaders_ref, rows_ref, bi, tile, row0, u):
    """(document start, K-layout base row, visible slots of its first position in the tile) of
    the u-th document present in the tile."""
    r = row0 + leaders_ref[bi, tile, u]
    return rows_ref[bi, 0, r], rows_ref[bi, 2, r], rows_ref[bi, 1, r]


def _k_start(st: _Static, base, sub):
    """First K-layout row of sub-tile `sub` (document-relative slot sub*kb - X sits on row
    X + base + sub*kb - X), a multiple of 8. Sub-tiles a document does not need (another
    document of the tile needs more) are clamped in bounds; every column is masked there."""
    start = jnp.minimum(base + sub * st.geo.slots, st.k_rows - st.geo.width)
    return pl.multiple_of(start, 8)


def _producer(st: _Static, refs, smem, bars, bi, hi, tile, row0, counts):
    q_ref, k_ref, lse_ref, w_ref, rows_ref, leaders_ref = refs
    q_ring, k_ring, w_smem, lse_smem = smem[:4]
    q_full, q_free, k_full, k_free, w_bar, lse_bar = bars[:6]
    num_docs, pairs, q0, _ = counts
    kst, qst, g = st.tiling.k_stages, st.tiling.q_stages, st.group
    plgpu.copy_gmem_to_smem(w_ref, w_smem, w_bar)
    plgpu.copy_gmem_to_smem(lse_ref.at[bi, hi, :, pl.ds(row0, BLOCK_ROWS)], lse_smem, lse_bar)

    def wait_free(barrier, use, stages):
        """Before the `use`-th fill of a ring slot: its previous contents were released."""
        @pl.when(use >= stages)
        def _():
            plgpu.barrier_wait(barrier)

    def load_k(idx, base, pair, wg):
        slot = wg * kst + lax.rem(idx, kst)
        wait_free(k_free.at[slot], idx, kst)
        start = _k_start(st, base, 2 * pair + wg)
        plgpu.copy_gmem_to_smem(k_ref.at[bi, pl.ds(start, st.geo.width), hi], k_ring.at[slot],
                                k_full.at[slot])

    def load_q(idx, head):
        qi = idx * g + head
        slot = lax.rem(qi, qst)
        wait_free(q_free.at[slot], qi, qst)
        rows = pl.ds(pl.multiple_of(q0 + row0, BLOCK_ROWS), BLOCK_ROWS)
        plgpu.copy_gmem_to_smem(q_ref.at[bi, rows, hi * g + head], q_ring.at[slot],
                                q_full.at[slot])

    @pl.loop(0, pairs * num_docs)
    def _step(idx):
        pair, u = lax.div(idx, num_docs), lax.rem(idx, num_docs)
        _, base, _ = _document(leaders_ref, rows_ref, bi, tile, row0, u)
        # Warpgroup 1 runs one wgmma behind warpgroup 0 (the ping-pong): it releases its K
        # slot of the previous step only after warpgroup 0's first wgmma of this one, so that
        # head's Q must be on its way before waiting for warpgroup 1's K slot.
        load_k(idx, base, pair, 0)
        load_q(idx, 0)
        load_k(idx, base, pair, 1)

        @pl.loop(1, g)
        def _head(head):
            load_q(idx, head)

    # Wait for the last release of every slot used, so every phase of the rings is observed
    # (interpret mode checks this when the barriers are freed; on the GPU it costs nothing).
    uses = pairs * num_docs
    for slot in range(qst):
        wait_free(q_free.at[slot], uses * g - slot + qst - 1, qst)
    for wg in range(COMPUTE_WGS):
        for slot in range(kst):
            wait_free(k_free.at[wg * kst + slot], uses - slot + kst - 1, kst)


def _column_mask(st: _Static, e, first_col, visible_row, sub):
    """e [64, width] with the columns a row may not use zeroed: document-relative slot
    i = sub*kb - X + c is usable iff i >= 0, c >= X - E (the spill slots that reach the
    sub-tile) and i < visible (the row's causal limit)."""
    geo = st.geo
    i0 = sub * geo.slots - geo.extra
    col = plgpu.broadcasted_iota(jnp.int32, e.shape, 1, layout=WGMMA)
    limit = lax.broadcast_in_dim(visible_row - i0, e.shape, [0])
    usable = (col >= jnp.maximum(first_col, -i0)) & (col < limit)
    return jnp.where(usable, e, 0.0)


def _column_tile(geo: Geometry, sub):
    """Output columns of sub-tile `sub`: its nb blocks."""
    return pl.ds(pl.multiple_of(sub * geo.blocks, geo.blocks), geo.blocks)


def _block_scores_of(st: _Static, psum, w_smem, staging):
    """psum [64, width] float32 -> block scores [64, nb] = psum @ W, exact up to float32
    accumulation: three bfloat16-exact pieces of psum times the small-integer W."""
    acc = plgpu.layout_cast(jnp.zeros((BLOCK_ROWS, st.geo.blocks), jnp.float32), WGMMA)
    for piece in split_bf16x3(psum):
        acc = common.mma(acc, piece, w_smem, interpret=st.interpret, staging=staging)
    return acc


def _consumer(st: _Static, refs, smem, bars, out_ref, bi, hi, tile, row0, counts, wg):
    _, _, _, _, rows_ref, leaders_ref = refs
    q_ring, k_ring, w_smem, lse_smem, out_smem, staging = smem
    q_full, q_free, k_full, k_free, w_bar, lse_bar, schedule = bars
    num_docs, pairs, _, need = counts
    geo, kst, qst, g = st.geo, st.tiling.k_stages, st.tiling.q_stages, st.group
    out_tile = out_smem.at[wg]
    staging = None if staging is None else staging.at[wg]
    rows = pl.ds(row0, BLOCK_ROWS)
    doc_row = plgpu.load(rows_ref.at[bi, 0, rows], layout=ROW, optimized=False)
    visible_row = plgpu.load(rows_ref.at[bi, 1, rows], layout=ROW, optimized=False)
    first_col = geo.extra - geo.spill
    plgpu.barrier_wait(w_bar)
    plgpu.barrier_wait(lse_bar)
    plan = st.tiling.schedule
    sync = (lambda: _sync(schedule)) if plan in ("ping_pong", "alternate") else (lambda: None)
    pl.when(wg == 1)(sync)  # warpgroup 1 starts one phase behind

    def add_exp(psum, s, head, in_doc, sub, mode):
        """psum + p of head `head`'s logits s (masked where some row may not see a column)."""
        lse = jnp.where(in_doc, plgpu.load(lse_smem.at[head], layout=ROW, optimized=False),
                        jnp.inf)
        e = jnp.exp2(s * st.logit_scale - lax.broadcast_in_dim(lse, s.shape, [0]))
        if mode == "masked":
            e = _column_mask(st, e, first_col, visible_row, sub)
        return psum + e

    def q_slot(idx, head):
        """The Q ring slot of head `head` in step idx, once its tile has landed."""
        qslot = lax.rem(idx * g + head, qst)
        plgpu.barrier_wait(q_full.at[qslot])
        return qslot

    def logits(qslot, kslot, during=None):
        """S = Q_g K_tileᵀ [64, width] float32 (and during()'s value, computed while the wgmma
        runs); the Q slot is released once the wgmma completed."""
        def qk(acc_ref):
            plgpu.wgmma(acc_ref, q_ring.at[qslot], k_ring.at[kslot].transpose((1, 0)))
            if plan == "ping_pong":
                sync()
            other = None if during is None else during()
            return other, acc_ref[...]

        other, s = pl.run_scoped(qk, plgpu.ACC((BLOCK_ROWS, geo.width), jnp.float32))
        plgpu.barrier_arrive(q_free.at[qslot])
        return s if during is None else (other, s)

    def head_step(idx, kslot, in_doc, sub, mode, head, psum):
        """One head's Q tile against the sub-tile: mode "whole" (no mask), "masked", or "skip"
        (warpgroup 1's sub-tile past the last needed one: only the barriers, in step)."""
        qslot = q_slot(idx, head)
        if mode == "skip":
            for _ in range(2 if plan == "alternate" else 1):
                sync()
            plgpu.barrier_arrive(q_free.at[qslot])
            return psum
        s = logits(qslot, kslot)
        if plan == "alternate":
            sync()  # this warpgroup's matmul is done: the other's turn on the tensor cores
        psum = add_exp(psum, s, head, in_doc, sub, mode)
        if plan == "alternate":
            sync()
        return psum

    def pipelined_heads(idx, kslot, in_doc, sub, mode, psum):
        """The G heads with head h+1's wgmma in flight during head h's exp2."""
        s = logits(q_slot(idx, 0), kslot)

        def step(head, carry):
            psum, s_prev = carry
            during = lambda: add_exp(psum, s_prev, head - 1, in_doc, sub, mode)
            return logits(q_slot(idx, head), kslot, during)

        psum, s = lax.fori_loop(1, g, step, (psum, s))
        return add_exp(psum, s, g - 1, in_doc, sub, mode)

    def document(pair, u, psum):
        sub = 2 * pair + wg
        idx = pair * num_docs + u
        kslot = wg * kst + lax.rem(idx, kst)
        doc, _, fewest = _document(leaders_ref, rows_ref, bi, tile, row0, u)
        in_doc = doc_row == doc
        # Every row of the document sees every column: no slot before the document, none past
        # the first (fewest-slots) row's limit.
        whole = (sub * geo.slots >= geo.spill) & ((sub + 1) * geo.slots <= fewest)
        plgpu.barrier_wait(k_full.at[kslot])

        def heads(mode):
            if plan == "pipeline" and mode != "skip":
                return lambda: pipelined_heads(idx, kslot, in_doc, sub, mode, psum)
            step = functools.partial(head_step, idx, kslot, in_doc, sub, mode)
            return lambda: lax.fori_loop(0, g, step, psum)

        psum = lax.cond(sub < need, lambda: lax.cond(whole, heads("whole"), heads("masked")),
                        heads("skip"))
        plgpu.barrier_arrive(k_free.at[kslot])
        return psum

    def store(sub, scores):
        plgpu.wait_smem_to_gmem(0, wait_read_only=True)  # the previous store left out_tile
        out_tile[...] = scores
        plgpu.commit_smem()
        plgpu.copy_smem_to_gmem(out_tile, out_ref.at[bi, hi, rows, _column_tile(geo, sub)])

    def pair_step(pair, carry):
        psum = plgpu.layout_cast(jnp.zeros((BLOCK_ROWS, geo.width), jnp.float32), WGMMA)
        psum = lax.fori_loop(0, num_docs, functools.partial(document, pair), psum)
        scores = _block_scores_of(st, psum, w_smem, staging)
        sub = 2 * pair + wg

        @pl.when(sub < need)  # warpgroup 1's last sub-tile when `need` is odd: nothing to store
        def _():
            store(sub, scores)

        return carry

    lax.fori_loop(0, pairs, pair_step, None)
    pl.when(wg == 0)(sync)

    # Blocks past every row's last visible slot score 0.
    zeros = plgpu.layout_cast(jnp.zeros((BLOCK_ROWS, geo.blocks), jnp.float32), WGMMA)
    first_zero = need + lax.rem(need + wg, 2)  # this warpgroup's parity

    @pl.loop(first_zero, st.out_tiles, step=COMPUTE_WGS)
    def _fill(sub):
        @pl.when(sub == first_zero)
        def _():
            plgpu.wait_smem_to_gmem(0, wait_read_only=True)
            out_tile[...] = zeros
            plgpu.commit_smem()

        plgpu.copy_smem_to_gmem(out_tile, out_ref.at[bi, hi, rows, _column_tile(geo, sub)])

    plgpu.wait_smem_to_gmem(0)


def _scores_call(st: _Static, q, k_pad, lse2, w, rows, leaders, counts, query_start):
    b, _, _, dk = q.shape
    geo, tiling = st.geo, st.tiling
    dtype = q.dtype
    r = leaders.shape[1] * BLOCK_ROWS

    def body(q_ref, k_ref, lse_ref, w_ref, rows_ref, leaders_ref, counts_ref, start_ref,
             out_ref, smem, bars):
        bi, hi, wg = lax.axis_index("batch"), lax.axis_index("heads"), lax.axis_index("wg")
        tile = st.num_tiles - 1 - lax.axis_index("tiles")  # later positions have more work
        row0 = pl.multiple_of(tile * BLOCK_ROWS, BLOCK_ROWS)
        need = counts_ref[bi, 1, tile]
        tile_counts = (counts_ref[bi, 0, tile], lax.div(need + 1, 2), start_ref[0], need)
        refs = (q_ref, k_ref, lse_ref, w_ref, rows_ref, leaders_ref)

        @pl.when(wg < COMPUTE_WGS)
        def _compute():
            plgpu.set_max_registers(232, action="increase")
            _consumer(st, refs, smem, bars, out_ref, bi, hi, tile, row0, tile_counts, wg)

        @pl.when(wg == COMPUTE_WGS)
        def _produce():
            plgpu.set_max_registers(40, action="decrease")
            _producer(st, refs, smem, bars, bi, hi, tile, row0, tile_counts)

    def entry(*refs):
        smem = (common.tiled_smem((tiling.q_stages, BLOCK_ROWS, dk), dtype),
                common.tiled_smem((COMPUTE_WGS * tiling.k_stages, geo.width, dk), dtype),
                common.narrow_smem((geo.width, geo.blocks), jnp.bfloat16),
                plgpu.SMEM((st.group, BLOCK_ROWS), jnp.float32),
                plgpu.SMEM((COMPUTE_WGS, BLOCK_ROWS, geo.blocks), jnp.float32),
                common.narrow_smem((COMPUTE_WGS, BLOCK_ROWS, geo.width), jnp.bfloat16)
                if st.interpret else None)
        ring = lambda n, arrivals=1: plgpu.Barrier(num_arrivals=arrivals, num_barriers=n)
        k_ring = COMPUTE_WGS * tiling.k_stages
        bars = (ring(tiling.q_stages), ring(tiling.q_stages, COMPUTE_WGS), ring(k_ring),
                ring(k_ring), plgpu.Barrier(), plgpu.Barrier(),
                plgpu.Barrier(num_arrivals=COMPUTE_WGS))
        pl.run_scoped(functools.partial(body, *refs), smem, bars, collective_axes="wg")

    out_type = jax.ShapeDtypeStruct((b, st.num_kv_heads, r, st.out_tiles * geo.blocks),
                                    jnp.float32)
    return plgpu.kernel(
        entry, out_type=out_type, grid=(st.num_tiles, st.num_kv_heads, b),
        grid_names=("tiles", "heads", "batch"), num_threads=COMPUTE_WGS + 1, thread_name="wg",
        compiler_params=plgpu.CompilerParams(approx_math=True),
        interpret=common.interpret_params() if st.interpret else None,
    )(q, k_pad, lse2, w, rows, leaders, counts, query_start)


# ----------------------------------------------------------------------------- public entry


def _check_inputs(q, k_cmp, lse, slot_start, doc_start):
    if q.ndim != 4 or k_cmp.ndim != 4:
        raise ValueError(f"q and k_cmp must be [B, T, H, Dk]; got {q.shape}, {k_cmp.shape}")
    b, t, hq, dk = q.shape
    tc, hkv = k_cmp.shape[1:3]
    if k_cmp.shape != (b, tc, hkv, dk) or hkv < 1 or hq % hkv:
        raise ValueError(f"k_cmp must be [B, Tc, Hkv, Dk] with Hkv dividing Hq, matching q "
                         f"{q.shape}; got {k_cmp.shape}")
    if k_cmp.dtype != q.dtype:
        raise ValueError(f"k_cmp must have q's dtype {q.dtype}, got {k_cmp.dtype}")
    if lse.shape != (b, t, hq):
        raise ValueError(f"lse must be [B, T, Hq] = {(b, t, hq)}, got {lse.shape}")
    if slot_start.shape != (b, tc):
        raise ValueError(f"slot_start must be [B, Tc] = {(b, tc)}, got {slot_start.shape}")
    if doc_start.shape != (b, t):
        raise ValueError(f"doc_start must be [B, T] = {(b, t)}, got {doc_start.shape}")


def block_scores(q, k_cmp, lse, slot_start, doc_start, cfg: NSAConfig, *, scale=None,
                 query_start=0, num_queries=None, tiling: Tiling | None = None,
                 interpret: bool = False):
    """Block scores of queries [query_start, query_start + num_queries): [B, Hkv, Tq, NB] float32,
    NB = ceil(T / l'), equal to nsa_jax.ops.block_scores (transposed) up to float32 rounding.

    q [B, T, Hq, Dk] bfloat16/float16 with Dk a multiple of 64; k_cmp [B, Tc, Hkv, Dk] in q's
    dtype; lse [B, T, Hq] float32, the compressed branch's natural-log LSE (-inf where it saw
    nothing; those rows score 0); slot_start [B, Tc] int32 and doc_start [B, T] int32 as
    nsa_jax.layout.compressed_layout(...).start and document_starts(...) build them;
    scale: logit scale (default Dk ** -0.5). query_start: a multiple of 64 (int or traced int32;
    a traced start reuses one compiled kernel for every chunk); num_queries: static, default
    T - query_start. Raises ValueError for shapes or configurations the kernel cannot run.
    No gradient (selection is not differentiable).
    """
    _check_inputs(q, k_cmp, lse, slot_start, doc_start)
    b, t, hq, dk = q.shape
    hkv = k_cmp.shape[2]
    group = hq // hkv
    tiling = tiling or Tiling.for_shape(cfg, dk, group, q.dtype)
    geo = check(cfg, tiling, dk, group, q.dtype)
    if isinstance(query_start, int) and (query_start % BLOCK_ROWS or not 0 <= query_start < t):
        raise ValueError(f"query_start must be a multiple of {BLOCK_ROWS} in [0, T={t}), got "
                         f"{query_start}")
    num_queries = t - query_start if num_queries is None else num_queries
    if not isinstance(num_queries, int) or num_queries < 1:
        raise ValueError(f"num_queries must be a positive int, got {num_queries!r}")
    rows = -(-num_queries // BLOCK_ROWS) * BLOCK_ROWS
    t_pad = -(-t // BLOCK_ROWS) * BLOCK_ROWS
    scale = dk ** -0.5 if scale is None else float(scale)
    stop = lax.stop_gradient
    q = stop(q)
    if t_pad != t:  # TMA boxes of 64 positions stay in bounds
        q = jnp.pad(q, ((0, 0), (0, t_pad - t), (0, 0), (0, 0)))
    start = jnp.asarray(query_start, jnp.int32)
    slot_row, k_rows = aligned_rows(slot_start, doc_start, cfg, geo)
    table = row_tables(slot_start, doc_start, slot_row, cfg, geo)
    table = lax.dynamic_slice_in_dim(table, start, rows, 2)
    lse2 = lax.dynamic_slice_in_dim(lse_tiles(stop(lse), hkv, t_pad), start, rows, 3)
    leaders, counts = tile_tables(table, geo)
    k_pad = aligned_k(stop(k_cmp), slot_row, k_rows)
    out_tiles = -(-cfg.num_blocks(t) // geo.blocks)
    st = _Static(geo=geo, tiling=tiling, group=group, num_kv_heads=hkv,
                 num_tiles=rows // BLOCK_ROWS, k_rows=k_pad.shape[1], out_tiles=out_tiles,
                 logit_scale=scale * LOG2E, interpret=interpret)
    out = _scores_call(st, q, k_pad, lse2, geo.overlap_matrix(), table, leaders, counts,
                       start.reshape(1))
    return out[:, :, :num_queries, :cfg.num_blocks(t)]


# ----------------------------------------------------------------------------- the ops' entry point

SCORE_BYTES = 2 ** 31  # the most [B, Hkv, chunk, NB] float32 scores held at once by `select`


def supports(q, k_cmp, lse, cfg: NSAConfig, **kwargs) -> bool:
    """Whether the kernel takes these inputs (16-bit q and k_cmp, Dk a multiple of 64, a
    tiling that fits); otherwise the dispatcher falls back."""
    if q.dtype != k_cmp.dtype:
        return False
    try:
        check(cfg, Tiling.for_shape(cfg, q.shape[-1], q.shape[2] // k_cmp.shape[2], q.dtype),
              q.shape[-1], q.shape[2] // k_cmp.shape[2], q.dtype)
    except ValueError:
        return False
    return True


def query_chunk(batch: int, length: int, num_kv_heads: int, cfg: NSAConfig) -> int:
    """Queries scored per pass: all of them, or as many (a multiple of 64) as keep the scores
    under SCORE_BYTES, so memory stays linear in T at any length."""
    per_query = batch * num_kv_heads * cfg.num_blocks(length) * 4
    chunk = max(BLOCK_ROWS, SCORE_BYTES // per_query // BLOCK_ROWS * BLOCK_ROWS)
    return min(chunk, -(-length // BLOCK_ROWS) * BLOCK_ROWS)


def select(q, k_cmp, lse, cfg: NSAConfig, *, segment_ids=None, scale=None, interpret=False,
           tiling: Tiling | None = None, top_n_scheme: str = "groups",
           chunk: int | None = None):
    """nsa_jax.ops.select_blocks(ops.block_scores(...)) on Hopper: [B, T, Hkv, n] int32 block ids
    (ascending, -1 slots last), chosen by nsa_jax.selection_rule from this kernel's scores with the
    Triton top-n (pallas_kernels.gpu.top_n, `top_n_scheme`), which reads each query's visible
    prefix of blocks only. q [B, T, Hq, Dk], k_cmp [B, Tc, Hkv, Dk] (16-bit), lse [B, T, Hq]
    float32 (the compressed branch's), segment_ids [B, T] or None. Queries are scored in chunks
    of `chunk` (a multiple of 64; default `query_chunk`, which keeps the [chunk, NB] scores
    under SCORE_BYTES); ValueError otherwise. No gradient."""
    b, t, hq, _ = q.shape
    hkv = k_cmp.shape[2]
    slot_start = layout.compressed_layout(segment_ids, b, t, cfg).start
    doc_start = layout.document_starts(segment_ids, b, t)
    local_pos = layout.positions(b, t) - doc_start
    t_pad = -(-t // BLOCK_ROWS) * BLOCK_ROWS
    if chunk is not None and (chunk < BLOCK_ROWS or chunk % BLOCK_ROWS):
        raise ValueError(f"chunk must be a positive multiple of {BLOCK_ROWS}, got {chunk}")
    chunk = query_chunk(b, t, hkv, cfg) if chunk is None else min(chunk, t_pad)
    # The last chunk ends at t_pad (it may overlap the one before: those rows come out equal).
    starts = [min(c, t_pad - chunk) for c in range(0, t, chunk)]
    rank = functools.partial(selection_rule.rank_keys, cfg=cfg)
    out = jnp.zeros((b, t_pad, hkv, cfg.num_selected), jnp.int32)
    for first in starts:
        scores = block_scores(q, k_cmp, lse, slot_start, doc_start, cfg, scale=scale,
                              query_start=first, num_queries=chunk, tiling=tiling,
                              interpret=interpret)  # [B, Hkv, chunk, NB]
        pos = jnp.pad(local_pos, ((0, 0), (0, t_pad - t)))[:, first:first + chunk]
        pos = jnp.broadcast_to(pos[:, None], scores.shape[:3]).reshape(b * hkv, chunk)
        # Rows before `end` lie at document-relative positions < first + end: blocks past
        # (first + end - 1) // l' are invisible to them.
        width_of = lambda end, first=first: (first + end - 1) // cfg.select_block + 1
        keys, ids = top_n.top_n(scores.reshape(b * hkv, chunk, -1), pos, cfg.num_selected,
                                lambda s, p, c: rank(s, p, blocks=c), width_of=width_of,
                                scheme=top_n_scheme, interpret=interpret)
        chosen = selection_rule.chosen_blocks(keys, ids).reshape(b, hkv, chunk, -1)
        out = lax.dynamic_update_slice_in_dim(out, chosen.transpose(0, 2, 1, 3), first, 1)
    return out[:, :t]
