"""Mosaic TPU Pallas kernels for NSA's compressed and selected branches, each behind a custom_vjp
(forward, dQ and dK/dV kernels; no atomics), with their ops twin's signature. Verified on CPU in
TPU interpret mode and by lowering for TPU with jax.export; not yet compiled or timed on TPU
hardware."""
