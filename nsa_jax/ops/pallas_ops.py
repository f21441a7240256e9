"""Registers the Pallas kernels that exist with the dispatcher (imported lazily, on first use of
implementation="pallas"). Ops without a kernel fall back to xla in `dispatch.run`."""
import jax

if jax.default_backend() == "tpu":  # Mosaic TPU kernels compile only for TPUs
    from nsa_jax.ops import pallas_tpu

    pallas_tpu.register()
