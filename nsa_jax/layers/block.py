"""Pre-norm decoder block: x + attn(norm(x)), then x + mlp(norm(x))."""
from flax import nnx

from nsa_jax.config import ModelConfig
from nsa_jax.layers.dense_attention import DenseAttention
from nsa_jax.layers.mlp import SwiGLU
from nsa_jax.layers.norm import rms_norm
from nsa_jax.layers.nsa_attention import NSAAttention


def make_attention(cfg: ModelConfig, *, rngs: nnx.Rngs) -> nnx.Module:
    """The token mixer of kind cfg.attention; all kinds share one call signature."""
    if cfg.attention == "nsa":
        return NSAAttention(cfg, rngs=rngs)
    return DenseAttention(cfg, window=cfg.nsa.window if cfg.attention == "window" else None,
                          rngs=rngs)


class DecoderBlock(nnx.Module):
    """Call: `(x [B, T, d_model], *, positions [B, T], segment_ids=None) -> (x, attention aux)`."""

    def __init__(self, cfg: ModelConfig, *, rngs: nnx.Rngs):
        self.attn_norm = rms_norm(cfg, rngs=rngs)
        self.attn = make_attention(cfg, rngs=rngs)
        self.mlp_norm = rms_norm(cfg, rngs=rngs)
        self.mlp = SwiGLU(cfg, rngs=rngs)

    def __call__(self, x, *, positions, segment_ids=None):
        return self.around(x, lambda h: self.attn(h, positions=positions, segment_ids=segment_ids))

    def around(self, x, mix):
        """The block with `mix(normed x) -> (y, extra)` as its token mixer (the attention layer's
        training call, or a cached decoding step); returns (x, extra)."""
        y, extra = mix(self.attn_norm(x))
        x = x + y.astype(x.dtype)
        return x + self.mlp(self.mlp_norm(x)).astype(x.dtype), extra
