"""Range attention on Hopper (Mosaic GPU): every query row sees one contiguous key range.

NSA's compressed branch and its sliding window are one problem (nsa_spec.md, sections on the
compressed and window branches): query t attends to the keys [kstart_t, kend_t) only.
- compressed: the compressed slots of t's own document that end at or before t
  (`compressed_ranges`);
- window: keys max(document start, t - w + 1) .. t (`window_ranges`).

Layout, "grouped rows": for KV head h the G query heads of its group are stacked into wgmma's M
dimension, so one K/V tile serves G query heads at once and dK/dV need no sum over the group.
Row r of KV head h is query position r // G, query head h * G + r % G (`to_rows`, `from_rows`).
K and V keep the ops layout [B, S, Hkv, D] and are TMA-loaded as strided [block, D] boxes.

Kernels (FA3 structure, like jax's pallas/ops/gpu/attention_mgpu.py): two compute warpgroups of
64 rows each and one TMA producer warpgroup filling K/V rings in swizzled SMEM; each program's
key loop covers [kstart of its first row, kend of its last row) (ranges are non-decreasing in
position), masks each row by its own range, and skips the mask on key tiles inside every row's
range. Rows that see nothing give o = 0 exactly and lse = -inf.

Why our own kernel rather than tokamax 0.0.17's PallasMosaicFlashAttention: per-row key ranges
reach tokamax's sm90 kernel only through masks defined in its private `tokamax._src` package (no
public interface to rely on), and its kernels take the heads layout, while GQA groups, the
block-score pass (pallas_kernels/gpu/mosaic/block_scores.py) and dK/dV without a group sum need
the grouped rows above. No tokamax timing was taken; this kernel's 64k compressed forward runs at
507 TFLOP/s on the H200 (docs/benchmarks.md), against 613 for jax's dense causal example.
"""
from __future__ import annotations

import dataclasses
import functools
import math

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import mosaic_gpu as plgpu

from nsa_jax import layout
from nsa_jax.config import NSAConfig
from pallas_kernels.gpu.mosaic import common

BLOCK_ROWS = 64  # query rows per compute warpgroup: wgmma's M
COMPUTE_WGS = 2
ROW_ALIGN = COMPUTE_WGS * BLOCK_ROWS  # rows per forward / dQ program; to_rows pads R to it
SMEM_BYTES = 227 * 1024  # per thread block on H100 / H200
SMEM_RESERVE = 1024  # barriers and alignment padding, on top of the buffers counted
NUM_SMS = 132  # H100 SXM / H200
MAX_DKV_SPLITS = 16
LOG2E = math.log2(math.e)
LN2 = math.log(2.0)
# Finite floor of the running max, so a row that has seen no key yet rescales by exp2(0) = 1
# instead of exp2(-inf - -inf) = NaN. Any real scaled logit lies far above it.
MAX_FLOOR = -1e30
WGMMA = plgpu.Layout.WGMMA
ROW = plgpu.Layout.WGMMA.reduce(1)  # one value per accumulator row
COL = plgpu.Layout.WGMMA.reduce(0)  # one value per accumulator column
SUPPORTED_DTYPES = (jnp.dtype(jnp.bfloat16), jnp.dtype(jnp.float16))


# ----------------------------------------------------------------------------- tile options


