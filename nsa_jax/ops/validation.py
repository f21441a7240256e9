"""Argument checks shared by every op: bad input fails loudly, naming the argument, what it got
and what it needs — never a silent NaN, clamp or wrong answer."""
from __future__ import annotations

import math
from typing import NamedTuple

import jax.numpy as jnp

from nsa_jax.config import NSAConfig


class Dims(NamedTuple):
    batch: int
    length: int
    q_heads: int
    kv_heads: int
    group: int
    dk: int
    dv: int


def _shape(x) -> tuple:
    return tuple(getattr(x, "shape", ()))


def _require_float(name: str, x) -> None:
    if not hasattr(x, "dtype") or not jnp.issubdtype(x.dtype, jnp.floating):
        raise ValueError(f"{name} must be a floating-point array, got {getattr(x, 'dtype', type(x).__name__)}")


def expect_shape(name: str, x, shape: tuple, layout: str) -> None:
    if _shape(x) != tuple(shape):
        raise ValueError(f"{name} must have shape {layout} = {tuple(shape)}, got {_shape(x)}")


def check_config(cfg) -> NSAConfig:
    if not isinstance(cfg, NSAConfig):
        raise ValueError(f"cfg must be an nsa_jax.NSAConfig, got {type(cfg).__name__}")
    return cfg


def check_qkv(q, k, v, *, key_length: int | None = None, names=("q", "k", "v")) -> Dims:
    """q [B,T,Hq,Dk], k [B,S,Hkv,Dk], v [B,S,Hkv,Dv] with one floating dtype and Hq a multiple of
    Hkv; S = T unless `key_length` says otherwise (compressed keys)."""
    nq, nk, nv = names
    for name, x in zip(names, (q, k, v)):
        _require_float(name, x)
        if len(_shape(x)) != 4:
            raise ValueError(f"{name} must be rank 4 [B, T, heads, head_dim], got shape {_shape(x)}")
    if not (q.dtype == k.dtype == v.dtype):
        raise ValueError(f"{nq}, {nk} and {nv} must share one dtype, got {q.dtype}, {k.dtype}, {v.dtype}")
    b, t, hq, dk = q.shape
    s = t if key_length is None else key_length
    for name, x in ((nk, k), (nv, v)):
        if x.shape[:2] != (b, s):
            raise ValueError(f"{name} must have [B, length] = {(b, s)}, got shape {x.shape}")
    if k.shape[3] != dk:
        raise ValueError(f"{nk} head_dim must equal {nq} head_dim {dk}, got {nk} shape {k.shape}")
    hkv = k.shape[2]
    if v.shape[2] != hkv:
        raise ValueError(f"{nv} must have the {hkv} KV heads of {nk}, got {nv} shape {v.shape}")
    if hkv < 1 or hq % hkv:
        raise ValueError(f"{nq} heads (Hq={hq}) must be a multiple of KV heads (Hkv={hkv}) "
                         "for grouped attention")
    if min(b, t, dk, v.shape[3]) < 1:
        raise ValueError(f"{nq}, {nk}, {nv} must be non-empty, got shapes {q.shape}, {k.shape}, {v.shape}")
    return Dims(b, t, hq, hkv, hq // hkv, dk, v.shape[3])


def check_tokens(name: str, x) -> None:
    """One [B, T, H, D] floating array (the input of compression)."""
    _require_float(name, x)
    if len(_shape(x)) != 4 or min(x.shape) < 1:
        raise ValueError(f"{name} must be a non-empty rank-4 array [B, T, H, D], got shape {_shape(x)}")


def check_segment_ids(segment_ids, batch: int, length: int) -> None:
    if segment_ids is None:
        return
    if not hasattr(segment_ids, "dtype") or not jnp.issubdtype(segment_ids.dtype, jnp.integer):
        raise ValueError(f"segment_ids must be an integer array [B, T], got "
                         f"{getattr(segment_ids, 'dtype', type(segment_ids).__name__)}")
    expect_shape("segment_ids", segment_ids, (batch, length), "[B, T]")


def check_scale(scale) -> float | None:
    if scale is None:
        return None
    if isinstance(scale, bool) or not isinstance(scale, (int, float)) or not math.isfinite(scale) \
            or scale <= 0:
        raise ValueError(f"scale must be a positive finite number or None, got {scale!r}")
    return float(scale)


def default_scale(scale, dk: int) -> float:
    return check_scale(scale) if scale is not None else 1.0 / math.sqrt(dk)


def check_indices(indices, dims: Dims) -> None:
    if not hasattr(indices, "dtype") or not jnp.issubdtype(indices.dtype, jnp.integer):
        raise ValueError(f"indices must be an integer array [B, T, Hkv, n], got "
                         f"{getattr(indices, 'dtype', type(indices).__name__)}")
    if len(_shape(indices)) != 4 or indices.shape[:3] != (dims.batch, dims.length, dims.kv_heads) \
            or indices.shape[3] < 1:
        raise ValueError(f"indices must have shape [B, T, Hkv, n] = "
                         f"{(dims.batch, dims.length, dims.kv_heads)} + (n >= 1,), got {_shape(indices)}")
