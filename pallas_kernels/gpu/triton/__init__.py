"""Pallas-Triton kernels, one file per kernel family: compressed_attention, select_blocks (fused
block scoring + top-n), selected_attention, decode_attention; `common` holds what they share."""
