"""What every Mosaic GPU kernel here shares: SMEM tile layouts, the two matmul forms, and the
interpret-mode and CPU-lowering plumbing.

Interpret mode (`interpret=True` in the kernels, run on CPU by the tests) simulates threads,
SMEM, TMA, barriers and wgmma with race detection, but in jax 0.11.2 it lacks two things the
compiled kernels use: a wgmma whose A operand lives in registers, and `pl.run_state` over a
pre-initialised accumulator. `mma` therefore takes one of two equivalent routes, chosen at trace
time: compiled, a register operand and an accumulating wgmma; interpreted, the operand staged
through SMEM and a fresh product added to the accumulator. Both compute acc + a @ b.
"""
from __future__ import annotations

import contextlib

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import mosaic_gpu as plgpu

# The device the CPU-side lowering and interpret mode pretend to run on (jax 0.11 needs one).
HOPPER = jax.sharding.AbstractDevice(device_kind="NVIDIA H100 80GB HBM3", platform="gpu",
                                     num_cores=132)
SWIZZLE = 128  # bytes: the widest swizzle, rows of 64 16-bit elements


def interpret_params():
    """Mosaic GPU interpret mode with race detection (a private jax path, kept in this one place)."""
    from jax._src.pallas.mosaic_gpu.interpret.params import InterpretGPUParams

    return InterpretGPUParams(detect_races=True)


def races_found() -> bool:
    """Whether the interpret-mode runs so far saw a data race."""
    from jax._src.pallas.mosaic_gpu.interpret import interpret_pallas_call

    return bool(interpret_pallas_call.get_races().races_found)


@contextlib.contextmanager
def abstract_hopper():
    """Lower (jax.export, platforms=["cuda"]) or interpret Mosaic GPU kernels on a CPU machine."""
    mesh = jax.sharding.AbstractMesh((), (), abstract_device=HOPPER)
    with jax.sharding.use_abstract_mesh(mesh):
        yield


def tiled_smem(shape, dtype):
    """An SMEM buffer [..., rows, cols] in the swizzled tile layout wgmma and TMA read (cols a
    multiple of 128 bytes' worth of elements)."""
    cols = SWIZZLE // jnp.dtype(dtype).itemsize
    return plgpu.SMEM(shape, dtype, transforms=(plgpu.TilingTransform((8, cols)),
                                                plgpu.SwizzleTransform(SWIZZLE)))


def narrow_smem(shape, dtype):
    """SMEM in the 32-byte swizzle: a wgmma operand whose K dimension is a multiple of 16 only (or
    whose rows are 16..63 16-bit elements wide); wgmma takes K in steps of one swizzle width."""
    cols = 32 // jnp.dtype(dtype).itemsize
    return plgpu.SMEM(shape, dtype, transforms=(plgpu.TilingTransform((8, cols)),
                                                plgpu.SwizzleTransform(32)))


def matmul(a, b, shape):
    """A fresh float32 product a @ b of `shape` [M, N]: a an SMEM ref [M, K], b an SMEM ref [K, N]
    (either may be a `.transpose((1, 0))` view)."""
    def body(acc):
        plgpu.wgmma(acc, a, b)
        return acc[...]

    return pl.run_scoped(body, plgpu.ACC(shape, jnp.float32))


def mma(acc, a, b, *, interpret: bool, staging=None, during=None):
    """acc + a @ b with acc a float32 value [M, N], b an SMEM ref [K, N] and a either an SMEM ref
    or a 16-bit value [M, K]. Interpreted, a value `a` is first written to `staging` (an SMEM ref
    of its shape and dtype, e.g. `tiled_smem`), which only interpret mode needs. `during`, a
    function of no arguments (e.g. a barrier wait for the next tile), runs while the compiled
    wgmma is in flight, and after the product when interpreted."""
    if not interpret:
        def issue(ref):
            plgpu.wgmma(ref, a, b)
            if during is not None:
                during()

        return pl.run_state(issue)(plgpu.ACC.init(acc))
    if not isinstance(a, jax.Array | jax.core.Tracer):
        out = acc + matmul(a, b, acc.shape)
    elif staging is None:
        raise ValueError("mma(interpret=True) with a register operand needs an SMEM `staging` ref")
    else:
        staging[...] = a
        plgpu.commit_smem()
        out = acc + matmul(staging, b, acc.shape)
    if during is not None:
        during()
    return out
