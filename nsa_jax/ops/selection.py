"""Selection branch: block importance from the compressed attention, top-n block choice with
forced blocks, and attention over the chosen blocks."""
from __future__ import annotations

import jax
import jax.numpy as jnp

from nsa_jax import layout, selection_rule
from nsa_jax.config import NSAConfig
from nsa_jax.ops import dispatch, validation
from nsa_jax.ops.chunking import map_query_chunks
from nsa_jax.ops.compression import check_compressed_args, grouped_logits
from nsa_jax.ops.masked_softmax import compute_dtype, masked_softmax_stats, normalise


def block_scores(q, k_cmp, lse, cfg: NSAConfig, *, segment_ids=None, scale=None,
                 implementation=None):
    """Importance of every selection block for every query: [B, T, Hkv, ceil(T / l')] float32.

    The compressed branch's softmax probabilities (normalised with its `lse`) mapped onto
    selection blocks by overlap — compressed token i adds p_i times the number of stride-d chunks
    it shares with the block (weights 1, 2, 2, 2, 1 for l=32, d=16, l'=64) — and summed over the G
    query heads of each KV head (nsa_spec.md §2.2, paper eq. 8-9). Blocks are counted from the
    query's document start. scale defaults to 1/sqrt(Dk).

    implementation: "reference" or "xla"; "pallas" and None run "xla" (the kernel fuses scoring
    with the top-n: nsa_attention uses it). Raises ValueError for bad arguments.
    """
    dims = check_compressed_args(q, k_cmp, k_cmp, cfg, segment_ids)
    validation.expect_shape("lse", lse, (dims.batch, dims.length, dims.q_heads), "[B, T, Hq]")
    return dispatch.run("block_scores", implementation, q, k_cmp, lse.astype(jnp.float32), cfg,
                        segment_ids=segment_ids,
                        scale=validation.default_scale(scale, q.shape[-1]))


def _compressed_probs(q_c, pos_c, doc_c, lse_c, k_c, start, cfg, scale):
    """Compressed-branch probabilities summed over each KV head's group: [B, Hkv, C, Tc]."""
    logits = grouped_logits(q_c, k_c, scale)  # [B, Hkv, G, C, Tc]
    b, hkv, g, c, _ = logits.shape
    lse_c = jnp.moveaxis(lse_c.reshape(b, c, hkv, g), 1, 3)[..., None]
    visible = layout.compressed_visible(start, pos_c, doc_c, cfg)[:, None, None]
    visible &= jnp.isfinite(lse_c)
    probs = jnp.exp(jnp.where(visible, logits - jnp.where(visible, lse_c, 0.0), -jnp.inf))
    return jnp.sum(probs, axis=2)


