"""Decoding with a KV cache: prefill, a jitted decode step and sampling (cache layout:
`nsa_jax.decode.cache`)."""
from nsa_jax.decode.cache import DecodeState, cache_sizes, init_state
from nsa_jax.decode.generate import Generation, generate
from nsa_jax.decode.model import prefill, step

__all__ = ["DecodeState", "Generation", "cache_sizes", "generate", "init_state", "prefill",
           "step"]
