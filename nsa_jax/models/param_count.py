"""Closed-form parameter count of DecoderLM, written from the architecture (not by walking a
model), so a test can hold the two against each other; and the MLP width that gives a model a
wanted count (how a full-attention twin is matched to an NSA model)."""
import dataclasses

from nsa_jax.config import ModelConfig


def _compressor_params(cfg: ModelConfig, dim: int) -> int:
    """One phi for tokens of `dim` features, over all KV heads."""
    l, heads, hidden = cfg.nsa.compress_block, cfg.num_kv_heads, cfg.compressor_hidden
    if cfg.compressor == "mean":
        return 0
    if cfg.compressor == "linear":
        return heads * l * dim * dim
    # position embedding, w_in, b_in, w_out, b_out
    return heads * (l * dim + l * dim * hidden + hidden + hidden * dim + dim)


def _attention_params(cfg: ModelConfig) -> int:
    d, hq, hkv = cfg.d_model, cfg.num_heads, cfg.num_kv_heads
    kv = d * hkv * (cfg.head_dim + cfg.v_head_dim)
    dense = d * hq * cfg.head_dim + kv + hq * cfg.v_head_dim * d  # q, k/v, out
    if cfg.attention != "nsa":
        return dense
    extra_kv = 2 * kv if cfg.separate_branch_kv else 0
    gates = d * hq * 3 + hq * 3
    phi = _compressor_params(cfg, cfg.head_dim) + _compressor_params(cfg, cfg.v_head_dim)
    return dense + extra_kv + gates + phi


def num_params(cfg: ModelConfig) -> int:
    """Trainable parameters of DecoderLM(cfg); the embedding is counted once (tied)."""
    per_layer = 2 * cfg.d_model + _attention_params(cfg) + 3 * cfg.d_model * cfg.mlp_hidden
    return cfg.vocab_size * cfg.d_model + cfg.num_layers * per_layer + cfg.d_model


def matching_mlp_hidden(cfg: ModelConfig, target: int) -> int:
    """The mlp_hidden at which DecoderLM(cfg) has the parameter count nearest to `target` (each
    unit of width is 3 * d_model weights in every layer's SwiGLU)."""
    per_unit = 3 * cfg.d_model * cfg.num_layers
    without_mlp = num_params(dataclasses.replace(cfg, mlp_hidden=1)) - per_unit
    hidden = round((target - without_mlp) / per_unit)
    if hidden < 1:
        raise ValueError(f"no mlp_hidden >= 1 gives {cfg.attention} attention {target} "
                         f"parameters: it has {without_mlp + per_unit} at mlp_hidden=1")
    return hidden
