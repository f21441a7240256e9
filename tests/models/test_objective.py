"""The training objective: "token" normalisation is the loss as it always was; "row" averages each
row's target tokens first, checked by hand on rows packed as the trainer packs them."""
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

from nsa_jax.data import VOCAB_SIZE, corpus_streams, mqar_example, passkey_example
from nsa_jax.data.packing import corpus_row, example_row, padding_row, rows_to_batch
from nsa_jax.models import DecoderLM, mean_loss
from tests.helpers.models import tiny_model_config

SEQ_LEN = 160


@nnx.jit(static_argnames="normalization")
def _loss(model, batch, normalization):
    return mean_loss(model, batch, normalization)[0]


@nnx.jit
def _loss_as_before(model, batch):
    """The training loss before normalisation was an option (nsa-jax at fbed447)."""
    logits = model(batch["tokens"], segment_ids=batch["segment_ids"])
    ce = optax.softmax_cross_entropy_with_integer_labels(logits, batch["targets"])
    return jnp.sum(ce * batch["loss_mask"]) / jnp.maximum(jnp.sum(batch["loss_mask"]), 1.0)


@pytest.fixture(scope="module")
def model_and_batch():
    """A random-init NSA model and a batch of 4 rows with 159 (two packed documents), 5 (passkey),
    24 (MQAR) and 0 (padding) target tokens."""
    stream = corpus_streams("shakespeare", 0.1)["train"]
    rng = np.random.default_rng(0)
    rows = [corpus_row(stream, int(stream.doc_starts[1]) - 60, SEQ_LEN),
            example_row(passkey_example(SEQ_LEN, 0.5, rng), SEQ_LEN),
            example_row(mqar_example(SEQ_LEN, 3, rng), SEQ_LEN),
            padding_row(SEQ_LEN)]
    batch = rows_to_batch(rows)
    model = DecoderLM(tiny_model_config(vocab_size=VOCAB_SIZE, implementation="reference"),
                      rngs=nnx.Rngs(0))
    return model, batch


def test_batch_is_what_the_test_says(model_and_batch):
    _, batch = model_and_batch
    np.testing.assert_array_equal(batch["loss_mask"].sum(1), [SEQ_LEN - 1, 5, 9, 0])
    assert set(np.unique(batch["segment_ids"][0])) == {1, 2}


def _cross_entropy(model, batch) -> np.ndarray:
    """[B, T] float64 next-token cross-entropy, computed in numpy from the model's logits."""
    forward = nnx.jit(lambda m, tokens, segment_ids: m(tokens, segment_ids=segment_ids))
    logits = np.asarray(forward(model, batch["tokens"], batch["segment_ids"]), np.float64)
    log_probs = logits - logits.max(-1, keepdims=True)
    log_probs -= np.log(np.exp(log_probs).sum(-1, keepdims=True))
    return -np.take_along_axis(log_probs, batch["targets"][..., None], -1)[..., 0]


def test_token_normalization_is_the_loss_as_before(model_and_batch):
    model, batch = model_and_batch
    np.testing.assert_array_equal(_loss(model, batch, "token"), _loss_as_before(model, batch))
    assert mean_loss.__defaults__ == ("token",)


def test_row_normalization_by_hand(model_and_batch):
    model, batch = model_and_batch
    ce, mask = _cross_entropy(model, batch), batch["loss_mask"]
    rows = [ce[b][mask[b] > 0].mean() for b in range(3)]  # row 3 has no targets: left out
    loss, token_loss = _loss(model, batch, "row"), _loss(model, batch, "token")
    np.testing.assert_allclose(loss, np.mean(rows), rtol=1e-5)
    np.testing.assert_allclose(token_loss, (ce * mask).sum() / mask.sum(), rtol=1e-5)
    # the passkey and MQAR rows weigh a third each, not 14 of 173 targets
    assert abs(float(loss) - float(token_loss)) > 1e-3


def test_row_normalization_of_a_batch_without_targets_is_zero(model_and_batch):
    model, _ = model_and_batch
    batch = rows_to_batch([padding_row(SEQ_LEN)] * 4)
    assert float(_loss(model, batch, "row")) == 0.0


def test_unknown_normalization_is_named(model_and_batch):
    model, batch = model_and_batch
    with pytest.raises(ValueError, match=r"loss normalization must be one of \('token', 'row'\)"):
        mean_loss(model, batch, "document")
