"""Pallas GPU kernels (Triton lowering; pltriton.CompilerParams is always passed)."""
from pallas_kernels.gpu.compressed import compressed_attention
from pallas_kernels.gpu.select import select_blocks
from pallas_kernels.gpu.selected import selected_attention

__all__ = ["compressed_attention", "select_blocks", "selected_attention"]
