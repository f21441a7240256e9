"""The functional NSA API: pure functions, no parameters, no Flax (see each function's docstring).

Every op takes `implementation`: "reference" (the dense oracle of `reference.py`), "xla" (chunked
gathers, O(T) memory), "pallas" (kernels where they exist) or None (the fastest that runs here).
"""
from nsa_jax.ops import reference  # noqa: F401  (registers the oracle with the dispatcher)
from nsa_jax.ops.compression import compress, compressed_attention, compression_blocks
from nsa_jax.ops.decode import dense_decode_attention, nsa_decode_attention
from nsa_jax.ops.dispatch import IMPLEMENTATIONS
from nsa_jax.ops.nsa import nsa_attention
from nsa_jax.ops.selection import block_scores, select_blocks, selected_attention
from nsa_jax.ops.window import window_attention

__all__ = ["IMPLEMENTATIONS", "block_scores", "compress", "compressed_attention",
           "compression_blocks", "dense_decode_attention", "nsa_attention", "nsa_decode_attention",
           "select_blocks", "selected_attention", "window_attention"]