@dataclasses.dataclass(frozen=True)
class Tiling:
    """Tile sizes of the range-attention kernels (keys and rows, multiples of 64).

    block_kv, stages: keys per forward step and depth of the forward K/V rings.
    block_kv_dq, stages_dq: the same for the dQ kernel.
    block_kv_dkv: keys per compute warpgroup of the dK/dV kernel (a program owns twice that);
    block_rows_dkv: query rows per dK/dV step (64 or 128); stages_dkv: depth of its row rings;
    dkv_splits: programs sharing one key tile's rows (their float32 partials are summed in XLA),
    to fill the GPU when there are few key tiles (the compressed branch at 8k has 512 slots);
    None picks enough for two waves over the 132 SMs (`auto_dkv_splits`).
    """

    block_kv: int = 128
    stages: int = 2
    block_kv_dq: int = 64
    stages_dq: int = 2
    block_kv_dkv: int = 64
    block_rows_dkv: int = 64
    stages_dkv: int = 2
    dkv_splits: int | None = None

    def __post_init__(self):
        for name in ("block_kv", "block_kv_dq", "block_kv_dkv"):
            value = getattr(self, name)
            if value < 64 or value % 64 or value > 256:
                raise ValueError(f"Tiling.{name} must be 64, 128, 192 or 256, got {value}")
        if self.block_rows_dkv not in (64, 128):
            raise ValueError(f"Tiling.block_rows_dkv must be 64 or 128, got "
                             f"{self.block_rows_dkv}")
        for name in ("stages", "stages_dq", "stages_dkv"):
            if getattr(self, name) < 2:
                raise ValueError(f"Tiling.{name} must be >= 2, got {getattr(self, name)}")
        if self.dkv_splits is not None and not 1 <= self.dkv_splits <= MAX_DKV_SPLITS:
            raise ValueError(f"Tiling.dkv_splits must be None or in [1, {MAX_DKV_SPLITS}], "
                             f"got {self.dkv_splits}")

    @classmethod
    def for_head_dims(cls, dk: int, dv: int) -> Tiling:
        """Defaults. D = 128: attention_mgpu's fastest forward tile (128 keys, 2 stages) and
        64-key backward tiles (registers: two [64, 128] float32 accumulators per warpgroup in
        dK/dV). D = 64: the accumulators halve, so the backward takes 128-wide tiles."""
        if max(dk, dv) <= 64:
            return cls(block_kv_dq=128, block_rows_dkv=128)
        return cls()

    def auto_dkv_splits(self, num_keys: int, num_rows: int, num_kv_heads: int,
                        batch: int) -> int:
        """dkv_splits, or enough row splits of the dK/dV programs (key tiles x heads x batch) for
        two waves over the SMs, at most one per row tile. num_keys: S; num_rows: R."""
        if self.dkv_splits is not None:
            return self.dkv_splits
        key_tiles = self.padded_keys(num_keys) // (COMPUTE_WGS * self.block_kv_dkv)
        wanted = -(-2 * NUM_SMS // (key_tiles * num_kv_heads * batch))
        return max(1, min(MAX_DKV_SPLITS, wanted, num_rows // self.block_rows_dkv))

    def padded_keys(self, num_keys: int) -> int:
        """S rounded up to whole tiles of every kernel (at least one), so TMA boxes stay in
        bounds."""
        multiple = math.lcm(self.block_kv, self.block_kv_dq, COMPUTE_WGS * self.block_kv_dkv)
        return max(-(-num_keys // multiple), 1) * multiple

    def smem_bytes(self, dk: int, dv: int, dtype) -> dict[str, int]:
        """Shared memory each kernel allocates, in bytes, for head dims dk, dv."""
        size = jnp.dtype(dtype).itemsize
        rows = COMPUTE_WGS * BLOCK_ROWS
        o_extra = 0 if dk == dv else rows * dv * size  # o reuses q's buffer when they match
        forward = (rows * dk * size + o_extra + self.stages * self.block_kv * (dk + dv) * size
                   + rows * 4)
        dq = (rows * (dk + dv) * size + self.stages_dq * self.block_kv_dq * (dk + dv) * size)
        keys = COMPUTE_WGS * self.block_kv_dkv
        dkv = (keys * (dk + dv) * size
               + self.stages_dkv * self.block_rows_dkv * ((dk + dv) * size + 4 * 4)
               + keys * max(dk, dv) * 4)  # float32 staging of dK, then of dV
        return {"forward": forward, "dq": dq, "dkv": dkv}

    def check_smem(self, dk: int, dv: int, dtype) -> None:
        """Raises ValueError if a kernel would need more than the 227 KiB of SMEM per block."""
        for kernel, used in self.smem_bytes(dk, dv, dtype).items():
            if used + SMEM_RESERVE > SMEM_BYTES:
                raise ValueError(
                    f"Tiling {self} needs {used} bytes of shared memory in the {kernel} "
                    f"kernel for head dims ({dk}, {dv}); H100/H200 have {SMEM_BYTES}. Use "
                    f"smaller blocks or fewer stages.")


# ----------------------------------------------------------------------------- layout helpers


def to_rows(q_BTHD, num_kv_heads: int):
    """q [B, T, Hq, D] -> grouped rows [B, Hkv, R, D], R = T * G rounded up to ROW_ALIGN with
    zero rows. Row r of KV head h is position r // G, query head h * G + r % G."""
    b, t, hq, d = q_BTHD.shape
    if num_kv_heads < 1 or hq % num_kv_heads:
        raise ValueError(f"num_kv_heads must divide Hq = {hq}, got {num_kv_heads}")
    g = hq // num_kv_heads
    rows = q_BTHD.reshape(b, t, num_kv_heads, g, d).transpose(0, 2, 1, 3, 4)
    rows = rows.reshape(b, num_kv_heads, t * g, d)
    pad = -(t * g) % ROW_ALIGN
    return jnp.pad(rows, ((0, 0), (0, 0), (0, pad), (0, 0)))


def from_rows(x_rows, length: int, num_q_heads: int):
    """Inverse of `to_rows`: [B, Hkv, R, D] -> [B, T, Hq, D], or [B, Hkv, R] -> [B, T, Hq]."""
    b, hkv, r = x_rows.shape[:3]
    tail = x_rows.shape[3:]
    g = num_q_heads // hkv
    if num_q_heads % hkv or r < length * g:
        raise ValueError(f"x_rows {x_rows.shape} does not hold {length} positions of "
                         f"{num_q_heads} query heads")
    x = x_rows[:, :, : length * g].reshape(b, hkv, length, g, *tail)
    return jnp.moveaxis(x, 1, 2).reshape(b, length, num_q_heads, *tail)


def _searchsorted(sorted_x, values, side):
    """jnp.searchsorted without a while loop: the default method lowers to an XLA while loop,
    whose predicate an XLA GPU program copies to the host once per iteration (~log2(n) round
    trips of tens of microseconds each, per call)."""
    return jnp.searchsorted(sorted_x, values, side, method="scan_unrolled")


def compressed_ranges(slot_start_BTc, doc_start_BT, compress_block: int):
    """Key ranges of the compressed branch: (kstart, kend) int32 [B, T].

    Slot s (first raw token slot_start[s]; -1 marks padding slots, which come last; valid starts
    ascend and each document's slots are contiguous, as `nsa_jax.layout.compressed_layout`
    lays them out) is visible to query t iff doc_start[t] <= slot_start[s] and
    slot_start[s] + l - 1 <= t (paper Eq. 7, nsa_spec.md 1.2 and 3.1, with packed documents
    3.3). Those slots are exactly [kstart_t, kend_t); empty ranges have kend == kstart.
    """
    b, t = doc_start_BT.shape
    big = jnp.iinfo(jnp.int32).max
    starts = jnp.where(slot_start_BTc >= 0, slot_start_BTc, big).astype(jnp.int32)
    last_start = jnp.arange(t, dtype=jnp.int32) - (compress_block - 1)  # latest visible slot start
    search = jax.vmap(_searchsorted, in_axes=(0, 0, None))
    kstart = search(starts, doc_start_BT.astype(jnp.int32), "left")
    kend = search(starts, jnp.broadcast_to(last_start, (b, t)), "right")
    return kstart.astype(jnp.int32), jnp.maximum(kend, kstart).astype(jnp.int32)


def window_ranges(doc_start_BT, window: int):
    """Key ranges of the sliding window (nsa_spec.md 1.4): keys [max(doc_start_t, t - w + 1), t],
    as (kstart, kend) int32 [B, T]. Raises ValueError if window < 1."""
    if window < 1:
        raise ValueError(f"window must be >= 1, got {window}")
    t = jnp.arange(doc_start_BT.shape[1], dtype=jnp.int32)
    kstart = jnp.maximum(doc_start_BT.astype(jnp.int32), t - window + 1)
    return kstart, jnp.broadcast_to(t + 1, doc_start_BT.shape)


def row_ranges(kstart, kend, group: int, num_rows: int, num_keys: int):
    """Per-position ranges [B, P] -> per-row table [B, 2, R] int32 (kstart, kend), clipped to
    [0, num_keys]. Rows past P * G see nothing: they get the empty range [m, m), m the last
    position's max(kstart, kend), which keeps both columns non-decreasing."""
    per_row = [jnp.repeat(jnp.clip(x, 0, num_keys).astype(jnp.int32), group, axis=1)
               for x in (kstart, kend)]
    table = jnp.stack(per_row, axis=1)[:, :, :num_rows]
    pad = num_rows - table.shape[2]
    if pad:
        last = jnp.maximum(table[:, 0, -1], table[:, 1, -1])
        table = jnp.concatenate(
            [table, jnp.broadcast_to(last[:, None, None], (table.shape[0], 2, pad))], axis=2)
    return table


# ----------------------------------------------------------------------------- reference


def reference(q_rows, k, v, kstart, kend, *, group: int, scale: float):
    """Dense-mask float32 range attention (the spec in code, O(R * S) memory): same arguments
    and results as `range_attention`. Gradients are exact and finite for empty rows."""
    b, hkv, r, _ = q_rows.shape
    s = k.shape[1]
    table = row_ranges(kstart, kend, group, r, s)
    keys = jnp.arange(s)
    visible = (keys >= table[:, 0, :, None]) & (keys < table[:, 1, :, None])  # [B, R, S]
    visible = visible[:, None]
    logits = jnp.einsum("bhrd,bshd->bhrs", q_rows.astype(jnp.float32), k.astype(jnp.float32),
                        precision="highest") * scale
    row_max = jnp.max(jnp.where(visible, logits, -jnp.inf), axis=-1, keepdims=True)
    row_max = lax.stop_gradient(jnp.where(jnp.isfinite(row_max), row_max, 0.0))
    p = jnp.exp(jnp.where(visible, logits - row_max, -jnp.inf))
    total = jnp.sum(p, axis=-1, keepdims=True)
    seen = total > 0
    safe_total = jnp.where(seen, total, 1.0)
    o = jnp.einsum("bhrs,bshd->bhrd", p / safe_total, v.astype(jnp.float32),
                   precision="highest")
    lse = jnp.where(seen, row_max + jnp.log(safe_total), -jnp.inf)[..., 0]
    return o.astype(q_rows.dtype), lse


# ----------------------------------------------------------------------------- kernel pieces


def _zeros(shape):
    """A float32 accumulator value of zeros in wgmma's register layout."""
    return plgpu.layout_cast(jnp.zeros(shape, jnp.float32), WGMMA)


def _mma_pair(first, second, *, interpret: bool, staging=None):
    """(acc + a @ b for (acc, a, b) in (first, second)), as `common.mma`; compiled, both wgmmas
    are in flight together and awaited once (attention_mgpu's backward does the same)."""
    if interpret:
        return tuple(common.mma(*term, interpret=True, staging=staging)
                     for term in (first, second))

    def issue(acc_refs):
        for acc_ref, (_, a, b) in zip(acc_refs, (first, second)):
            plgpu.wgmma(acc_ref, a, b)

    return pl.run_state(issue)((plgpu.ACC.init(first[0]), plgpu.ACC.init(second[0])))


def _sync(barrier):
    """Rendezvous of both compute warpgroups on a barrier of two arrivals."""
    plgpu.barrier_arrive(barrier)
    plgpu.barrier_wait(barrier)


def _row_program(ranges_ref, num_programs, block):
    """Where a row-tile program (forward, dQ) works: batch, head, warpgroup, its first row and
    its key tiles [first, first + steps). Longest programs first: a compressed row's range grows
    with its position."""
    batch, head = lax.axis_index("batch"), lax.axis_index("heads")
    row0 = (num_programs - 1 - lax.axis_index("rows")) * ROW_ALIGN
    first, steps = _key_steps(ranges_ref, batch, row0, ROW_ALIGN, block)
    return batch, head, lax.axis_index("wg"), row0, first, steps


def _warpgroup_rows(ranges_ref, batch, row0, wg, first, steps, block):
    """A compute warpgroup's first row, its rows' kstart and kend vectors, and the steps
    [head, tail) that need no mask."""
    rows = row0 + wg * BLOCK_ROWS
    kstart, kend = _row_vectors(ranges_ref, batch, rows)
    return (rows, kstart, kend,
            *_unmasked_steps(ranges_ref, batch, rows, first, steps, block))


def _key_steps(ranges_ref, batch, row0, num_rows, block):
    """(first key tile, number of key tiles) covering rows [row0, row0 + num_rows): from the first
    row's kstart to the last row's kend, which bound all others as ranges are non-decreasing."""
    lo = ranges_ref[batch, 0, row0]
    hi = ranges_ref[batch, 1, row0 + num_rows - 1]
    first = lax.div(lo, block)
    steps = jnp.where(hi > lo, lax.div(hi + block - 1, block) - first, 0)
    return first, steps


def _unmasked_steps(ranges_ref, batch, rows, first, steps, block):
    """[head, tail): the steps whose key tile lies inside the range of every row of the
    warpgroup (largest kstart = last row's, smallest kend = first row's), which need no mask."""
    base = first * block
    inner_lo = jnp.maximum(ranges_ref[batch, 0, rows + BLOCK_ROWS - 1] - base, 0)
    inner_hi = jnp.maximum(ranges_ref[batch, 1, rows] - base, 0)
    head = jnp.minimum(lax.div(inner_lo + block - 1, block), steps)
    tail = jnp.clip(lax.div(inner_hi, block), head, steps)
    return head, tail


def _row_vectors(ranges_ref, batch, rows):
    """kstart, kend of rows [rows, rows + 64) as per-accumulator-row vectors."""
    load = lambda col: plgpu.load(ranges_ref.at[batch, col, pl.ds(rows, BLOCK_ROWS)],
                                  layout=ROW, optimized=False)
    return load(0), load(1)


def _mask(x, kstart, kend, key0, key_axis):
    """x with entries outside their query row's [kstart, kend) set to -inf. Keys (numbered from
    key0) run along `key_axis` of x, query rows along the other, which kstart and kend follow."""
    shape = x.shape
    keys = key0 + plgpu.broadcasted_iota(jnp.int32, shape, key_axis, layout=WGMMA)
    row_axis = [1 - key_axis]
    inside = ((keys >= lax.broadcast_in_dim(kstart, shape, row_axis))
              & (keys < lax.broadcast_in_dim(kend, shape, row_axis)))
    return jnp.where(inside, x, -jnp.inf)


def _produce(steps, stages, copies):
    """The producer warpgroup's loop: step i's tiles go to ring slot i % stages, each once its
    consumers have released the slot. `copies` is a list of (released barriers, copy(step,
    slot)) in issue order; None shares the release of the copy before it. The first `stages`
    steps need no release."""
    for i in range(stages):
        @pl.when(i < steps)
        def _prime():
            for _, copy in copies:
                copy(i, i)

    @pl.loop(stages, steps)
    def _refill(i):
        slot = lax.rem(i, stages)
        for released, copy in copies:
            if released is not None:
                plgpu.barrier_wait(released.at[slot])
            copy(i, slot)

    # Observe the last `stages` releases too: every waiter must see every phase of a barrier
    # (interpret mode checks it), and the parity it tracks stays exact.
    @pl.loop(jnp.maximum(steps - stages, 0), steps)
    def _drain(i):
        for released, _ in copies:
            if released is not None:
                plgpu.barrier_wait(released.at[lax.rem(i, stages)])


def _produce_key_tiles(*rings, batch, head, first, steps, block, stages):
    """Producer of the row-tile kernels: key tile first + i of every (gmem ref, SMEM ring, loaded
    barriers, released barriers) ring into slot i % stages."""
    def copier(ref, smem, loaded):
        def copy(i, slot):
            plgpu.copy_gmem_to_smem(ref.at[batch, pl.ds((first + i) * block, block), head],
                                    smem.at[slot], loaded.at[slot])
        return copy

    _produce(steps, stages, [(released, copier(ref, smem, loaded))
                             for ref, smem, loaded, released in rings])


def _ring_barriers(stages):
    """A ring's barriers: slot loaded (one TMA arrival), slot released (both compute warpgroups)."""
    return (plgpu.Barrier(num_barriers=stages),
            plgpu.Barrier(num_arrivals=COMPUTE_WGS, num_barriers=stages))


def _split_loop(step, head, tail, steps, carry):
    """step(i, carry, masked) over i in [0, steps), unmasked on [head, tail) only (FA3 splits its
    causal loop the same way)."""
    carry = lax.fori_loop(0, head, functools.partial(step, masked=True), carry)
    carry = lax.fori_loop(head, tail, functools.partial(step, masked=False), carry)
    return lax.fori_loop(tail, steps, functools.partial(step, masked=True), carry)


def _compute_wg_then_producer(wg, compute, produce):
    """FA3's register split: compute warpgroups take registers from the producer."""
    @pl.when(wg < COMPUTE_WGS)
    def _compute():
        plgpu.set_max_registers(232, action="increase")
        compute()

    @pl.when(wg == COMPUTE_WGS)
    def _produce():
        plgpu.set_max_registers(40, action="decrease")
        produce()


def _with_scratch(body, smem, barriers):
    """Kernel entry: body(*gmem refs, smem refs, barrier refs), scratch shared by all warpgroups."""
    def entry(*refs):
        pl.run_scoped(functools.partial(body, *refs), smem, barriers, collective_axes="wg")
    return entry


def _kernel_call(body, *, out_type, grid, interpret, tiles="rows"):
    """The grid is (tiles, Hkv, B); one producer and COMPUTE_WGS compute warpgroups."""
    return plgpu.kernel(
        body, out_type=out_type, grid=grid, grid_names=(tiles, "heads", "batch"),
        num_threads=COMPUTE_WGS + 1, thread_name="wg",
        compiler_params=plgpu.CompilerParams(approx_math=True),
        interpret=common.interpret_params() if interpret else None)


# ----------------------------------------------------------------------------- forward


def _forward(q_rows, k, v, ranges, *, scale, tiling, interpret):
    """Forward kernel: (o_rows [B, Hkv, R, Dv] q's dtype, lse_rows [B, Hkv, R] float32, base e)."""
    b, hkv, r, dk = q_rows.shape
    dv = v.shape[-1]
    dtype = q_rows.dtype
    block, stages = tiling.block_kv, tiling.stages
    num_programs = r // ROW_ALIGN
    logit_scale = scale * LOG2E  # scores in base 2: exp2 with the scale folded in

    def body(q_ref, k_ref, v_ref, ranges_ref, o_ref, lse_ref, smem, barriers):
        q_smem, o_smem, k_smem, v_smem, lse_smem, p_staging = smem
        o_smem = q_smem if o_smem is None else o_smem  # o reuses q's buffer when Dk == Dv
        q_bar, k_bar, v_bar, k_free, v_free, schedule = barriers
        bi, hi, wg, row0, first, steps = _row_program(ranges_ref, num_programs, block)

        def compute():
            rows, kstart, kend, head, tail = _warpgroup_rows(ranges_ref, bi, row0, wg, first,
                                                             steps, block)
            q_tile, o_tile = q_smem.at[wg], o_smem.at[wg]
            plgpu.copy_gmem_to_smem(q_ref.at[bi, hi, pl.ds(rows, BLOCK_ROWS)], q_tile,
                                    q_bar.at[wg])
            acc = _zeros((BLOCK_ROWS, dv))
            row_max = plgpu.layout_cast(jnp.full((BLOCK_ROWS,), MAX_FLOOR, jnp.float32), ROW)
            total = plgpu.layout_cast(jnp.zeros((BLOCK_ROWS,), jnp.float32), ROW)
            plgpu.barrier_wait(q_bar.at[wg])

            @pl.when(steps > 0)
            def _():
                plgpu.barrier_wait(k_bar.at[0])

            pl.when(wg == 1)(lambda: _sync(schedule))  # ping-pong: warpgroup 1 starts behind

            def step(i, carry, masked):
                acc, row_max, total = carry
                slot = lax.rem(i, stages)

                def qk(acc_ref):
                    plgpu.wgmma(acc_ref, q_tile, k_smem.at[slot].transpose((1, 0)))
                    _sync(schedule)
                    return acc_ref[...]

                s = pl.run_scoped(qk, plgpu.ACC((BLOCK_ROWS, block), jnp.float32))
                plgpu.barrier_arrive(k_free.at[slot])
                if masked:
                    s = _mask(s, kstart, kend, (first + i) * block, key_axis=1)
                new_max = jnp.maximum(row_max, s.max(axis=1) * logit_scale)
                rescale = jnp.exp2(row_max - new_max)
                p = jnp.exp2(s * logit_scale - lax.broadcast_in_dim(new_max, s.shape, [0]))
                acc *= lax.broadcast_in_dim(rescale, acc.shape, [0])
                total *= rescale
                p16 = p.astype(dtype)

                def softmax_done():  # the other warpgroup may use the tensor cores now
                    plgpu.barrier_arrive(schedule)
                    plgpu.barrier_wait(v_bar.at[slot])
                    plgpu.barrier_wait(schedule)

                if dv <= 128:  # attention_mgpu's order, measured faster there up to D = 128
                    total += p.sum(axis=1)
                    acc, total, new_max, p16 = lax.optimization_barrier((acc, total, new_max, p16))
                    softmax_done()
                else:
                    softmax_done()
                    total += p.sum(axis=1)

                def next_k():
                    @pl.when(i + 1 < steps)
                    def _():
                        plgpu.barrier_wait(k_bar.at[lax.rem(i + 1, stages)])

                acc = common.mma(acc, p16, v_smem.at[slot], interpret=interpret,
                                 staging=None if p_staging is None else p_staging.at[wg],
                                 during=next_k)
                plgpu.barrier_arrive(v_free.at[slot])
                return acc, new_max, total

            acc, row_max, total = _split_loop(step, head, tail, steps, (acc, row_max, total))
            pl.when(wg == 0)(lambda: _sync(schedule))

            seen = total > 0
            inverse = 1.0 / jnp.where(seen, total, 1.0)
            o_tile[...] = (acc * lax.broadcast_in_dim(inverse, acc.shape, [0])).astype(dtype)
            lse_smem.at[wg][...] = jnp.where(
                seen, row_max * LN2 + jnp.log(jnp.where(seen, total, 1.0)), -jnp.inf)
            plgpu.commit_smem()
            plgpu.copy_smem_to_gmem(o_tile, o_ref.at[bi, hi, pl.ds(rows, BLOCK_ROWS)])
            plgpu.copy_smem_to_gmem(lse_smem.at[wg], lse_ref.at[bi, hi, pl.ds(rows, BLOCK_ROWS)])
            plgpu.wait_smem_to_gmem(0)

        _compute_wg_then_producer(wg, compute, functools.partial(
            _produce_key_tiles, (k_ref, k_smem, k_bar, k_free), (v_ref, v_smem, v_bar, v_free),
            batch=bi, head=hi, first=first, steps=steps, block=block, stages=stages))

    smem = (common.tiled_smem((COMPUTE_WGS, BLOCK_ROWS, dk), dtype),
            None if dk == dv else common.tiled_smem((COMPUTE_WGS, BLOCK_ROWS, dv), dtype),
            common.tiled_smem((stages, block, dk), dtype),
            common.tiled_smem((stages, block, dv), dtype),
            plgpu.SMEM((COMPUTE_WGS, BLOCK_ROWS), jnp.float32),
            common.tiled_smem((COMPUTE_WGS, BLOCK_ROWS, block), dtype) if interpret else None)
    ring, released = _ring_barriers(stages)
    barriers = (plgpu.Barrier(num_barriers=COMPUTE_WGS), ring, ring, released, released,
                plgpu.Barrier(num_arrivals=COMPUTE_WGS))
    out_type = (jax.ShapeDtypeStruct((b, hkv, r, dv), dtype),
                jax.ShapeDtypeStruct((b, hkv, r), jnp.float32))
    return _kernel_call(_with_scratch(body, smem, barriers), out_type=out_type,
                        grid=(num_programs, hkv, b),
                        interpret=interpret)(q_rows, k, v, ranges)


# ----------------------------------------------------------------------------- backward


def _dq(q_rows, k, v, do_rows, stats, ranges, *, scale, tiling, interpret):
    """dQ kernel over row tiles x the key tiles they see: dq_rows [B, Hkv, R, Dk] in q's dtype.
    stats [B, Hkv, 2, R] float32 holds per row lse * log2(e) (0 where lse = -inf) and delta."""
    b, hkv, r, dk = q_rows.shape
    dv = v.shape[-1]
    dtype = q_rows.dtype
    block, stages = tiling.block_kv_dq, tiling.stages_dq
    num_programs = r // ROW_ALIGN
    logit_scale = scale * LOG2E

    def body(q_ref, k_ref, v_ref, do_ref, stats_ref, ranges_ref, dq_ref, smem, barriers):
        q_smem, do_smem, k_smem, v_smem, ds_staging = smem
        q_bar, do_bar, k_bar, v_bar, k_free, v_free = barriers
        bi, hi, wg, row0, first, steps = _row_program(ranges_ref, num_programs, block)

        def compute():
            rows, kstart, kend, head, tail = _warpgroup_rows(ranges_ref, bi, row0, wg, first,
                                                             steps, block)
            tile = pl.ds(rows, BLOCK_ROWS)
            q_tile, do_tile = q_smem.at[wg], do_smem.at[wg]
            plgpu.copy_gmem_to_smem(q_ref.at[bi, hi, tile], q_tile, q_bar.at[wg])
            plgpu.copy_gmem_to_smem(do_ref.at[bi, hi, tile], do_tile, do_bar.at[wg])
            lse2, delta = (plgpu.load(stats_ref.at[bi, hi, i, tile], layout=ROW, optimized=False)
                           for i in (0, 1))
            dq = _zeros((BLOCK_ROWS, dk))
            plgpu.barrier_wait(q_bar.at[wg])
            plgpu.barrier_wait(do_bar.at[wg])

            def step(i, dq, masked):
                slot = lax.rem(i, stages)
                plgpu.barrier_wait(k_bar.at[slot])
                plgpu.barrier_wait(v_bar.at[slot])
                fresh = _zeros((BLOCK_ROWS, block))
                s, dp = _mma_pair((fresh, q_tile, k_smem.at[slot].transpose((1, 0))),
                                  (fresh, do_tile, v_smem.at[slot].transpose((1, 0))),
                                  interpret=interpret)
                plgpu.barrier_arrive(v_free.at[slot])
                logits = s * logit_scale - lax.broadcast_in_dim(lse2, s.shape, [0])
                if masked:
                    logits = _mask(logits, kstart, kend, (first + i) * block, key_axis=1)
                p = jnp.exp2(logits)
                ds = p * (dp - lax.broadcast_in_dim(delta, dp.shape, [0]))
                dq = common.mma(dq, ds.astype(dtype), k_smem.at[slot], interpret=interpret,
                                staging=None if ds_staging is None else ds_staging.at[wg])
                plgpu.barrier_arrive(k_free.at[slot])
                return dq

            dq = _split_loop(step, head, tail, steps, dq)
            q_tile[...] = (dq * scale).astype(dtype)
            plgpu.commit_smem()
            plgpu.copy_smem_to_gmem(q_tile, dq_ref.at[bi, hi, tile])
            plgpu.wait_smem_to_gmem(0)

        _compute_wg_then_producer(wg, compute, functools.partial(
            _produce_key_tiles, (k_ref, k_smem, k_bar, k_free), (v_ref, v_smem, v_bar, v_free),
            batch=bi, head=hi, first=first, steps=steps, block=block, stages=stages))

    smem = (common.tiled_smem((COMPUTE_WGS, BLOCK_ROWS, dk), dtype),
            common.tiled_smem((COMPUTE_WGS, BLOCK_ROWS, dv), dtype),
            common.tiled_smem((stages, block, dk), dtype),
            common.tiled_smem((stages, block, dv), dtype),
            common.tiled_smem((COMPUTE_WGS, BLOCK_ROWS, block), dtype) if interpret else None)
    ring, released = _ring_barriers(stages)
    loaded = plgpu.Barrier(num_barriers=COMPUTE_WGS)
    barriers = (loaded, loaded, ring, ring, released, released)
    return _kernel_call(_with_scratch(body, smem, barriers), out_type=q_rows,
                        grid=(num_programs, hkv, b),
                        interpret=interpret)(q_rows, k, v, do_rows, stats, ranges)


def _key_tile_rows(ranges, num_programs: int, block: int):
    """[B, programs, 2 + 2 * COMPUTE_WGS] int32 for the dK/dV programs (program j owns keys
    [j * 2 * block, (j + 1) * 2 * block), warpgroup w the w-th `block` of them): the rows
    [lo, hi) that see any of its keys, then per warpgroup the rows [inner_lo, inner_hi) whose
    range holds all of its keys (no mask needed). Ranges are non-decreasing, so both are
    contiguous and a binary search finds them."""
    kstart, kend = ranges[:, 0], ranges[:, 1]
    key0 = jnp.arange(num_programs, dtype=jnp.int32) * (COMPUTE_WGS * block)
    search = jax.vmap(_searchsorted, in_axes=(0, None, None))
    cols = [search(kend, key0, "right"), search(kstart, key0 + COMPUTE_WGS * block, "left")]
    for w in range(COMPUTE_WGS):
        first_key = key0 + w * block
        cols += [search(kend, first_key + block, "left"), search(kstart, first_key, "right")]
    return jnp.stack(cols, axis=-1).astype(jnp.int32)


def _dkv(q_rows, k, v, do_rows, stats, ranges, *, scale, tiling, interpret):
    """dK/dV kernel over key tiles x the row tiles that see them, rows split over
    `tiling.auto_dkv_splits` programs: float32 partials dk [splits, B, S, Hkv, Dk], dv [..., Dv]."""
    b, hkv, r, dk = q_rows.shape
    s, dv = k.shape[1], v.shape[-1]
    dtype = q_rows.dtype
    block, rows_block = tiling.block_kv_dkv, tiling.block_rows_dkv
    stages = tiling.stages_dkv
    num_programs = s // (COMPUTE_WGS * block)
    splits = tiling.auto_dkv_splits(s, r, hkv, b)
    table = _key_tile_rows(ranges, num_programs, block)
    logit_scale = scale * LOG2E

    def body(q_ref, k_ref, v_ref, do_ref, stats_ref, ranges_ref, table_ref, dk_ref, dv_ref,
             smem, barriers):
        (k_smem, v_smem, q_smem, do_smem, stats_smem, ranges_smem, (dk_out, dv_out),
         staging) = smem
        k_bar, v_bar, q_bar, do_bar, stats_bar, ranges_bar, q_free, do_free, both = barriers
        bi, hi, wg = lax.axis_index("batch"), lax.axis_index("heads"), lax.axis_index("wg")
        program, split = lax.div(lax.axis_index("keys"), splits), lax.rem(lax.axis_index("keys"),
                                                                          splits)
        row_lo, row_hi = table_ref[bi, program, 0], table_ref[bi, program, 1]
        tile0 = lax.div(row_lo, rows_block)
        tiles = jnp.where(row_hi > row_lo, lax.div(row_hi + rows_block - 1, rows_block) - tile0, 0)
        first = tile0 + lax.div(split * tiles, splits)
        steps = tile0 + lax.div((split + 1) * tiles, splits) - first

        def compute():
            key0 = (program * COMPUTE_WGS + wg) * block
            keys = pl.ds(key0, block)
            k_tile, v_tile = k_smem.at[wg], v_smem.at[wg]
            plgpu.copy_gmem_to_smem(k_ref.at[bi, keys, hi], k_tile, k_bar.at[wg])
            plgpu.copy_gmem_to_smem(v_ref.at[bi, keys, hi], v_tile, v_bar.at[wg])
            inner_lo = table_ref[bi, program, 2 + 2 * wg]
            inner_hi = table_ref[bi, program, 3 + 2 * wg]
            head = jnp.clip(lax.div(inner_lo + rows_block - 1, rows_block) - first, 0, steps)
            tail = jnp.clip(lax.div(inner_hi, rows_block) - first, head, steps)
            dk_acc, dv_acc = _zeros((block, dk)), _zeros((block, dv))
            plgpu.barrier_wait(k_bar.at[wg])
            plgpu.barrier_wait(v_bar.at[wg])
            stage = None if staging is None else staging.at[wg]

            def step(i, carry, masked):
                dk_acc, dv_acc = carry
                slot = lax.rem(i, stages)
                plgpu.barrier_wait(q_bar.at[slot])
                plgpu.barrier_wait(stats_bar.at[slot])
                plgpu.barrier_wait(ranges_bar.at[slot])
                lse2, delta, kstart, kend = (
                    plgpu.load(ref.at[slot, j], layout=COL)
                    for ref, j in ((stats_smem, 0), (stats_smem, 1), (ranges_smem, 0),
                                   (ranges_smem, 1)))
                s_t = common.matmul(k_tile, q_smem.at[slot].transpose((1, 0)), (block, rows_block))
                logits = s_t * logit_scale - lax.broadcast_in_dim(lse2, s_t.shape, [1])
                if masked:
                    logits = _mask(logits, kstart, kend, key0, key_axis=0)
                p_t = jnp.exp2(logits)
                plgpu.barrier_wait(do_bar.at[slot])
                dv_acc, dp_t = _mma_pair(
                    (dv_acc, p_t.astype(dtype), do_smem.at[slot]),
                    (_zeros((block, rows_block)), v_tile, do_smem.at[slot].transpose((1, 0))),
                    interpret=interpret, staging=stage)
                plgpu.barrier_arrive(do_free.at[slot])
                ds_t = p_t * (dp_t - lax.broadcast_in_dim(delta, dp_t.shape, [1]))
                dk_acc = common.mma(dk_acc, ds_t.astype(dtype), q_smem.at[slot],
                                    interpret=interpret, staging=stage)
                plgpu.barrier_arrive(q_free.at[slot])
                return dk_acc, dv_acc

            dk_acc, dv_acc = _split_loop(step, head, tail, steps, (dk_acc, dv_acc))
            dk_out.at[wg][...] = dk_acc * scale
            plgpu.commit_smem()
            plgpu.copy_smem_to_gmem(dk_out.at[wg], dk_ref.at[split, bi, keys, hi])
            plgpu.wait_smem_to_gmem(0, wait_read_only=True)
            _sync(both)  # dV's staging overlaps dK's: wait until both warpgroups' dK has left
            dv_out.at[wg][...] = dv_acc
            plgpu.commit_smem()
            plgpu.copy_smem_to_gmem(dv_out.at[wg], dv_ref.at[split, bi, keys, hi])
            plgpu.wait_smem_to_gmem(0)

        def produce():
            def copier(ref, smem, loaded, at):
                def copy(i, slot):
                    plgpu.copy_gmem_to_smem(ref.at[at(pl.ds((first + i) * rows_block,
                                                            rows_block))],
                                            smem.at[slot], loaded.at[slot])
                return copy

            row_tile = lambda rows: (bi, hi, rows)
            _produce(steps, stages, [
                (q_free, copier(q_ref, q_smem, q_bar, row_tile)),
                (None, copier(stats_ref, stats_smem, stats_bar, lambda rows: (bi, hi, slice(None),
                                                                              rows))),
                (None, copier(ranges_ref, ranges_smem, ranges_bar,
                              lambda rows: (bi, slice(None), rows))),
                (do_free, copier(do_ref, do_smem, do_bar, row_tile))])

        _compute_wg_then_producer(wg, compute, produce)

    staging_rows = (COMPUTE_WGS, block)
    smem = (common.tiled_smem((COMPUTE_WGS, block, dk), dtype),
            common.tiled_smem((COMPUTE_WGS, block, dv), dtype),
            common.tiled_smem((stages, rows_block, dk), dtype),
            common.tiled_smem((stages, rows_block, dv), dtype),
            plgpu.SMEM((stages, 2, rows_block), jnp.float32),
            plgpu.SMEM((stages, 2, rows_block), jnp.int32),
            plgpu.RefUnion(common.tiled_smem((*staging_rows, dk), jnp.float32),
                           common.tiled_smem((*staging_rows, dv), jnp.float32)),
            common.tiled_smem((*staging_rows, rows_block), dtype) if interpret else None)
    loaded = plgpu.Barrier(num_barriers=COMPUTE_WGS)
    ring, released = _ring_barriers(stages)
    barriers = (loaded, loaded, ring, ring, ring, ring, released, released,
                plgpu.Barrier(num_arrivals=COMPUTE_WGS))
    out_type = (jax.ShapeDtypeStruct((splits, b, s, hkv, dk), jnp.float32),
                jax.ShapeDtypeStruct((splits, b, s, hkv, dv), jnp.float32))
    return _kernel_call(_with_scratch(body, smem, barriers), out_type=out_type,
                        grid=(num_programs * splits, hkv, b), tiles="keys",
                        interpret=interpret)(q_rows, k, v, do_rows, stats, ranges, table)


@functools.partial(jax.custom_vjp, nondiff_argnums=(4, 5, 6))
def _attention(q_rows, k, v, ranges, scale, tiling, interpret):
    return _forward(q_rows, k, v, ranges, scale=scale, tiling=tiling, interpret=interpret)


def _attention_fwd(q_rows, k, v, ranges, scale, tiling, interpret):
    o_rows, lse_rows = _forward(q_rows, k, v, ranges, scale=scale, tiling=tiling,
                                interpret=interpret)
    return (o_rows, lse_rows), (q_rows, k, v, ranges, o_rows, lse_rows)


def _attention_bwd(scale, tiling, interpret, residuals, cotangents):
    """No atomics, deterministic. lse is an output too: dS = P * (dP - delta) with
    delta = rowsum(o * do) - dlse. The dQ and dK/dV kernels each recompute S and dP, so the
    backward does 7 tile matmuls where an atomic-dQ backward does 5."""
    q_rows, k, v, ranges, o_rows, lse_rows = residuals
    do_rows, dlse_rows = cotangents
    delta = jnp.sum(o_rows.astype(jnp.float32) * do_rows.astype(jnp.float32), axis=-1) - dlse_rows
    lse2 = jnp.where(jnp.isfinite(lse_rows), lse_rows * LOG2E, 0.0)  # empty rows: P = 0 anyway
    stats = jnp.stack([lse2, delta], axis=2)
    args = (q_rows, k, v, do_rows.astype(q_rows.dtype), stats, ranges)
    opts = dict(scale=scale, tiling=tiling, interpret=interpret)
    dq = _dq(*args, **opts)
    dk, dv = _dkv(*args, **opts)
    return dq, dk.sum(axis=0).astype(k.dtype), dv.sum(axis=0).astype(v.dtype), None


_attention.defvjp(_attention_fwd, _attention_bwd)


# ----------------------------------------------------------------------------- entry point


def _check_args(q_rows, k, v, kstart, kend, group, scale):
    if q_rows.ndim != 4 or k.ndim != 4 or v.ndim != 4:
        raise ValueError(f"q_rows [B, Hkv, R, Dk], k [B, S, Hkv, Dk], v [B, S, Hkv, Dv] must be "
                         f"4-D, got {q_rows.shape}, {k.shape}, {v.shape}")
    b, hkv, r, dk = q_rows.shape
    if k.shape != (b, k.shape[1], hkv, dk) or v.shape[:3] != k.shape[:3]:
        raise ValueError(f"k {k.shape} must be [B={b}, S, Hkv={hkv}, Dk={dk}] and v {v.shape} "
                         f"[B, S, Hkv, Dv] with the same B, S, Hkv")
    dtypes = {jnp.dtype(x.dtype) for x in (q_rows, k, v)}
    if len(dtypes) != 1 or dtypes.pop() not in SUPPORTED_DTYPES:
        raise ValueError(f"q_rows, k, v must share one dtype, bfloat16 or float16 (float32 runs on "
                         f"the Triton or xla paths), got {q_rows.dtype}, {k.dtype}, {v.dtype}")
    for name, d in (("Dk", dk), ("Dv", v.shape[3])):
        if d not in (64, 128):
            raise ValueError(f"head dim {name} must be 64 or 128 (wider heads exceed the "
                             f"backward's shared memory), got {d}")
    if r == 0 or r % ROW_ALIGN:
        raise ValueError(f"q_rows must have a positive multiple of {ROW_ALIGN} rows (use to_rows), "
                         f"got {r}")
    if (kstart.ndim != 2 or kstart.shape != kend.shape or kstart.shape[0] != b
            or kstart.shape[1] == 0
            or not jnp.issubdtype(kstart.dtype, jnp.integer)
            or not jnp.issubdtype(kend.dtype, jnp.integer)):
        raise ValueError(f"kstart and kend must be integer [B={b}, P >= 1], got {kstart.shape} "
                         f"{kstart.dtype} and {kend.shape} {kend.dtype}")
    if not isinstance(group, int) or group < 1:
        raise ValueError(f"group must be a positive int (query heads per KV head), got {group!r}")
    if not (math.isfinite(scale) and scale > 0):
        raise ValueError(f"scale must be a positive finite float, got {scale!r}")


def range_attention(q_rows, k, v, kstart, kend, *, group: int, scale: float,
                    tiling: Tiling | None = None, interpret: bool = False):
    """Attention of every query row over its own key range [kstart, kend) on Hopper.

    Args:
      q_rows: [B, Hkv, R, Dk] grouped rows (`to_rows`), R a multiple of 128.
      k: [B, S, Hkv, Dk]; v: [B, S, Hkv, Dv]; q_rows, k, v one dtype, bfloat16 or float16;
        Dk, Dv in {64, 128}.
      kstart, kend: int [B, P]: position p sees keys [kstart[p], kend[p]) (clipped to [0, S]).
        Both must be non-decreasing in p (true of `compressed_ranges` and `window_ranges`); rows
        past position P - 1 see nothing.
      group: G, query heads per KV head (row r is position r // G).
      scale: logit scale (usually 1 / sqrt(Dk)).
      tiling: tile sizes (default `Tiling.for_head_dims(Dk, Dv)`).
      interpret: run in Mosaic GPU interpret mode (CPU, race detection) instead of compiling.

    Returns:
      o_rows [B, Hkv, R, Dv] in q's dtype and lse_rows [B, Hkv, R] float32 (natural log); a row
      whose range is empty gets o = 0 and lse = -inf exactly.

    Raises:
      ValueError: on shapes, dtypes, group, scale or tiles (SMEM) the kernels cannot take.
    """
    _check_args(q_rows, k, v, kstart, kend, group, scale)
    dk, dv = q_rows.shape[3], v.shape[3]
    tiling = tiling or Tiling.for_head_dims(dk, dv)
    tiling.check_smem(dk, dv, q_rows.dtype)
    ranges = row_ranges(kstart, kend, group, q_rows.shape[2], k.shape[1])
    pad = ((0, 0), (0, tiling.padded_keys(k.shape[1]) - k.shape[1]), (0, 0), (0, 0))
    k, v = jnp.pad(k, pad), jnp.pad(v, pad)  # zero keys: outside every range
    return _attention(q_rows, k, v, ranges, float(scale), tiling, interpret)


# ----------------------------------------------------------------------------- the ops' entry points


def supports(q, k, v, *args, **kwargs) -> bool:
    """Whether these kernels take the arrays: one 16-bit dtype and head dims Dk, Dv in {64, 128}."""
    return (q.dtype in SUPPORTED_DTYPES and k.dtype == q.dtype and v.dtype == q.dtype
            and q.shape[-1] in (64, 128) and v.shape[-1] in (64, 128))


def range_attention_bthd(q, k, v, kstart, kend, *, scale=None,
                         tiling: Tiling | None = None, interpret: bool = False):
    """`range_attention` in the ops layout: q [B, T, Hq, Dk] -> (o [B, T, Hq, Dv] in q's dtype,
    lse [B, T, Hq] float32), position t seeing keys [kstart[:, t], kend[:, t]) ([B, T] int);
    scale None means 1 / sqrt(Dk). Grouped rows around the kernels (`to_rows`, `from_rows`).
    Raises ValueError as `range_attention` does."""
    t, hq = q.shape[1:3]
    hkv = k.shape[2]
    o_rows, lse_rows = range_attention(to_rows(q, hkv), k, v, kstart, kend, group=hq // hkv,
                                       scale=q.shape[-1] ** -0.5 if scale is None else scale,
                                       tiling=tiling, interpret=interpret)
    return from_rows(o_rows, t, hq), from_rows(lse_rows, t, hq)


def compressed_attention(q, k_cmp, v_cmp, cfg: NSAConfig, *, segment_ids=None, scale=None,
                         interpret=False, tiling: Tiling | None = None):
    """nsa_jax.ops.compressed_attention on Hopper (paper eq. 7; nsa_spec.md, compressed branch):
    q [B, T, Hq, Dk], k_cmp/v_cmp [B, Tc, Hkv, D] laid out as nsa_jax.layout says, segment_ids
    [B, T] or None -> (o [B, T, Hq, Dv] in q's dtype, lse [B, T, Hq] float32, -inf where t sees no
    compressed token). Raises ValueError for inputs `supports` rejects."""
    b, t = q.shape[:2]
    slots = layout.compressed_layout(segment_ids, b, t, cfg).start
    kstart, kend = compressed_ranges(slots, layout.document_starts(segment_ids, b, t),
                                     cfg.compress_block)
    return range_attention_bthd(q, k_cmp, v_cmp, kstart, kend, scale=scale, tiling=tiling,
                                interpret=interpret)


def window_attention(q, k, v, cfg: NSAConfig, *, segment_ids=None, scale=None, interpret=False,
                     tiling: Tiling | None = None):
    """nsa_jax.ops.window_attention on Hopper (the sliding window of w = cfg.window keys
    [t - w + 1, t] of t's document; nsa_spec.md, window branch): q [B, T, Hq, Dk], k/v
    [B, T, Hkv, D], segment_ids [B, T] or None -> o [B, T, Hq, Dv] in q's dtype. Raises ValueError
    for inputs `supports` rejects."""
    b, t = q.shape[:2]
    kstart, kend = window_ranges(layout.document_starts(segment_ids, b, t), cfg.window)
    return range_attention_bthd(q, k, v, kstart, kend, scale=scale, tiling=tiling,
                                interpret=interpret)[0]
