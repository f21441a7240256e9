"""The language-model objective on a batch of nsa_jax.data's layout (tokens, targets,
segment_ids, loss_mask): what training minimises and evaluation reports."""
from __future__ import annotations

import jax.numpy as jnp
import optax

from nsa_jax.branches import BRANCHES
from nsa_jax.config import require_choice

# How the training loss averages the masked per-token cross-entropy (mean_loss says what each does).
LOSS_NORMALIZATIONS = ("token", "row")


def logits_and_gates(model, batch: dict):
    """-> (logits [B, T, V] float32, {"gate_<branch>": mean gate over layers} for NSA models,
    else {}). A batch without segment_ids (DataConfig.packed=False) is one sequence per row."""
    logits, aux = model(batch["tokens"], segment_ids=batch.get("segment_ids"), return_aux=True)
    if "gate_mean" not in aux:
        return logits, {}
    per_branch = jnp.mean(aux["gate_mean"], axis=0)
    return logits, {f"gate_{name}": per_branch[i] for i, name in enumerate(BRANCHES)}


def _masked_cross_entropy(model, batch: dict):
    """-> (next-token cross-entropy times loss_mask [B, T], loss_mask [B, T], gate means)."""
    logits, gates = logits_and_gates(model, batch)
    ce = optax.softmax_cross_entropy_with_integer_labels(logits, batch["targets"])
    mask = batch["loss_mask"]
    return ce * mask, mask, gates


def token_losses(model, batch: dict):
    """-> (sum of the masked next-token cross-entropy, number of target tokens, gate means)."""
    ce, mask, gates = _masked_cross_entropy(model, batch)
    return jnp.sum(ce), jnp.sum(mask), gates


def mean_loss(model, batch: dict, normalization: str = "token"):
    """-> (training loss, gate means). normalization "token": the mean cross-entropy per target
    token of the batch. "row": each row's mean over its own target tokens, then the mean over the
    rows that have any, so a passkey row with 5 answer digits weighs as much as a text row with
    thousands of targets (a row of packed documents is one row; rows without targets, e.g.
    padding, are left out)."""
    require_choice("loss normalization", normalization, LOSS_NORMALIZATIONS)
    if normalization == "token":
        total, count, gates = token_losses(model, batch)
        return total / jnp.maximum(count, 1.0), gates
    ce, mask, gates = _masked_cross_entropy(model, batch)
    counts = jnp.sum(mask, axis=1)
    per_row = jnp.sum(ce, axis=1) / jnp.maximum(counts, 1.0)
    has_targets = (counts > 0).astype(per_row.dtype)
    return jnp.sum(per_row * has_targets) / jnp.maximum(jnp.sum(has_targets), 1.0), gates
