"""The functional NSA API: pure functions, no parameters, no Flax (see each function's docstring).

Every op takes `implementation`: "reference" (the dense oracle of `reference.py`), "xla" (chunked
gathers, O(T) memory), "pallas" (kernels where they exist) or None (the fastest that runs here);
`dispatch.TABLE` says what runs for each op, implementation and backend, with every fallback.
"""
from nsa_jax.branches import BRANCHES
from nsa_jax.config import IMPLEMENTATIONS
from nsa_jax.ops.compression import compress, compressed_attention, compression_blocks
from nsa_jax.ops.decode_attention import dense_decode_attention, nsa_decode_attention
from nsa_jax.ops.dispatch import backend
from nsa_jax.ops.nsa import nsa_attention
from nsa_jax.ops.selection import block_scores, select_blocks, selected_attention
from nsa_jax.ops.window import window_attention

__all__ = ["BRANCHES", "IMPLEMENTATIONS", "backend", "block_scores", "compress",
           "compressed_attention", "compression_blocks", "dense_decode_attention",
           "nsa_attention", "nsa_decode_attention", "select_blocks", "selected_attention",
           "window_attention"]
