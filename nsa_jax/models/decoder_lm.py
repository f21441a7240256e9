"""Decoder-only language model with a tied token embedding."""
import jax.numpy as jnp
from flax import nnx

from nsa_jax.config import ModelConfig
from nsa_jax.layers import DecoderBlock, document_positions, rms_norm
from nsa_jax.layers.documents import check_segment_ids


def _run_block(block, x, positions, segment_ids):
    return block(x, positions=positions, segment_ids=segment_ids)


class DecoderLM(nnx.Module):
    """tokens [B, T] int -> logits [B, T, vocab] float32.

    Pre-norm blocks (RMSNorm, attention of kind cfg.attention, RMSNorm, SwiGLU), a final RMSNorm and
    the token embedding reused as the output projection. `segment_ids` [B, T] marks packed
    documents: nothing crosses a boundary and positions restart at every document, so a packed
    document gets the logits it gets alone. With `return_aux=True` the call returns
    `(logits, aux)`: for NSA aux["gate_mean"] is [num_layers, 3] float32 (mean gate per layer and
    branch cmp, slc, win) and aux["indices"] is [num_layers, B, T, Hkv, n] int32 (the selection
    blocks each query chose in each layer, counted from its document's start; -1 = unused slot);
    for the dense kinds aux is {}. Under jit, aux entries the caller drops cost nothing.
    """

    def __init__(self, cfg: ModelConfig, *, rngs: nnx.Rngs):
        if not isinstance(cfg, ModelConfig):
            raise ValueError(f"DecoderLM needs a ModelConfig, got {type(cfg).__name__}")
        self.cfg = cfg
        # std 1/sqrt(d_model): the tied output layer then starts with logits of order 1
        self.embed = nnx.Embed(cfg.vocab_size, cfg.d_model, dtype=jnp.dtype(cfg.dtype),
                               param_dtype=jnp.dtype(cfg.param_dtype),
                               embedding_init=nnx.initializers.normal(cfg.d_model ** -0.5),
                               rngs=rngs)
        self.blocks = nnx.List([DecoderBlock(cfg, rngs=rngs) for _ in range(cfg.num_layers)])
        self.final_norm = rms_norm(cfg, rngs=rngs)

    def __call__(self, tokens, *, segment_ids=None, return_aux=False):
        if tokens.ndim != 2 or not jnp.issubdtype(tokens.dtype, jnp.integer):
            raise ValueError(f"tokens must be an int array [B, T], got {tokens.dtype} "
                             f"{tuple(tokens.shape)}")
        batch, length = tokens.shape
        check_segment_ids(segment_ids, batch, length)
        positions = document_positions(segment_ids, batch, length)
        run_block = nnx.remat(_run_block) if self.cfg.remat else _run_block
        x, layers = self.embed(tokens), []
        for block in self.blocks:
            x, aux = run_block(block, x, positions, segment_ids)
            layers.append(aux)
        logits = self.logits(x)
        if not return_aux:
            return logits
        return logits, {name: jnp.stack([aux[name] for aux in layers]) for name in layers[0]}

    def logits(self, x):
        """Final hidden states [..., d_model] -> float32 logits through the tied embedding."""
        return self.embed.attend(self.final_norm(x).astype(x.dtype)).astype(jnp.float32)
