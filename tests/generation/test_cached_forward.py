"""Decoding parity: prefill plus token-by-token decoding reproduce the parallel forward's logits
(float32, CPU), for every attention kind, compressor and K/V sharing, with a batch of prompts of
different lengths; the cached compressed tokens equal the parallel compressor's."""
import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from nsa_jax import generation
from nsa_jax.config import NSAConfig
from nsa_jax.models import DecoderLM
from tests.helpers.inputs import rel_err
from tests.helpers.models import tiny_model_config

# l != d and l' != l; 5+ selection blocks of which n=3 (2 forced) are chosen, so from position 24
# on there is a genuine choice; the window ring (8 slots) wraps.
NSA = NSAConfig(compress_block=4, compress_stride=2, select_block=8, num_selected=3,
                num_init_blocks=1, num_local_blocks=1, window=5)
PROMPTS = (3, 13)  # one shorter than l; neither aligned to d or l'
STEPS = 30  # every row crosses several compressed-token and selection-block boundaries
TOLERANCE = 1e-5


def _model(seed, **overrides):
    """A tiny model with every parameter moved off its initial value (the gates' zero weights,
    the linear phi's mean-pool init), so each branch and phi matter to the logits."""
    model = DecoderLM(tiny_model_config(2, nsa=NSA, **overrides), rngs=nnx.Rngs(seed))
    params = nnx.state(model, nnx.Param)
    leaves, tree = jax.tree.flatten(params)
    keys = jax.random.split(jax.random.key(seed + 1), len(leaves))
    nnx.update(model, jax.tree.unflatten(tree, [
        x + 0.3 * jax.random.normal(k, x.shape, x.dtype) for x, k in zip(leaves, keys)]))
    return model


CASES = {  # one layer each, except one case that checks decoding through a second layer
    "nsa-mean-2layers": dict(attention="nsa", compressor="mean"),
    "nsa-linear-separate": dict(attention="nsa", compressor="linear", separate_branch_kv=True,
                                num_layers=1),
    "nsa-mlp-dv6": dict(attention="nsa", compressor="mlp", v_head_dim=6, num_layers=1),
    "nsa-mlp-separate-mqa": dict(attention="nsa", compressor="mlp", separate_branch_kv=True,
                                 num_kv_heads=1, num_layers=1),
    "full": dict(attention="full", num_layers=1),
    "window": dict(attention="window", num_layers=1),
}


@functools.cache
def _decoded(case: str):
    """(model, tokens, parallel logits, prefill logits, logits of STEPS decoded tokens per row,
    final state) for one case; shared by the tests below to compile each case once."""
    model = _model(7, **CASES[case])
    tokens = jax.random.randint(jax.random.key(3), (2, max(PROMPTS) + STEPS), 0, 29)
    parallel = nnx.jit(lambda m, t: m(t))(model, tokens)
    max_len = tokens.shape[1]
    prefilled, state = nnx.jit(lambda m, t, n: generation.prefill(m, t, n, max_len))(
        model, tokens[:, :max(PROMPTS)], jnp.asarray(PROMPTS, jnp.int32))
    step = nnx.jit(generation.step)
    rows, decoded = jnp.arange(tokens.shape[0]), []
    for _ in range(STEPS):
        out, state = step(model, state, tokens[rows, state.lengths])
        decoded.append(out)
    return model, tokens, parallel, prefilled, jnp.stack(decoded, axis=1), state


@pytest.mark.parametrize("case", CASES)
def test_decoding_reproduces_parallel_logits(case):
    _, _, parallel, prefilled, decoded, state = _decoded(case)
    for row, n in enumerate(PROMPTS):
        assert rel_err(prefilled[row, :n], parallel[row, :n]) < TOLERANCE
        assert rel_err(decoded[row], parallel[row, n:n + STEPS]) < TOLERANCE, f"row {row}"
    np.testing.assert_array_equal(state.lengths, np.asarray(PROMPTS) + STEPS)


