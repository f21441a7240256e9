"""Models built from nsa_jax.layers."""
from nsa_jax.models.decoder_lm import DecoderLM
from nsa_jax.models.param_count import num_params

__all__ = ["DecoderLM", "num_params"]
