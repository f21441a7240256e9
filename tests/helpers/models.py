"""Shared by the layer and model tests: a tiny config whose NSA is genuinely sparse at T = 24
(6 selection blocks, 3 selected, window of 4)."""
from flax import nnx

from nsa_jax.config import ModelConfig, NSAConfig

TINY_NSA = NSAConfig(compress_block=4, compress_stride=2, select_block=4, num_selected=3,
                     num_init_blocks=1, num_local_blocks=1, window=4)


def tiny_model_config(group_size: int = 1, **overrides) -> ModelConfig:
    fields = dict(vocab_size=29, d_model=32, num_layers=2, num_heads=2 * group_size,
                  num_kv_heads=2, head_dim=8, mlp_hidden=40, compressor_hidden=12, nsa=TINY_NSA)
    return ModelConfig(**{**fields, **overrides})


def jitted_forward(model):
    """Compiled `model(tokens, segment_ids)`: repeated calls of one shape cost one compile."""
    forward = nnx.jit(lambda m, tokens, segment_ids: m(tokens, segment_ids=segment_ids))
    return lambda tokens, segment_ids=None: forward(model, tokens, segment_ids)