def overlap_to_blocks(probs, index, cfg: NSAConfig, num_blocks: int):
    """Map probabilities over compressed slots [B, H, C, Tc] to selection blocks [B, H, C, NB].

    Slot probabilities are first placed at their document-relative index i (slots of other
    documents carry zero probability), then spread over the l/d stride chunks token i covers, and
    the chunks are summed per selection block (l'/d chunks each). index=None: slot i already holds
    compressed token i (one document, as in a decoding cache), so no placement is needed.
    """
    l, d, lp = cfg.compress_block, cfg.compress_stride, cfg.select_block
    width = num_blocks * (lp // d)
    if index is None:
        local = jnp.pad(probs, [(0, 0)] * 3 + [(0, max(width - probs.shape[-1], 0))])[..., :width]
    else:
        target = jnp.where(index >= 0, index, width)  # padding slots are dropped

        def place(p_b, idx_b):
            return jnp.zeros(p_b.shape[:-1] + (width,), p_b.dtype).at[..., idx_b].add(
                p_b, mode="drop")

        local = jax.vmap(place)(probs, target)
    chunks = sum(jnp.pad(local, [(0, 0)] * 3 + [(n, 0)])[..., :width] for n in range(l // d))
    return chunks.reshape(*chunks.shape[:-1], num_blocks, lp // d).sum(-1)


def _scores_chunk(xs, shared, cfg, scale, num_blocks):
    q_c, pos_c, doc_c, lse_c = xs
    k_c, start, index = shared
    probs = _compressed_probs(q_c.astype(k_c.dtype), pos_c, doc_c, lse_c, k_c, start, cfg, scale)
    return jnp.moveaxis(overlap_to_blocks(probs, index, cfg, num_blocks), 1, 2)


def _score_inputs(q, k_cmp, lse, cfg, segment_ids, query_offset=None):
    b, t = q.shape[:2]
    length = layout.sequence_length(t, segment_ids, query_offset)
    lay = layout.compressed_layout(segment_ids, b, length, cfg)
    queries = layout.query_layout(segment_ids, b, t, query_offset)
    cd = compute_dtype(q)
    stop = jax.lax.stop_gradient
    per_query = (stop(q), *queries, stop(lse))
    return per_query, (stop(k_cmp).astype(cd), lay.start, lay.index)


def block_scores_xla(q, k_cmp, lse, cfg, *, segment_ids=None, scale):
    b, t, _, _ = q.shape
    num_blocks = cfg.num_blocks(t)
    per_query, shared = _score_inputs(q, k_cmp, lse, cfg, segment_ids)
    fn = lambda xs, sh: (_scores_chunk(xs, sh, cfg, scale, num_blocks).astype(jnp.float32),)
    return map_query_chunks(fn, per_query, shared)[0]


def select_blocks(scores, cfg: NSAConfig, *, segment_ids=None, implementation=None):
    """Top-n selection blocks per query and KV head: [B, T, Hkv, n] int32, from block scores
    [B, T, Hkv, ceil(T / l')] (any float dtype, compared as float32).

    The rule (nsa_spec.md §2.2, paper eq. 10-11), the same in every implementation, in the fused
    selection of nsa_attention and in decoding (all call or mirror nsa_jax.selection_rule):
    - only blocks up to the query's own (document-relative) block are candidates;
    - blocks 0..num_init_blocks-1 and the num_local_blocks blocks ending at the query's block are
      always chosen, whatever their scores, and count toward n;
    - the others rank by score: +inf above every finite score, -inf and NaN below every finite
      score but still candidates (a query that sees at most n blocks selects all of them),
      -0.0 equal to +0.0;
    - ties go to the lower block id.
    Unused slots are -1; ids come sorted ascending with the -1 slots last.

    implementation: "reference" or "xla"; "pallas" and None run "xla" (the kernel fuses scoring
    with the top-n: nsa_attention uses it). Raises ValueError for bad arguments.
    """
    validation.check_config(cfg)
    if not hasattr(scores, "dtype") or len(scores.shape) != 4 \
            or not jnp.issubdtype(scores.dtype, jnp.floating):
        raise ValueError(f"scores must be a floating array [B, T, Hkv, NB], got "
                         f"{getattr(scores, 'shape', type(scores).__name__)}")
    b, t, hkv, _ = scores.shape
    validation.expect_shape("scores", scores, (b, t, hkv, cfg.num_blocks(t)),
                            "[B, T, Hkv, ceil(T / select_block)]")
    validation.check_segment_ids(segment_ids, b, t)
    return dispatch.run("select_blocks", implementation, scores.astype(jnp.float32), cfg,
                        segment_ids=segment_ids)


def select_blocks_xla(scores, cfg, *, segment_ids=None):
    b, t = scores.shape[:2]
    local_pos = layout.document_positions(segment_ids, b, t)[..., None]
    return selection_rule.select_top_n(scores, local_pos, cfg)


def select(q, k_cmp, lse, cfg: NSAConfig, *, segment_ids=None, scale, implementation=None):
    """select_blocks(block_scores(q, k_cmp, lse, ...)) fused, on validated arguments (nsa_attention
    calls it): [B, T, Hkv, n] int32, no gradient.

    implementation: "reference", "xla" (per query chunk, so [T, NB] scores never exist at once),
    "pallas" (on Hopper the Mosaic GPU block-score kernel for 16-bit inputs with Dk a multiple of
    64, scoring queries in chunks that bound the scores' memory, then the Triton top-n; else the
    fused Triton kernel on GPU, Hopper and CPU in interpret mode; xla for float64 and on TPU) or
    None (pallas on GPU, xla on CPU and TPU); ops.dispatch.TABLE.
    """
    return dispatch.run("select", implementation, q, k_cmp, lse, cfg, segment_ids=segment_ids,
                        scale=scale)


def select_xla(q, k_cmp, lse, cfg, *, segment_ids=None, scale, query_offset=None):
    """block_scores + select_blocks per query chunk, so [T, NB] scores never exist at once.
    query_offset: q holds a shard of the queries (`layout.query_layout`)."""
    num_blocks = cfg.num_blocks(layout.sequence_length(q.shape[1], segment_ids, query_offset))
    per_query, shared = _score_inputs(q, k_cmp, lse, cfg, segment_ids, query_offset)

    def fn(xs, sh):
        scores = _scores_chunk(xs, sh, cfg, scale, num_blocks)
        return (selection_rule.select_top_n(scores, (xs[1] - xs[2])[..., None], cfg),)

    return map_query_chunks(fn, per_query, shared)[0]


def selected_attention(q, k, v, indices, cfg: NSAConfig, *, segment_ids=None, scale=None,
                       implementation=None):
    """Attention of each query over the tokens of its selected blocks: [B, T, Hq, Dv].

    indices [B, T, Hkv, n] int (from `select_blocks`): block j of the query's document covers its
    tokens [j*l', (j+1)*l' - 1]; keys after the query are masked; negative slots are skipped and a
    repeated block counts once. An id past the query's own block (past its document's or the
    sequence's blocks included, any int32) holds no key the query may see and counts as -1 in
    every implementation; it is not an error, since a check would need the values on the host.
    All G query heads of a KV head share its blocks (nsa_spec.md §2.3). scale defaults to
    1/sqrt(Dk).

    implementation: "reference", "xla", "pallas" (on Hopper the Mosaic GPU kernels for bf16/f16
    with G <= 64, else the Triton kernels for bf16/f32, else xla; the Triton kernels on CPU in
    interpret mode and on GPU for bf16/f32; the Mosaic TPU kernels on TPU for f32/bf16; xla for
    other dtypes) or None (pallas on GPU/TPU, xla on CPU); ops.dispatch.TABLE. Raises ValueError
    for bad arguments.
    """
    validation.check_config(cfg)
    dims = validation.check_qkv(q, k, v)
    validation.check_indices(indices, dims)
    validation.check_segment_ids(segment_ids, dims.batch, dims.length)
    return dispatch.run("selected_attention", implementation, q, k, v, indices.astype(jnp.int32),
                        cfg, segment_ids=segment_ids,
                        scale=validation.default_scale(scale, dims.dk))


def _first_occurrence(indices):
    """[..., n] bool: slot holds a non-negative id not already held by an earlier slot."""
    n = indices.shape[-1]
    earlier = jnp.tril(jnp.ones((n, n), bool), k=-1)
    repeated = jnp.any((indices[..., :, None] == indices[..., None, :]) & earlier, axis=-1)
    return (indices >= 0) & ~repeated


def selected_attention_xla(q, k, v, indices, cfg, *, segment_ids=None, scale, query_offset=None):
    """query_offset: q and indices hold a shard of the queries (`layout.query_layout`); k and v
    the whole sequence."""
    b, tq, hq, _ = q.shape
    t, hkv = k.shape[1:3]
    lp = cfg.select_block
    cd = compute_dtype(q)

    def chunk(xs, shared):
        q_c, pos_c, doc_c, idx_c = xs
        k_h, v_h = shared  # [B, Hkv, T, D]
        c, n = idx_c.shape[1], idx_c.shape[3]
        starts = layout.selected_block_starts(idx_c, pos_c[:, :, None], doc_c[:, :, None], lp)
        key = jnp.maximum(starts, 0)[..., None] + jnp.arange(lp)  # <= t + l' - 1: no overflow
        use = (_first_occurrence(starts)[..., None] & (key <= pos_c[:, :, None, None, None]))
        rows = jnp.moveaxis(jnp.clip(key, 0, t - 1), 2, 1).reshape(b, hkv, c * n * lp, 1)
        k_g = jnp.take_along_axis(k_h, rows, axis=2).reshape(b, hkv, c, n * lp, -1)
        v_g = jnp.take_along_axis(v_h, rows, axis=2).reshape(b, hkv, c, n * lp, -1)
        qg = q_c.astype(cd).reshape(b, c, hkv, hq // hkv, -1)
        logits = jnp.einsum("bchgd,bhckd->bhgck", qg, k_g, precision="highest") * scale
        mask = jnp.moveaxis(use, 2, 1).reshape(b, hkv, 1, c, n * lp)
        probs, _ = normalise(*masked_softmax_stats(logits, mask))
        o = jnp.einsum("bhgck,bhckd->bchgd", probs, v_g, precision="highest")
        return (o.reshape(b, c, hq, -1).astype(q.dtype),)

    shared = (jnp.moveaxis(k.astype(cd), 2, 1), jnp.moveaxis(v.astype(cd), 2, 1))
    queries = layout.query_layout(segment_ids, b, tq, query_offset)
    return map_query_chunks(chunk, (q, *queries, indices), shared)[0]
