"""DecoderLM: causality, packed-document independence, parameter count, a training step."""
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

from nsa_jax import ops
from nsa_jax.config import NSAConfig
from nsa_jax.layers import document_positions
from nsa_jax.models import DecoderLM, matching_mlp_hidden, num_params
from tests.helpers.models import jitted_forward, tiny_model_config

KINDS = ("nsa", "full", "window")


def _tokens(key, batch, length, vocab=29):
    return jax.random.randint(jax.random.key(key), (batch, length), 0, vocab)


@pytest.mark.parametrize("group_size", [1, 2])
@pytest.mark.parametrize("kind", KINDS)
def test_logits_ignore_future_tokens(kind, group_size):
    model = DecoderLM(tiny_model_config(group_size, attention=kind), rngs=nnx.Rngs(0))
    forward = jitted_forward(model)
    tokens = _tokens(1, 2, 24)
    cut = 13
    changed = tokens.at[:, cut + 1:].set(_tokens(2, 2, 24 - cut - 1))
    before, after = forward(tokens), forward(changed)
    np.testing.assert_allclose(before[:, :cut + 1], after[:, :cut + 1], rtol=1e-5, atol=1e-5)
    assert np.abs(before[:, cut + 1:] - after[:, cut + 1:]).max() > 1e-3  # the change is seen


@pytest.mark.parametrize("kind,compressor,separate", [
    ("nsa", "mean", False), ("nsa", "linear", True), ("nsa", "mlp", False),
    ("full", "mean", False), ("window", "mean", False)])
def test_packed_documents_are_independent(kind, compressor, separate):
    cfg = tiny_model_config(2, attention=kind, compressor=compressor, separate_branch_kv=separate)
    model = DecoderLM(cfg, rngs=nnx.Rngs(3))
    forward = jitted_forward(model)
    lengths = (7, 11, 6)  # boundaries aligned to neither d, l nor l'
    docs = [_tokens(10 + i, 1, n) for i, n in enumerate(lengths)]
    # ids repeat (5, 9, 5): the third document is a new run, not a continuation of the first
    segment_ids = jnp.concatenate([jnp.full((1, n), s) for n, s in zip(lengths, (5, 9, 5))], axis=1)
    packed = forward(jnp.concatenate(docs, axis=1), segment_ids)
    start = 0
    for doc, n in zip(docs, lengths):
        np.testing.assert_allclose(packed[:, start:start + n], forward(doc), rtol=1e-5, atol=1e-5)
        start += n


@pytest.mark.parametrize("overrides", [
    dict(attention="nsa", compressor="mean"),
    dict(attention="nsa", compressor="linear", v_head_dim=6),
    dict(attention="nsa", compressor="mlp", separate_branch_kv=True, num_kv_heads=1),
    dict(attention="full"),
    dict(attention="window", num_heads=6, num_kv_heads=3),
])
def test_parameter_count_matches_formula(overrides):
    cfg = tiny_model_config(**overrides)
    model = DecoderLM(cfg, rngs=nnx.Rngs(0))
    counted = sum(p.size for p in jax.tree.leaves(nnx.state(model, nnx.Param)))
    assert counted == num_params(cfg)


@pytest.mark.parametrize("compressor", ["mean", "linear", "mlp"])
def test_matching_mlp_hidden_gives_the_nearest_count(compressor):
    nsa = tiny_model_config(compressor=compressor)
    full = tiny_model_config(attention="full")
    hidden = matching_mlp_hidden(full, num_params(nsa))
    counts = [num_params(tiny_model_config(attention="full", mlp_hidden=h))
              for h in (hidden - 1, hidden, hidden + 1)]
    assert abs(counts[1] - num_params(nsa)) == min(abs(c - num_params(nsa)) for c in counts)
    with pytest.raises(ValueError, match="no mlp_hidden >= 1 gives full attention 10 parameters"):
        matching_mlp_hidden(full, 10)


@pytest.mark.parametrize("kind", KINDS)
def test_training_step_lowers_loss(kind):
    model = DecoderLM(tiny_model_config(2, attention=kind, compressor="linear"), rngs=nnx.Rngs(0))
    optimizer = nnx.Optimizer(model, optax.adamw(1e-2), wrt=nnx.Param)

    @nnx.jit
    def train_step(model, optimizer, tokens):
        def loss_fn(model):
            logits = model(tokens[:, :-1])
            return optax.softmax_cross_entropy_with_integer_labels(logits, tokens[:, 1:]).mean()

        loss, grads = nnx.value_and_grad(loss_fn)(model)
        optimizer.update(model, grads)
        return loss

    tokens = _tokens(4, 2, 25)
    losses = [float(train_step(model, optimizer, tokens)) for _ in range(5)]
    assert np.all(np.isfinite(losses))
    assert losses[-1] < losses[0] - 0.5, losses


