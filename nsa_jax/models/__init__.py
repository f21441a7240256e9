"""Models built from nsa_jax.layers, and the language-model objective they train on."""
from nsa_jax.models.decoder_lm import DecoderLM
from nsa_jax.models.objective import (LOSS_NORMALIZATIONS, logits_and_gates, mean_loss,
                                      token_losses)
from nsa_jax.models.param_count import matching_mlp_hidden, num_params

__all__ = ["DecoderLM", "LOSS_NORMALIZATIONS", "logits_and_gates", "matching_mlp_hidden",
           "mean_loss", "num_params", "token_losses"]
