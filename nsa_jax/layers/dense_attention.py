"""Dense attention baselines with NSAAttention's interface, through jax.nn.dot_product_attention."""
import jax
import jax.numpy as jnp
from flax import nnx

from nsa_jax import ops
from nsa_jax.config import ModelConfig, require_int
from nsa_jax.layers.documents import (check_segment_ids, document_positions,
                                      same_document_mask)
from nsa_jax.layers.projections import KVProjection, dense, split_heads
from nsa_jax.layers.rotary import apply_rope


def dense_implementation(dtype) -> str:
    """cuDNN flash attention on GPU for 16-bit inputs (all it accepts), XLA everywhere else."""
    half = jnp.dtype(dtype) in (jnp.dtype(jnp.bfloat16), jnp.dtype(jnp.float16))
    return "cudnn" if half and ops.backend() in ("gpu", "hopper") else "xla"


class DenseAttention(nnx.Module):
    """Causal GQA attention with RoPE: all keys [0, t] ("full", window=None) or the last `window`
    keys [t - window + 1, t] ("window"), never across a document boundary of `segment_ids`.

    Call: `(x [B, T, d_model], *, positions=None, segment_ids=None) -> (y [B, T, d_model], {})`;
    positions default to the document-relative index of each token.
    """

    def __init__(self, cfg: ModelConfig, *, window: int | None = None, rngs: nnx.Rngs):
        if window is not None:
            require_int("DenseAttention window", window, 1)  # or None: all keys
        self.num_heads, self.rope_theta, self.window = cfg.num_heads, cfg.rope_theta, window
        self.q = dense(cfg, cfg.d_model, cfg.num_heads * cfg.head_dim, rngs=rngs)
        self.kv = KVProjection(cfg, rngs=rngs)
        self.out = dense(cfg, cfg.num_heads * cfg.v_head_dim, cfg.d_model, rngs=rngs)

    def project(self, x, positions):
        """q [B, T, Hq, D], k [B, T, Hkv, D] rotated at `positions` [B, T], and v."""
        q = apply_rope(split_heads(self.q(x), self.num_heads), positions, self.rope_theta)
        k, v = self.kv(x)
        return q, apply_rope(k, positions, self.rope_theta), v

    def __call__(self, x, *, positions=None, segment_ids=None):
        batch, length, _ = x.shape
        check_segment_ids(segment_ids, batch, length)
        if positions is None:
            positions = document_positions(segment_ids, batch, length)
        return self.attend(*self.project(x, positions), segment_ids=segment_ids)

    def attend(self, q, k, v, *, segment_ids=None):
        """The parallel (training) attention of all T tokens, through the output layer."""
        batch, length = q.shape[:2]
        o = jax.nn.dot_product_attention(
            q, k, v, mask=None if segment_ids is None else same_document_mask(segment_ids),
            is_causal=True, local_window_size=None if self.window is None else (self.window - 1, 0),
            implementation=dense_implementation(q.dtype))
        return self.out(o.reshape(batch, length, -1)), {}
