"""Pallas GPU kernels (Triton lowering; pltriton.CompilerParams is always passed)."""
from pallas_kernels.gpu.compressed import compressed_attention
from pallas_kernels.gpu.selected import selected_attention

__all__ = ["compressed_attention", "selected_attention"]
