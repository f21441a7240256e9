"""SwiGLU feed-forward: out(silu(gate(x)) * up(x))."""
import jax
from flax import nnx

from nsa_jax.config import ModelConfig
from nsa_jax.layers.projections import dense


class SwiGLU(nnx.Module):
    def __init__(self, cfg: ModelConfig, *, rngs: nnx.Rngs):
        self.gate = dense(cfg, cfg.d_model, cfg.mlp_hidden, rngs=rngs)
        self.up = dense(cfg, cfg.d_model, cfg.mlp_hidden, rngs=rngs)
        self.down = dense(cfg, cfg.mlp_hidden, cfg.d_model, rngs=rngs)

    def __call__(self, x):
        return self.down(jax.nn.silu(self.gate(x)) * self.up(x))
