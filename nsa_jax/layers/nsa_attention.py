"""NSAAttention: projections, RoPE, learned compression and gates around ops.nsa_attention."""
from typing import NamedTuple

import jax
import jax.numpy as jnp
from flax import nnx

from nsa_jax import ops
from nsa_jax.branches import BRANCHES
from nsa_jax.config import ModelConfig
from nsa_jax.layers.compressor import make_compressor
from nsa_jax.layers.documents import check_segment_ids, document_positions
from nsa_jax.layers.projections import KVProjection, dense, split_heads
from nsa_jax.layers.rotary import apply_rope


class BranchInputs(NamedTuple):
    """Projections of NSAAttention's input: q, k (selection, rotated), v; the pre-RoPE k/v that phi
    compresses; the window's own rotated k/v (None when the branches share K/V); gates."""

    q: jax.Array
    k: jax.Array
    v: jax.Array
    k_cmp_raw: jax.Array
    v_cmp_raw: jax.Array
    k_win: jax.Array | None
    v_win: jax.Array | None
    gates: jax.Array


def _gate_bias_init(biases: tuple[float, float, float]):
    """Flax initializer of the gate bias [Hq * 3]: `biases` (cmp, slc, win) for every head."""
    def init(key, shape, dtype=jnp.float32):
        del key
        return jnp.tile(jnp.asarray(biases, dtype), shape[0] // len(BRANCHES))

    return init


class NSAAttention(nnx.Module):
    """Native Sparse Attention layer with GQA (Hq = G * Hkv, any G >= 1).

    Call: `(x [B, T, d_model], *, positions=None, segment_ids=None)
    -> (y [B, T, d_model], {"gate_mean": [3] float32, "indices": [B, T, Hkv, n] int32})`: gate
    means over batch, tokens and heads in branch order (cmp, slc, win), and the selection blocks
    each query chose (ops.nsa_attention's aux; -1 for unused slots). positions default to
    document-relative token indices.

    RoPE convention (decoding must reproduce it): queries and the selection/window keys are rotated
    at their document-relative position t. Compressed keys are built from keys *before* RoPE: phi
    maps the raw window of compressed token i (document-relative tokens [i*d, i*d + l - 1]) to one
    key, which is then rotated at position i*d, the document-relative index of the window's first
    token. Compressed values are not rotated. A query at t thus sees compressed token i at relative
    distance t - i*d >= l - 1.

    K/V: one projection serves all three branches (cfg.separate_branch_kv=False), or each branch
    has its own (True, the paper's choice). phi for keys and for values are separate modules.
    Gates: sigmoid(Linear(x)) per head and branch, zero weights and bias cfg.gate_bias_init, so
    every gate starts at sigmoid(bias) (the default starts the window branch dominant).
    """

    def __init__(self, cfg: ModelConfig, *, rngs: nnx.Rngs):
        self.cfg = cfg
        self.q = dense(cfg, cfg.d_model, cfg.num_heads * cfg.head_dim, rngs=rngs)
        self.kv = KVProjection(cfg, rngs=rngs)  # shared, or the selection branch's own
        separate = cfg.separate_branch_kv
        self.kv_cmp = KVProjection(cfg, rngs=rngs) if separate else None
        self.kv_win = KVProjection(cfg, rngs=rngs) if separate else None
        self.k_compressor = make_compressor(cfg, cfg.head_dim, rngs=rngs)
        self.v_compressor = make_compressor(cfg, cfg.v_head_dim, rngs=rngs)
        self.gate = dense(cfg, cfg.d_model, cfg.num_heads * len(BRANCHES), rngs=rngs, use_bias=True,
                          kernel_init=nnx.initializers.zeros_init(),
                          bias_init=_gate_bias_init(cfg.gate_bias_init))
        self.out = dense(cfg, cfg.num_heads * cfg.v_head_dim, cfg.d_model, rngs=rngs)

    def compress(self, k, v, *, segment_ids=None, offset=0):
        """Compressed (k_cmp, v_cmp) [B, Tc, Hkv, D] from pre-RoPE k and v, with the RoPE convention
        of the class docstring applied to k_cmp. Padding slots are zero. `offset` ([B, 1] or int)
        is added to the rotation positions: decoding compresses the lone window of compressed
        token i, which starts at i*d, not 0."""
        k_cmp, position = self.k_compressor(k, segment_ids=segment_ids)
        v_cmp, _ = self.v_compressor(v, segment_ids=segment_ids)
        return apply_rope(k_cmp, position + offset, self.cfg.rope_theta), v_cmp

    def gates(self, x):
        """[B, T, Hq, 3] in [0, 1], order (cmp, slc, win)."""
        return jax.nn.sigmoid(split_heads(self.gate(x), self.cfg.num_heads))

    def project(self, x, positions) -> BranchInputs:
        """Everything the three branches need from x [B, T, d_model] at `positions` [B, T]."""
        cfg = self.cfg
        rotate = lambda t: apply_rope(t, positions, cfg.rope_theta)
        k, v = self.kv(x)
        k_cmp, v_cmp = self.kv_cmp(x) if self.kv_cmp is not None else (k, v)
        k_win, v_win = self.kv_win(x) if self.kv_win is not None else (None, None)
        return BranchInputs(q=rotate(split_heads(self.q(x), cfg.num_heads)), k=rotate(k), v=v,
                            k_cmp_raw=k_cmp, v_cmp_raw=v_cmp,
                            k_win=None if k_win is None else rotate(k_win), v_win=v_win,
                            gates=self.gates(x))

    def __call__(self, x, *, positions=None, segment_ids=None):
        batch, length, _ = x.shape
        check_segment_ids(segment_ids, batch, length)
        if positions is None:
            positions = document_positions(segment_ids, batch, length)
        p = self.project(x, positions)
        k_cmp, v_cmp = self.compress(p.k_cmp_raw, p.v_cmp_raw, segment_ids=segment_ids)
        return self.attend(p, k_cmp, v_cmp, segment_ids=segment_ids)

    def attend(self, p: BranchInputs, k_cmp, v_cmp, *, segment_ids=None):
        """The parallel (training) attention of all T tokens of `p`, through the output layer."""
        batch, length = p.q.shape[:2]
        # the indices are computed for the selection branch anyway; callers that drop them
        # leave dead code that jit removes
        o, aux = ops.nsa_attention(
            p.q, p.k, p.v, p.gates.astype(p.q.dtype), self.cfg.nsa, k_cmp=k_cmp, v_cmp=v_cmp,
            k_win=p.k_win, v_win=p.v_win, segment_ids=segment_ids,
            implementation=self.cfg.implementation, return_aux=True)
        y = self.out(o.reshape(batch, length, -1))
        return y, {"gate_mean": jnp.mean(p.gates.astype(jnp.float32), axis=(0, 1, 2)),
                   "indices": aux["indices"]}
