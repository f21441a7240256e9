"""Pallas GPU kernels (Triton lowering; pltriton.CompilerParams is always passed)."""
from pallas_kernels.gpu.selected import selected_attention

__all__ = ["selected_attention"]
