"""Pallas kernels behind nsa_jax.ops, one file per kernel family (its kernels, backward,
custom_vjp and `Tiling` options together). Every entry point has the signature of its ops twin,
`(q, k, v, ..., cfg, *, segment_ids=None, scale=None, interpret=False, tiling=None)`, and is
reached through nsa_jax.ops.dispatch. Kernels import nothing of nsa_jax but `config`, `layout`
and `selection_rule` (the import-linter contracts in setup.cfg enforce it).

    gpu/triton/   Pallas-Triton kernels (any CUDA GPU; interpret mode on CPU for the tests)
    gpu/mosaic/   Mosaic GPU kernels for Hopper (wgmma, TMA)
    tpu/          Mosaic TPU kernels
"""
import jax.numpy as jnp

# The one finite stand-in for -inf that kernels mask logits with: large enough that exp() of a
# masked logit minus any real row maximum is 0, small enough that masked - masked stays finite
# (a row that sees nothing never makes inf - inf = NaN).
MASKED = -0.7 * float(jnp.finfo(jnp.float32).max)


def check_row_count(positions: int, heads: int) -> None:
    """Kernels lay queries out as rows (position x head of a KV group) and index them in int32
    (e.g. position * heads + head): positions * heads must stay below 2**31."""
    if positions * heads >= 2**31:
        raise ValueError(f"T * heads per KV group = {positions} * {heads} query rows must be < "
                         f"2**31 (the kernels index rows in int32); split the sequence")

