"""GPU Pallas kernels: `triton/` (Pallas-Triton, any CUDA GPU; pltriton.CompilerParams always
passed) and `mosaic/` (Mosaic GPU for Hopper)."""