def test_cached_compressed_tokens_equal_parallel_compression():
    """The tokens appended one at a time (phi on the pending window, RoPE at i*d) are the ones
    the training path builds for the whole sequence."""
    model, tokens, _, _, _, state = _decoded("nsa-mlp-separate-mqa")
    attn = model.blocks[0].attn
    h = model.blocks[0].attn_norm(model.embed(tokens))
    positions = jnp.broadcast_to(jnp.arange(tokens.shape[1]), tokens.shape)
    p = attn.project(h, positions)
    k_cmp, v_cmp = attn.compress(p.k_cmp_raw, p.v_cmp_raw)
    for row, n in enumerate(PROMPTS):
        count = NSA.num_visible_compressed(n + STEPS - 1)
        assert count > (n + 4) // 2  # tokens were appended while decoding
        cache = state.layers[0]
        assert rel_err(cache["k_cmp"][row, :count], k_cmp[row, :count]) < TOLERANCE
        assert rel_err(cache["v_cmp"][row, :count], v_cmp[row, :count]) < TOLERANCE


def test_cache_sizes_follow_the_layout():
    cfg = tiny_model_config(nsa=NSA)
    sizes = generation.cache_sizes(cfg, 50)
    assert sizes == {"full": 56, "compressed": 32, "ring": 8, "pending": 4}
    state = generation.init_state(tiny_model_config(nsa=NSA, separate_branch_kv=True), 3, 50)
    layer = state.layers[0]
    assert layer["k"].shape == (3, 56, 2, 8) and layer["k_cmp"].shape == (3, 32, 2, 8)
    assert layer["pending_v"].shape == (3, 4, 2, 8) and layer["k_win"].shape == (3, 8, 2, 8)


@pytest.mark.parametrize("bad", ["rank", "lengths", "too_long", "max_len"])
def test_bad_prefill_input_raises(bad):
    model = DecoderLM(tiny_model_config(nsa=NSA), rngs=nnx.Rngs(0))
    tokens, lengths, max_len = jnp.zeros((2, 6), jnp.int32), jnp.array([3, 6]), 16
    if bad == "rank":
        tokens = tokens[0]
    elif bad == "lengths":
        lengths = lengths[:1]
    elif bad == "too_long":
        max_len = 4
    else:
        max_len = 0
    with pytest.raises(ValueError):
        generation.prefill(model, tokens, lengths, max_len)


@pytest.mark.parametrize("attention", ["nsa", "full"])
def test_stepping_past_the_cache_is_never_silent(attention):
    """A sequence whose cache is full (S = max_len rounded up to select_block = 8 tokens): step
    raises a ValueError naming its position and the room outside jit; under jit that row's
    logits are NaN and the other row's are the usual finite ones."""
    model = _model(1, attention=attention, num_layers=1)
    tokens = jax.random.randint(jax.random.key(0), (2, 8), 0, 29)
    _, state = generation.prefill(model, tokens, jnp.array([3, 8], jnp.int32), max_len=8)
    new = jnp.array([1, 2], jnp.int32)
    with pytest.raises(ValueError, match=r"position 8, .* holds 8 tokens"):
        generation.step(model, state, new)
    logits, state = nnx.jit(generation.step)(model, state, new)
    assert np.isnan(logits[1]).all() and np.isfinite(logits[0]).all()
    logits, _ = nnx.jit(generation.step)(model, state, new)  # still full: still NaN
    assert np.isnan(logits[1]).all() and np.isfinite(logits[0]).all()


def test_window_caches_never_fill():
    """Kind "window" keeps a ring: stepping past max_len is fine and not flagged."""
    model = _model(1, attention="window", num_layers=1)
    tokens = jax.random.randint(jax.random.key(0), (1, 8), 0, 29)
    _, state = generation.prefill(model, tokens, jnp.array([8], jnp.int32), max_len=8)
    for _ in range(3):
        logits, state = generation.step(model, state, jnp.array([1], jnp.int32))
        assert np.isfinite(logits).all()
