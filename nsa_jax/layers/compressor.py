"""Compression phi: maps the l-token window of compressed token i (document-relative tokens
[i*d, i*d + l - 1], before RoPE) to one token. Every compressor returns
`(x_cmp [B, Tc, H, D], position [B, Tc] int32)` in the slot layout of `ops.compress` and
`ops.compression_blocks` (with segment_ids: T // d slots, each document's tokens in order,
padding slots at position -1 and exactly zero)."""
import jax
import jax.numpy as jnp
from flax import nnx

from nsa_jax import ops
from nsa_jax.config import ModelConfig


def compressed_positions(cfg: ModelConfig, segment_ids, batch: int, length: int):
    """Document-relative start i*d of each compressed slot, -1 for padding. Taken from
    ops.compression_blocks on a one-feature dummy so the slot layout has one source of truth."""
    dummy = jnp.zeros((batch, length, 1, 1), jnp.float32)
    return ops.compression_blocks(dummy, cfg.nsa, segment_ids=segment_ids)[1]


class MeanCompressor(nnx.Module):
    """phi = mean of the l tokens (ops.compress); no parameters."""

    def __init__(self, cfg: ModelConfig, dim: int, *, rngs: nnx.Rngs):
        del dim, rngs
        self.cfg = cfg

    def __call__(self, x, *, segment_ids=None):
        x_cmp = ops.compress(x, self.cfg.nsa, segment_ids=segment_ids,
                             implementation=self.cfg.implementation)
        return x_cmp, compressed_positions(self.cfg, segment_ids, x.shape[0], x.shape[1])


class _LearnedCompressor(nnx.Module):
    """Runs `map_blocks` over the raw windows and zeroes the padding slots."""

    def __call__(self, x, *, segment_ids=None):
        blocks, position = ops.compression_blocks(x, self.nsa, segment_ids=segment_ids)
        x_cmp = self.map_blocks(blocks)
        return jnp.where((position >= 0)[:, :, None, None], x_cmp, 0).astype(x.dtype), position


class LinearCompressor(_LearnedCompressor):
    """Per-KV-head linear map of the flattened block, [l*D] -> [D], no bias. Initialised to exact
    mean pooling (weight[h, j*D + a, b] = delta_ab / l): training starts from the mean-pool
    model."""

    def __init__(self, cfg: ModelConfig, dim: int, *, rngs: nnx.Rngs):
        del rngs
        self.nsa, l = cfg.nsa, cfg.nsa.compress_block
        mean_pool = jnp.tile(jnp.eye(dim, dtype=jnp.float32) / l, (l, 1))
        self.weight = nnx.Param(jnp.broadcast_to(mean_pool, (cfg.num_kv_heads, l * dim, dim))
                                .astype(jnp.dtype(cfg.param_dtype)))

    def map_blocks(self, blocks):
        _, _, l, heads, dim = blocks.shape
        weight = self.weight[...].astype(blocks.dtype).reshape(heads, l, dim, -1)
        return jnp.einsum("bclhd,hlde->bche", blocks, weight)


class MLPCompressor(_LearnedCompressor):
    """The paper's phi: a learned intra-block position encoding pe [H, l, D] is added to the block,
    then per KV head Linear(l*D -> hidden) -> SiLU -> Linear(hidden -> D), with biases."""

    def __init__(self, cfg: ModelConfig, dim: int, *, rngs: nnx.Rngs):
        self.nsa, l, heads = cfg.nsa, cfg.nsa.compress_block, cfg.num_kv_heads
        hidden = cfg.compressor_hidden
        dtype = jnp.dtype(cfg.param_dtype)
        init = nnx.initializers.lecun_normal(in_axis=-2, out_axis=-1, batch_axis=(0,))
        self.pos_embedding = nnx.Param(jnp.zeros((heads, l, dim), dtype))
        self.w_in = nnx.Param(init(rngs.params(), (heads, l * dim, hidden), dtype))
        self.b_in = nnx.Param(jnp.zeros((heads, hidden), dtype))
        self.w_out = nnx.Param(init(rngs.params(), (heads, hidden, dim), dtype))
        self.b_out = nnx.Param(jnp.zeros((heads, dim), dtype))

    def map_blocks(self, blocks):
        _, _, l, heads, dim = blocks.shape
        cast = lambda p: p[...].astype(blocks.dtype)
        h = blocks + jnp.swapaxes(cast(self.pos_embedding), 0, 1)  # [l, H, D] onto [B, Tc, l, H, D]
        w_in = cast(self.w_in).reshape(heads, l, dim, -1)
        hidden = jax.nn.silu(jnp.einsum("bclhd,hldk->bchk", h, w_in) + cast(self.b_in))
        return jnp.einsum("bchk,hke->bche", hidden, cast(self.w_out)) + cast(self.b_out)


COMPRESSORS = {"mean": MeanCompressor, "linear": LinearCompressor, "mlp": MLPCompressor}


def make_compressor(cfg: ModelConfig, dim: int, *, rngs: nnx.Rngs) -> nnx.Module:
    """phi of kind cfg.compressor for tokens of `dim` features."""
    return COMPRESSORS[cfg.compressor](cfg, dim, rngs=rngs)
