"""Text generation with a KV cache: `prefill` a batch of prompts, then `step` one token per
sequence (each a pure function of the model and the cache), and `generate` (sampling loop).

    cache.py           the cache's layout, allocation and writes (CacheState)
    cached_layers.py   one attention layer's prefill and step over its cache
    cached_forward.py  the whole DecoderLM through its cache: prefill, step
    sampling.py        generate(): prefill, then one jitted step per token, with sampling

A trained run's model comes from nsa_jax.train.load_trained_run.
"""
from nsa_jax.generation.cache import CacheState, cache_sizes, init_state
from nsa_jax.generation.cached_forward import prefill, room, step
from nsa_jax.generation.sampling import Generation, generate

__all__ = ["CacheState", "Generation", "cache_sizes", "generate", "init_state", "prefill", "room",
           "step"]