def test_gate_means_start_window_dominated():
    cfg = tiny_model_config(attention="nsa")
    forward = nnx.jit(lambda m, tokens: m(tokens, return_aux=True))
    logits, aux = forward(DecoderLM(cfg, rngs=nnx.Rngs(0)), _tokens(5, 1, 16))
    assert logits.shape == (1, 16, cfg.vocab_size) and logits.dtype == jnp.float32
    np.testing.assert_allclose(aux["gate_mean"], np.tile(jax.nn.sigmoid(jnp.array([-2., -2., 2.])),
                                                         (cfg.num_layers, 1)), rtol=1e-6)


def test_remat_changes_nothing_but_memory():
    tokens = _tokens(6, 1, 16)
    models = [DecoderLM(tiny_model_config(attention="full", remat=r), rngs=nnx.Rngs(0))
              for r in (False, True)]
    loss_and_grad = nnx.jit(nnx.value_and_grad(lambda m: m(tokens).mean()))
    plain, remat = (loss_and_grad(m) for m in models)
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-7), plain, remat)
    graphs = []
    for model in models:
        graphdef, state = nnx.split(model)
        graphs.append(str(jax.make_jaxpr(lambda s: nnx.merge(graphdef, s)(tokens))(state)))
    assert "remat" not in graphs[0] and "remat" in graphs[1]


def test_bfloat16_compute_keeps_float32_logits():
    cfg = tiny_model_config(attention="nsa", dtype="bfloat16")
    logits = jitted_forward(DecoderLM(cfg, rngs=nnx.Rngs(0)))(_tokens(7, 1, 16))
    assert logits.dtype == jnp.float32 and bool(jnp.isfinite(logits).all())


@pytest.mark.parametrize("bad", [
    dict(tokens=jnp.zeros((2, 8), jnp.float32)),
    dict(tokens=jnp.zeros((8,), jnp.int32)),
    dict(segment_ids=jnp.zeros((2, 7), jnp.int32)),
])
def test_bad_model_input_raises(bad):
    model = DecoderLM(tiny_model_config(attention="full"), rngs=nnx.Rngs(0))
    args = {"tokens": jnp.zeros((2, 8), jnp.int32), "segment_ids": None, **bad}
    with pytest.raises(ValueError):
        model(args["tokens"], segment_ids=args["segment_ids"])


def _layer0_indices(model, tokens, segment_ids):
    """ops.nsa_attention's indices on the inputs the first NSA layer sees, computed outside
    DecoderLM."""
    batch, length = tokens.shape
    block = model.blocks[0]
    p = block.attn.project(block.attn_norm(model.embed(tokens)),
                           document_positions(segment_ids, batch, length))
    k_cmp, v_cmp = block.attn.compress(p.k_cmp_raw, p.v_cmp_raw, segment_ids=segment_ids)
    _, aux = ops.nsa_attention(p.q, p.k, p.v, p.gates, model.cfg.nsa, k_cmp=k_cmp, v_cmp=v_cmp,
                               k_win=p.k_win, v_win=p.v_win, segment_ids=segment_ids,
                               implementation=model.cfg.implementation, return_aux=True)
    return aux["indices"]


def test_aux_indices_are_each_layers_selection():
    cfg = tiny_model_config(2, attention="nsa", compressor="mlp", num_layers=3)
    model = DecoderLM(cfg, rngs=nnx.Rngs(8))
    tokens = _tokens(9, 2, 24)
    segment_ids = jnp.array([[1] * 24, [1] * 9 + [2] * 15])
    _, aux = nnx.jit(lambda m, t, s: m(t, segment_ids=s, return_aux=True))(model, tokens,
                                                                           segment_ids)
    indices = np.asarray(aux["indices"])
    nsa = cfg.nsa
    assert indices.shape == (3, 2, 24, cfg.num_kv_heads, nsa.num_selected)
    assert indices.dtype == np.int32
    np.testing.assert_array_equal(indices[0], _layer0_indices(model, tokens, segment_ids))
    assert not np.array_equal(indices[0], indices[1])  # each layer its own, not a copy
    relative = np.asarray(document_positions(segment_ids, 2, 24))
    own_block = (relative // nsa.select_block)[None, :, :, None, None]
    valid = indices >= 0
    assert np.all(indices >= -1)
    assert np.all(indices[valid] <= np.broadcast_to(own_block, indices.shape)[valid])  # causal
    assert np.all(np.diff(valid.astype(int), axis=-1) <= 0)  # -1 only at the end
    assert np.all((np.diff(indices, axis=-1) > 0) | ~valid[..., 1:])  # sorted and distinct
    for forced in (0, own_block):  # the init block and the query's own block are always chosen
        assert np.all((indices == forced).any(-1))


def test_dense_models_return_no_aux():
    for kind in ("full", "window"):
        model = DecoderLM(tiny_model_config(attention=kind), rngs=nnx.Rngs(0))
        assert model(_tokens(10, 1, 12), return_aux=True)[1] == {}
