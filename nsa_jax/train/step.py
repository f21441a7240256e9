"""The jitted pure functions of a run: one optimizer update, and one validation batch.

Model and optimizer travel through jit as nnx.State pytrees (split once, merged inside the
trace), which keeps per-step Python overhead to a jax.jit dispatch. Given shardings (model state,
optimizer state, batch; see sharding.py) the steps take and return exactly those, so the state's
layout never drifts between steps, checkpoints and resumes.
"""
from __future__ import annotations

import functools

import jax
import optax
from flax import nnx

from nsa_jax.models import mean_loss, token_losses
from nsa_jax.train.sharding import replicated


def make_train_step(model_def: nnx.GraphDef, opt_def: nnx.GraphDef, shardings,
                    loss_normalization: str = "token"):
    """(model_state, opt_state, batch) -> (model_state, opt_state, metrics); shardings:
    (model, optimizer, batch); loss_normalization: mean_loss's normalization."""
    loss_fn = functools.partial(mean_loss, normalization=loss_normalization)

    def train_step(model_state, opt_state, batch):
        model = nnx.merge(model_def, model_state)
        optimizer = nnx.merge(opt_def, opt_state)
        (loss, gates), grads = nnx.value_and_grad(loss_fn, has_aux=True)(model, batch)
        optimizer.update(model, grads)
        metrics = {"loss": loss, "grad_norm": optax.tree.norm(grads), **gates}
        return nnx.state(model), nnx.state(optimizer), metrics

    return jax.jit(train_step, in_shardings=shardings,
                   out_shardings=(*shardings[:2], replicated(shardings[2].mesh)))


def make_eval_step(model_def: nnx.GraphDef, shardings):
    """(model_state, batch) -> (summed token loss, token count); shardings: (model, batch)."""

    def eval_step(model_state, batch):
        total, count, _ = token_losses(nnx.merge(model_def, model_state), batch)
        return total, count

    return jax.jit(eval_step, in_shardings=shardings, out_shardings=replicated(shardings[1].mesh))

