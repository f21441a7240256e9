"""What the Pallas-Triton kernels share: padding to Triton-friendly tiles (Triton arrays must have
power-of-2 sizes and dots want >= 16 rows), the flash-attention steps of the forward and backward
kernels, and the compiler settings."""
from __future__ import annotations

import jax
import jax.numpy as jnp
from jax.experimental.pallas import triton as pltriton

from pallas_kernels import MASKED

MIN_ROWS = 16  # smallest dot row count Triton takes on a GPU: small groups are padded to it
DTYPES = (jnp.bfloat16, jnp.float16, jnp.float32)  # what the Triton kernels compute in


def pow2(x: int) -> int:
    """Smallest power of 2 >= x (1 for x <= 1)."""
    return 1 << max(0, (x - 1).bit_length())


def is_pow2(x: int) -> bool:
    return x >= 1 and x & (x - 1) == 0


def check_pow2(name: str, value: int) -> None:
    if not is_pow2(value):
        raise ValueError(f"{name} must be a power of 2, got {value}")


def pad_to(x, sizes, value=0):
    """Pad x at the end of each axis up to `sizes` (None = keep) with `value`."""
    widths = [(0, 0 if s is None else s - n) for n, s in zip(x.shape, sizes)]
    return jnp.pad(x, widths, constant_values=value) if any(w for _, w in widths) else x


def check_dtypes(names: str, arrays, dtypes=DTYPES) -> None:
    """All `arrays` share one dtype of `dtypes`."""
    if len({x.dtype for x in arrays}) != 1 or arrays[0].dtype not in dtypes:
        raise ValueError(f"{names} must share one dtype of {[jnp.dtype(d).name for d in dtypes]};"
                         f" got {[x.dtype.name for x in arrays]}")


def dot_precision(dtype):
    """HIGHEST (IEEE float32) for float32 operands, which Triton would otherwise round to TF32;
    the default for 16-bit ones."""
    return jax.lax.Precision.HIGHEST if jnp.dtype(dtype) == jnp.float32 else None


def scores(q, k, scale: float, precision=None):
    """q [rows, D] @ k [keys, D]^T * scale, float32."""
    s = jax.lax.dot_general(q, k, (((1,), (1,)), ((), ())), precision=precision,
                            preferred_element_type=jnp.float32)
    return s * scale


def transposed_dot(a, b):
    """a [rows, M]^T @ b [rows, N], float32 (the dK/dV sums over query rows)."""
    return jax.lax.dot_general(a, b, (((0,), (0,)), ((), ())), preferred_element_type=jnp.float32)


def empty_softmax(rows: int, dv: int):
    """(acc, running max, running sum) of a flash-attention row block that has seen nothing."""
    return (jnp.zeros((rows, dv), jnp.float32), jnp.full((rows, 1), MASKED, jnp.float32),
            jnp.zeros((rows, 1), jnp.float32))


def softmax_update(carry, s, mask, v, precision=None):
    """One key tile of flash attention from its logits s [rows, keys] (any finite value where not
    `mask`): (acc, m, l) updated with the values v."""
    acc, m, l = carry
    s = jnp.where(mask, s, MASKED)
    m_new = jnp.maximum(m, s.max(axis=1, keepdims=True))
    p = jnp.where(mask, jnp.exp(s - m_new), 0.0)
    alpha = jnp.exp(m - m_new)
    pv = jnp.dot(p.astype(v.dtype), v, precision=precision, preferred_element_type=jnp.float32)
    return acc * alpha + pv, m_new, l * alpha + p.sum(axis=1, keepdims=True)


def online_softmax_step(carry, q, k, v, mask, scale: float):
    """One key tile of flash attention: (acc, m, l) updated with the keys k, v where `mask`."""
    return softmax_update(carry, scores(q, k, scale), mask, v)


def softmax_result(acc, m, l):
    """(o, lse): rows that saw nothing give o = 0 and lse = -inf."""
    seen = l > 0
    safe = jnp.where(seen, l, 1.0)
    return acc / safe, jnp.where(seen, m + jnp.log(safe), -jnp.inf)


def recomputed_grads(q, k, v, do, lse, delta, mask, scale: float):
    """(p, ds) of one key tile in the backward pass: the forward's probabilities recomputed from
    its LSE (finite where the row saw nothing: p is masked to 0 there) and dS = p * (dO V^T -
    delta), delta = rowsum(o * dO) minus the LSE cotangent."""
    p = jnp.where(mask, jnp.exp(scores(q, k, scale) - lse), 0.0)
    return p, p * (scores(do, v, 1.0) - delta)


def compiler_params(num_warps: int, num_stages: int):
    return pltriton.CompilerParams(num_warps=num_warps, num_stages=num_stages)
