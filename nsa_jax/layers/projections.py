"""Linear layers with the config's dtypes, and the K/V projection every attention kind uses."""
import jax.numpy as jnp
from flax import nnx

from nsa_jax.config import ModelConfig


def dense(cfg: ModelConfig, features_in: int, features_out: int, *, rngs: nnx.Rngs, **kwargs):
    """Bias-free nnx.Linear computing in cfg.dtype with cfg.param_dtype parameters."""
    kwargs.setdefault("use_bias", False)
    return nnx.Linear(features_in, features_out, dtype=jnp.dtype(cfg.dtype),
                      param_dtype=jnp.dtype(cfg.param_dtype), rngs=rngs, **kwargs)


def split_heads(y, num_heads: int):
    """[B, T, H*D] -> [B, T, H, D]."""
    return y.reshape(*y.shape[:-1], num_heads, y.shape[-1] // num_heads)


class KVProjection(nnx.Module):
    """x [B, T, d_model] -> k [B, T, Hkv, Dk], v [B, T, Hkv, Dv] (k before RoPE)."""

    def __init__(self, cfg: ModelConfig, *, rngs: nnx.Rngs):
        self.num_kv_heads = cfg.num_kv_heads
        self.k = dense(cfg, cfg.d_model, cfg.num_kv_heads * cfg.head_dim, rngs=rngs)
        self.v = dense(cfg, cfg.d_model, cfg.num_kv_heads * cfg.v_head_dim, rngs=rngs)

    def __call__(self, x):
        return split_heads(self.k(x), self.num_kv_heads), split_heads(self.v(x), self.num_kv_heads)
