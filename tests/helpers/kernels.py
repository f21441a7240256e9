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
