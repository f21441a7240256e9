"""One GPU-kernel test class runs twice: compiled on a GPU (skipped elsewhere) and, through a
subclass with INTERPRET = True, in Pallas interpret mode on CPU (the jax repo's own pattern)."""
from __future__ import annotations

import jax
import jax.numpy as jnp
import pytest


class CompiledOrInterpreted:
    INTERPRET = False

    @pytest.fixture(autouse=True)
    def _needs_backend(self):
        if not self.INTERPRET and jax.default_backend() != "gpu":
            pytest.skip("compiled Triton kernels need a GPU; the interpret subclass runs on CPU")

    def _tolerance(self, dtype):
        if dtype == jnp.bfloat16:
            return 3e-2
        return 1e-5 if self.INTERPRET else 5e-3  # GPU float32 dots run as TF32
