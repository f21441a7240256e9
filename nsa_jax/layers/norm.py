"""RMSNorm (flax's), normalising in float32 whatever the compute dtype."""
import jax.numpy as jnp
from flax import nnx

from nsa_jax.config import ModelConfig


def rms_norm(cfg: ModelConfig, *, rngs: nnx.Rngs) -> nnx.RMSNorm:
    return nnx.RMSNorm(cfg.d_model, epsilon=cfg.norm_eps, dtype=jnp.float32,
                       param_dtype=jnp.dtype(cfg.param_dtype), rngs=rngs)
