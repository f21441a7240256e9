"""Registers the Pallas kernels that exist with the dispatcher (imported lazily, on first use of
implementation="pallas"). Ops without a kernel fall back to xla in `dispatch.run`."""
from nsa_jax.ops import decode_pallas  # noqa: F401  (nsa_decode_attention)
