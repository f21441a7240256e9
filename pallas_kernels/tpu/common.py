"""Pieces shared by the TPU kernels: the row layout, matmuls, the masked online softmax and the
double-buffered DMA gather loop.

Row layout: the kernels see queries as rows [B, Hkv, T * G, D], row r = t * G + g, so one tile
of `block_q` positions carries all G query heads of a KV head (block_q * G rows fill the MXU's M
dimension) and every per-query value (position, document start, selected blocks) is a column
[rows, 1] or, in the transposed dK/dV kernels, a lane vector [1, rows].
"""
from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import tpu as pltpu

from pallas_kernels import MASKED, check_row_count

# Sorts after every real token index (marks unused entries before sorting or searching).
AFTER_ALL = int(jnp.iinfo(jnp.int32).max)


def default_block_q(group: int) -> int:
    """Query positions per tile such that rows (block_q * G) are a multiple of 128 (MXU/lanes)."""
    return 128 // math.gcd(group, 128)


def round_up(x: int, m: int) -> int:
    return -(-x // m) * m


def to_rows(x, num_kv_heads: int, padded_length: int):
    """[B, T, Hq, D] -> [B, Hkv, Tp * G, D], zero rows for the padded positions (ValueError if
    Tp * G rows would overflow the kernels' int32 row index)."""
    b, t, hq, d = x.shape
    g = hq // num_kv_heads
    check_row_count(padded_length, g)
    x = jnp.pad(x, [(0, 0), (0, padded_length - t), (0, 0), (0, 0)])
    x = x.reshape(b, padded_length, num_kv_heads, g, d).transpose(0, 2, 1, 3, 4)
    return x.reshape(b, num_kv_heads, padded_length * g, d)


def from_rows(x, length: int, group: int):
    """Inverse of `to_rows`: [B, Hkv, Tp * G, D] -> [B, T, Hq, D]."""
    b, hkv, rows, d = x.shape
    x = x.reshape(b, hkv, rows // group, group, d).transpose(0, 2, 1, 3, 4)
    return x.reshape(b, rows // group, hkv * group, d)[:, :length]


def per_row(x, group: int, padded_length: int, fill):
    """[B, T, ...] per-position values -> [B, Tp * G, ...] (each repeated for the G heads)."""
    pad = [(0, 0), (0, padded_length - x.shape[1])] + [(0, 0)] * (x.ndim - 2)
    return jnp.repeat(jnp.pad(x, pad, constant_values=fill), group, axis=1)


def keys_major(x, padded_length: int):
    """[B, S, Hkv, D] -> [B, Hkv, Sp, D] with zero padding (contiguous rows for DMA/BlockSpecs)."""
    x = jnp.pad(x, [(0, 0), (0, padded_length - x.shape[1]), (0, 0), (0, 0)])
    return x.transpose(0, 2, 1, 3)


def dot(a, b, *, transpose_b: bool = False):
    """a @ b (or a @ b.T) accumulated in float32; float32 operands at full precision."""
    dims = (((1,), (1,)) if transpose_b else ((1,), (0,)), ((), ()))
    precision = lax.Precision.HIGHEST if a.dtype == jnp.float32 else lax.Precision.DEFAULT
    return lax.dot_general(a, b.astype(a.dtype), dims, precision=precision,
                           preferred_element_type=jnp.float32)


def online_softmax_step(carry, logits, mask, v):
    """One flash-attention update of (row max, row sum, accumulator) with masked logits."""
    m, l, acc = carry
    logits = jnp.where(mask, logits, MASKED)
    m_new = jnp.maximum(m, jnp.max(logits, axis=1, keepdims=True))
    p = jnp.where(mask, jnp.exp(logits - m_new), 0.0)
    alpha = jnp.exp(m - m_new)
    l_new = alpha * l + jnp.sum(p, axis=1, keepdims=True)
    return m_new, l_new, alpha * acc + dot(p.astype(v.dtype), v)


def softmax_result(m, l, acc):
    """Output rows and float32 log-sum-exp; rows that saw nothing give exactly 0 and -inf."""
    seen = l > 0
    safe = jnp.where(seen, l, 1.0)
    return jnp.where(seen, acc / safe, 0.0), jnp.where(seen, m + jnp.log(safe), -jnp.inf)


def recomputed_probs(logits, mask, lse):
    """Probabilities of the forward pass from its log-sum-exp (lse made finite by the caller)."""
    return jnp.where(mask, jnp.exp(logits - lse), 0.0)


def gather_loop(count, sources, buffers, sems, body, init):
    """carry = body(step, views, carry) for step in [0, count), where views[k] holds
    sources[k](step) (an HBM ref slice) copied into VMEM; the copy for step + 1 runs while step is
    computed (two slots per buffer, one DMA semaphore per buffer and slot)."""

    def copies(step, slot):
        return [pltpu.make_async_copy(src(step), buf.at[slot], sems.at[k, slot])
                for k, (src, buf) in enumerate(zip(sources, buffers))]

    @pl.when(count > 0)
    def _():
        for c in copies(0, 0):
            c.start()

    def step_fn(step, carry):
        slot = step % 2
        for c in copies(step, slot):
            c.wait()

        @pl.when(step + 1 < count)
        def _():
            for c in copies(step + 1, 1 - slot):
                c.start()

        return body(step, [buf.at[slot] for buf in buffers], carry)

    return lax.fori_loop(0, count, step_fn, init)


def dma_scratch(shapes_dtypes):
    """Two-slot VMEM buffers for `gather_loop` plus their DMA semaphores."""
    buffers = [pltpu.VMEM((2,) + tuple(shape), dtype) for shape, dtype in shapes_dtypes]
    return buffers + [pltpu.SemaphoreType.DMA((len(buffers), 2))]


def lse_for_backward(lse):
    """-inf (rows that saw nothing; their probabilities are masked to 0) -> 0: exp stays finite."""
    return jnp.where(jnp.isfinite(lse), lse, 0.0).astype(jnp.float32)


def kernel_with_vjp(forward, backward, num_inputs: int):
    """f(*inputs, opts) behind a custom_vjp: forward(*inputs, opts) -> (out, residuals) gives the
    value; backward(opts, (*inputs, *residuals), cotangent) -> the inputs' cotangents. opts (the
    static options) is f's last argument and not differentiated."""

    @functools.partial(jax.custom_vjp, nondiff_argnums=(num_inputs,))
    def f(*args):
        return forward(*args)[0]

    def f_fwd(*args):
        out, residuals = forward(*args)
        return out, (*args[:num_inputs], *residuals)

    f.defvjp(f_fwd, backward)
    return f


def prefetch_call(kernel, args, *, grid, num_prefetch, in_specs, out_specs, out_shape, scratch,
                  num_reduction_axes: int, interpret):
    """pallas_call with `num_prefetch` scalar-prefetched leading args; the last
    `num_reduction_axes` grid axes accumulate into scratch (arbitrary), the others are parallel."""
    num_parallel = len(grid) - num_reduction_axes
    semantics = ("parallel",) * num_parallel + ("arbitrary",) * num_reduction_axes
    grid_spec = pltpu.PrefetchScalarGridSpec(num_scalar_prefetch=num_prefetch, grid=grid,
                                             in_specs=in_specs, out_specs=out_specs,
                                             scratch_shapes=scratch)
    return pl.pallas_call(kernel, grid_spec=grid_spec, out_shape=out_shape, interpret=interpret,
                          compiler_params=pltpu.CompilerParams(
                              dimension_semantics=semantics))(*args)
