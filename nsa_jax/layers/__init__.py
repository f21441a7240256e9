"""Flax NNX layers: NSA attention, dense baselines, SwiGLU, RMSNorm, RoPE, the decoder block."""
from nsa_jax.layers.block import DecoderBlock, make_attention
from nsa_jax.layers.compressor import (LinearCompressor, MeanCompressor, MLPCompressor,
                                       make_compressor)
from nsa_jax.layers.dense_attention import DenseAttention
from nsa_jax.layers.documents import document_positions, same_document_mask
from nsa_jax.layers.mlp import SwiGLU
from nsa_jax.layers.norm import rms_norm
from nsa_jax.layers.nsa_attention import NSAAttention
from nsa_jax.layers.rotary import apply_rope

__all__ = ["DecoderBlock", "DenseAttention", "LinearCompressor", "MLPCompressor", "MeanCompressor",
           "NSAAttention", "SwiGLU", "apply_rope", "document_positions", "make_attention",
           "make_compressor", "rms_norm", "same_document_mask"]
