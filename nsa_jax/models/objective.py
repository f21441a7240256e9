"""The language-model objective on a batch of nsa_jax.data's layout (tokens, targets,
segment_ids, loss_mask): what training minimises and evaluation reports."""
from __future__ import annotations

import jax.numpy as jnp
import optax

from nsa_jax.branches import BRANCHES


def logits_and_gates(model, batch: dict):
    """-> (logits [B, T, V] float32, {"gate_<branch>": mean gate over layers} for NSA models,
    else {})."""
    logits, aux = model(batch["tokens"], segment_ids=batch["segment_ids"], return_aux=True)
    if "gate_mean" not in aux:
        return logits, {}
    per_branch = jnp.mean(aux["gate_mean"], axis=0)
    return logits, {f"gate_{name}": per_branch[i] for i, name in enumerate(BRANCHES)}


def token_losses(model, batch: dict):
    """-> (sum of the masked next-token cross-entropy, number of target tokens, gate means)."""
    logits, gates = logits_and_gates(model, batch)
    ce = optax.softmax_cross_entropy_with_integer_labels(logits, batch["targets"])
    mask = batch["loss_mask"]
    return jnp.sum(ce * mask), jnp.sum(mask), gates


def mean_loss(model, batch: dict):
    """-> (mean cross-entropy per target token, gate means)."""
    total, count, gates = token_losses(model, batch)
    return total / jnp.maximum(count, 1.0), gates
