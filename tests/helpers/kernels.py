"""One GPU-kernel test class runs twice: compiled on a GPU (skipped elsewhere) and, through a
subclass with INTERPRET = True, in Pallas interpret mode on CPU (the jax repo's own pattern); and
the CPU-side check that a function lowers for CUDA."""
from __future__ import annotations

import jax
import jax.numpy as jnp
import pytest
from jax import export

from nsa_jax import ops

H100 = jax.sharding.AbstractDevice(device_kind="NVIDIA H100 80GB HBM3", platform="gpu",
                                   num_cores=132)


def export_for_cuda(fn, *shapes):
    """jax.export of jit(fn) for CUDA on an abstract H100: the real Pallas -> Triton lowering runs
    on CPU, so shapes or tiles the GPU rejects fail here."""
    with jax.sharding.use_abstract_mesh(jax.sharding.AbstractMesh((), (), abstract_device=H100)):
        return export.export(jax.jit(fn), platforms=["cuda"], disabled_checks=[
            export.DisabledSafetyCheck.custom_call("__gpu$xla.gpu.triton")])(*shapes)


# Decode lowering shapes: the paper's (Hq=64, Hkv=4, D=128) at 64k context with batch 1 and 32,
# and the small model's (configs/small_nsa.py: G = 4, D = 64) at batch 8 with room for new tokens.
DECODE_SHAPES = [(1, 64, 4, 128, 0), (32, 64, 4, 128, 0), (8, 8, 2, 64, 128)]


def decode_specs(batch, hq, hkv, d, extra):
    """bfloat16 ShapeDtypeStructs of a decode call's (q, k, v, k_cmp, v_cmp, gates, position) over
    a cache of 65536 + extra slots laid out as nsa_jax.generation.cache does (paper NSAConfig)."""
    slots = 65536 + extra
    compressed = -(-(slots // 16) // 128) * 128
    bf16 = lambda *s: jax.ShapeDtypeStruct(s, jnp.bfloat16)
    return (bf16(batch, hq, d), bf16(batch, slots, hkv, d), bf16(batch, slots, hkv, d),
            bf16(batch, compressed, hkv, d), bf16(batch, compressed, hkv, d),
            bf16(batch, hq, 3), jax.ShapeDtypeStruct((batch,), jnp.int32))


class CompiledOrInterpreted:
    INTERPRET = False
    BACKENDS = ("gpu", "hopper")  # where the compiled class runs; Mosaic GPU kernels: hopper only

    @pytest.fixture(autouse=True)
    def _needs_backend(self):
        if not self.INTERPRET and ops.backend() not in self.BACKENDS:
            pytest.skip(f"the compiled kernels need a {' or '.join(self.BACKENDS)} backend; the "
                        "interpret subclass runs on CPU")

    def _tolerance(self, dtype):
        if dtype == jnp.bfloat16:
            return 3e-2
        return 1e-5 if self.INTERPRET else 5e-3  # GPU float32 dots run as TF32
