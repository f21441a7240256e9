"""NSA block selection on GPU: the compressed branch's probabilities (recomputed from its LSE) ->
overlap-weighted selection-block scores -> group sum -> top-n with forced blocks, fused in one
kernel (select_kernel). XLA only prepares per-query document data and sorts the n chosen ids."""
from __future__ import annotations

import jax.numpy as jnp

from nsa_jax.config import NSAConfig
from pallas_kernels.gpu.compressed import (DTYPES, group_queries, padded_documents,
                                           tile_sizes)
from pallas_kernels.gpu.compressed_index import first_slot_of_document
from pallas_kernels.gpu.padding import check_layout, pad_to, pow2
from pallas_kernels.gpu.select_kernel import SelectTiling, select_forward


def _check_inputs(q, k_cmp, lse, start, doc_start):
    if q.ndim != 4 or k_cmp.ndim != 4:
        raise ValueError(f"q and k_cmp must be [B, T, H, D]; got {q.shape}, {k_cmp.shape}")
    b, t, hq, dk = q.shape
    tc, hkv = k_cmp.shape[1:3]
    if k_cmp.shape != (b, tc, hkv, dk) or hq % hkv:
        raise ValueError(f"k_cmp must be [B, Tc, Hkv, Dk] with Hkv dividing Hq, matching q "
                         f"{q.shape}; got {k_cmp.shape}")
    if q.dtype != k_cmp.dtype or q.dtype not in DTYPES:
        raise ValueError(f"q and k_cmp must share one dtype of {[d.__name__ for d in DTYPES]}; "
                         f"got {q.dtype}, {k_cmp.dtype}")
    if lse.shape != (b, t, hq):
        raise ValueError(f"lse must be [B, T, Hq] = [{b}, {t}, {hq}]; got {lse.shape}")
    check_layout(start, doc_start, b, t, tc)


def _document_leaders(doc, qb: int):
    """Per query tile: the in-tile offsets of the first query of each document present (leading
    entries of [B, Tq/qb, qb]) and how many there are [B, Tq/qb]."""
    b, tq = doc.shape
    tiles = doc.reshape(b, tq // qb, qb)
    first = jnp.arange(qb) == 0
    leads = first | (tiles != jnp.concatenate([tiles[..., :1], tiles[..., :-1]], axis=-1))
    order = jnp.argsort(~leads, axis=-1, stable=True).astype(jnp.int32)
    return order, leads.sum(axis=-1, dtype=jnp.int32)


def _sorted_ids(chosen, length: int, n: int):
    """[B, Tq, H, width] kernel output -> [B, T, H, n] ascending, -1 last."""
    big = jnp.iinfo(jnp.int32).max
    x = chosen[:, :length, :, :n]
    x = jnp.sort(jnp.where(x < 0, big, x), axis=-1)
    return jnp.where(x == big, -1, x)


def select_blocks(q, k_cmp, lse, start, cfg: NSAConfig, *, doc_start=None, scale=None,
                  interpret=False, rows_per_program=128, key_block=64, num_warps=8,
                  num_stages=2):
    """Top-n selection blocks per query and KV head, [B, T, Hkv, n] int32, with the semantics of
    nsa_jax.ops.select_blocks(block_scores(q, k_cmp, lse, ...)): block ids counted from the
    query's document start, blocks after the query's own excluded, the first num_init_blocks and
    the num_local_blocks ending at the query's block forced, ties to the lower id, ascending, -1
    padding last. No gradient (block choice is not differentiable).

    q [B, T, Hq, Dk], k_cmp [B, Tc, Hkv, Dk], lse [B, T, Hq] (the compressed branch's, -inf for
    rows that see nothing), start [B, Tc] int32 slot starts and doc_start [B, T] int32 as for
    compressed_attention. key_block: compressed slots per step (a power of 2).
    """
    _check_inputs(q, k_cmp, lse, start, doc_start)
    if key_block < 1 or key_block & (key_block - 1):
        raise ValueError(f"key_block must be a power of 2, got {key_block}")
    b, t, hq, dk = q.shape
    tc, hkv = k_cmp.shape[1:3]
    g, gp = hq // hkv, pow2(hq // hkv)
    qb = tile_sizes(gp, rows_per_program, rows_per_program)[0]
    ratio = cfg.select_block // cfg.compress_stride
    tiling = SelectTiling.for_config(
        cfg, qb=qb, gp=gp, slots=max(key_block, pow2(ratio)),
        scale=float(dk ** -0.5 if scale is None else scale), num_warps=num_warps,
        num_stages=num_stages, interpret=interpret)
    blocks, slots = tiling.blocks, tiling.slots
    tq = -(-t // qb) * qb
    doc = padded_documents(doc_start, b, t, tq)
    offset = first_slot_of_document(start, doc)
    # A document's tiles read up to this many slots past its first one.
    reach = -(-cfg.num_blocks(t) // blocks) * blocks * ratio + slots
    kp = pad_to(k_cmp, (None, tc + reach, None, pow2(dk)))
    startp = pad_to(start, (None, tc + reach), value=-1)
    rows = pad_to(lse.astype(jnp.float32).reshape(b, t, hkv, g), (None, tq, None, gp),
                  value=-jnp.inf)
    rows = rows.transpose(0, 2, 1, 3).reshape(b, hkv, tq * gp)
    chosen = select_forward(tiling, *_document_leaders(doc, qb), doc, offset, startp,
                            group_queries(q, hkv, tq), kp, rows)
    return _sorted_ids(chosen, t, cfg.num_selected)
