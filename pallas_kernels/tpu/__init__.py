"""Mosaic TPU Pallas kernels for NSA's compressed and selected branches, each behind a custom_vjp
(forward, dQ and dK/dV kernels; no atomics). Verified on CPU in TPU interpret mode and by lowering
for TPU with jax.export; not yet compiled or timed on TPU hardware."""
from pallas_kernels.tpu.compressed import compressed_attention
from pallas_kernels.tpu.selected import selected_attention

__all__ = ["compressed_attention", "selected_attention"]
