"""Registers the Pallas kernels that exist with the dispatcher (imported lazily, on first use of
implementation="pallas"): the Mosaic TPU kernels on a TPU backend, the Triton GPU kernels
everywhere else (compiled on GPU, interpret mode on CPU for tests). Ops without a kernel on the
current backend fall back to xla in `dispatch.run`."""
from __future__ import annotations

import jax

if jax.default_backend() == "tpu":  # Mosaic TPU kernels compile only for TPUs
    from nsa_jax.ops import pallas_tpu as _kernels
else:
    from nsa_jax.ops import pallas_gpu as _kernels

_kernels.register()
